"""The adversarial tests share the end-to-end fixtures: the fake provider and its reset."""

from __future__ import annotations

from tests.e2e.conftest import _reset_upstream, upstream

__all__ = ["_reset_upstream", "upstream"]
