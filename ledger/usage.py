"""Recording a request: its UsageRecorded event and every projection of it, in one round trip."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Final

import asyncpg
import msgspec

from ledger.events import UsageRecorded, encode_event

_meta: Final = msgspec.json.Encoder()


async def record_usage(
    conn: asyncpg.Connection | asyncpg.Pool,
    event: UsageRecorded,
    default_budget_id: str | None,
    metadata: dict[str, Any] | None = None,
) -> Decimal | None:
    """Append the event (creating its customer on first sight) and project it; returns the key's
    new lifetime spend. Committed when this returns: the caller may then release the response."""
    row = await conn.fetchrow(
        "select event_position, key_spend from sl_record_usage($1::jsonb, $2::jsonb, $3)",
        encode_event(event).decode(),
        _meta.encode(metadata or {}).decode(),
        default_budget_id,
    )
    assert row is not None
    spend: Decimal | None = row["key_spend"]
    return spend
