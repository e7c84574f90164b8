"""Spend totals per scope (key, user, team, customer, model), kept by the settle (`sl_record_usage`, `sl_record_usages`: ledger/sql/settle.sql)."""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal

import asyncpg

from spendledger.ledger.money import ZERO

SCOPES = ("key", "user", "team", "customer", "model")


async def spend_of(conn: asyncpg.Connection | asyncpg.Pool, scope: str, scope_id: str) -> Decimal:
    value = await conn.fetchval(
        "select trim_scale(spend) from spend_totals where scope = $1 and scope_id = $2", scope, scope_id
    )
    return value if value is not None else ZERO


async def spend_by_id(
    conn: asyncpg.Connection | asyncpg.Pool, scope: str, scope_ids: Iterable[str]
) -> dict[str, Decimal]:
    rows = await conn.fetch(
        "select scope_id, trim_scale(spend) as spend from spend_totals where scope = $1 and scope_id = any($2::text[])",
        scope,
        list(scope_ids),
    )
    return {row["scope_id"]: row["spend"] for row in rows}
