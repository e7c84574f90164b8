"""The customer (end user) directory as `/customer/info` shows it."""

from __future__ import annotations

from typing import Any

import asyncpg

from projections.spend import spend_of


async def customer_info(conn: asyncpg.Connection | asyncpg.Pool, user_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "select user_id, alias, blocked, budget_id, allowed_model_region, default_model "
        "from customers where user_id = $1",
        user_id,
    )
    if row is None:
        return None
    return {
        "user_id": row["user_id"],
        "blocked": row["blocked"],
        "alias": row["alias"],
        "spend": await spend_of(conn, "customer", user_id),
        "allowed_model_region": row["allowed_model_region"],
        "default_model": row["default_model"],
        "litellm_budget_table": None,
    }
