"""Fixtures of the client's tests (no __init__.py here: the root suite's `tests` package stays the
only one of that name when both are collected)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from sl_client_fakes import FakeLedger, FakeOpenAI

# LiteLLM would fetch its model cost map from the internet at import.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

# Backoffs in milliseconds: an outage test waits for tens of retries in well under a second.
FAST: dict[str, Any] = {
    "flush_interval_s": 0.02,
    "initial_backoff_s": 0.005,
    "max_backoff_s": 0.05,
    "timeout_s": 2.0,
    "close_timeout_s": 2.0,
}


@pytest.fixture
def ledger_server() -> Iterator[FakeLedger]:
    server = FakeLedger()
    yield server
    server.down()


@pytest.fixture(scope="module")
def openai_server() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI()
    yield server
    server.down()
