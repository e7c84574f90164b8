"""The fields a record takes (as keyword arguments), and the call a `ledger.call(...)` block makes."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Required, TypedDict

from .records import Cost, Hold, Route, Status


class RecordFields(TypedDict, total=False):
    """`record(...)`'s keyword arguments: the contract's record fields (see `make_record`)."""

    model: Required[str]
    usage: object
    call_id: str | None
    user: str | None
    user_id: str | None
    team_id: str | None
    start_time: datetime | str | None
    end_time: datetime | str | None
    status: Status
    metadata: Mapping[str, Any] | None
    cost: Cost | None
    hold_id: str | None
    route: Route


@dataclass
class Call:
    """One LLM call made inside `with ledger.call(...) as call:`. Set `call.usage` (a dict or the
    SDK's usage object) before the block ends; `model`, `metadata` and `cost` may be changed too."""

    model: str
    user: str | None = None
    user_id: str | None = None
    team_id: str | None = None
    hold: Hold | None = None
    usage: object = None
    metadata: dict[str, Any] = field(default_factory=dict)
    cost: Cost | None = None
    call_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    start_time: datetime = field(default_factory=lambda: datetime.now(UTC))

    def fields(self, failed: bool) -> RecordFields:
        """The record of the call once its block ended: a block that raised is a failure with no
        usage (what it used, if anything, is unknown)."""
        return RecordFields(
            model=self.model,
            usage=None if failed else self.usage,
            call_id=self.call_id,
            user=self.user,
            user_id=self.user_id,
            team_id=self.team_id,
            start_time=self.start_time,
            end_time=datetime.now(UTC),
            status="failure" if failed else "success",
            metadata=self.metadata,
            cost=self.cost,
            hold_id=None if self.hold is None else self.hold.hold_id,
        )
