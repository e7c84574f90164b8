"""Recording a request: its UsageRecorded event, every projection of it, and its outbox rows,
in one round trip (`sl_record_usage`)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Final

import asyncpg
import msgspec

from ledger.events import UsageRecorded, encode_event
from ledger.outbox import OutboxRow

_json: Final = msgspec.json.Encoder(decimal_format="number")


class RecordingContext(msgspec.Struct, frozen=True, kw_only=True):
    """What the database needs besides the event: the default tier (for a customer seen first at
    recording), the global budget and whether webhooks are on (to find budget crossings)."""

    default_budget_id: str | None = None
    global_max_budget: Decimal | None = None
    global_budget_duration: str | None = None
    webhooks: bool = False


NO_CONTEXT: Final = RecordingContext()


async def record_usage(
    conn: asyncpg.Connection | asyncpg.Pool,
    event: UsageRecorded,
    context: RecordingContext = NO_CONTEXT,
    outbox: list[OutboxRow] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Decimal | None:
    """Append the event (creating its customer on first sight), project it, release its hold and
    enqueue its deliveries; returns the key's new lifetime spend. Committed when this returns: the
    caller may then release the response."""
    row = await conn.fetchrow(
        "select event_position, key_spend from sl_record_usage($1::jsonb, $2::jsonb, $3::jsonb, $4::jsonb)",
        encode_event(event).decode(),
        _json.encode(metadata or {}).decode(),
        _json.encode(context).decode(),
        _json.encode(outbox or []).decode(),
    )
    assert row is not None
    spend: Decimal | None = row["key_spend"]
    return spend
