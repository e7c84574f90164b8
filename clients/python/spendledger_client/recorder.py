"""What the integrations need of a ledger: `record(...)`, which both SpendLedger and AsyncSpendLedger
have (a plain method on both, so sync and async SDK paths alike can call it)."""

from __future__ import annotations

from typing import Protocol, Unpack

from .calls import RecordFields


class Recorder(Protocol):
    def record(self, **fields: Unpack[RecordFields]) -> str: ...
