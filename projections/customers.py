"""The customer (end user) directory as `/customer/info` and `/customer/list` show it.

`spend` is the spend of the current budget period when the customer's budget (its own, or the
default tier) has a limit or a duration; otherwise it is the customer's lifetime spend.
"""

from __future__ import annotations

from typing import Any, Final

import asyncpg

CUSTOMER_SELECT: Final = """
select c.user_id, c.alias, c.blocked, c.allowed_model_region, c.default_model,
       b.budget_id, b.max_budget, b.soft_budget, b.rpm_limit, b.tpm_limit, b.max_parallel_requests,
       b.budget_duration, sl_period_end(c.created_at, b.budget_duration, now()) as budget_reset_at,
       trim_scale(case
           when b.max_budget is not null or b.budget_duration is not null then coalesce((
               select u.spent from budget_usage u
               where u.scope = 'customer' and u.scope_id = c.user_id
                 and u.period_start = sl_period_start(c.created_at, b.budget_duration, now())), 0)
           else coalesce((select t.spend from spend_totals t
                          where t.scope = 'customer' and t.scope_id = c.user_id), 0)
       end) as spend
from customers c
left join budgets b on b.budget_id = coalesce(c.budget_id, $2::text)
"""


def _view(row: asyncpg.Record) -> dict[str, Any]:
    budget = None
    if row["budget_id"] is not None:
        budget = {
            "budget_id": row["budget_id"],
            "max_budget": row["max_budget"],
            "soft_budget": row["soft_budget"],
            "rpm_limit": row["rpm_limit"],
            "tpm_limit": row["tpm_limit"],
            "max_parallel_requests": row["max_parallel_requests"],
            "budget_duration": row["budget_duration"],
            "budget_reset_at": row["budget_reset_at"].isoformat() if row["budget_reset_at"] else None,
        }
    return {
        "user_id": row["user_id"],
        "blocked": row["blocked"],
        "alias": row["alias"],
        "spend": row["spend"],
        "allowed_model_region": row["allowed_model_region"],
        "default_model": row["default_model"],
        "litellm_budget_table": budget,
    }


async def customer_info(
    conn: asyncpg.Connection | asyncpg.Pool, user_id: str, default_budget_id: str | None = None
) -> dict[str, Any] | None:
    row = await conn.fetchrow(CUSTOMER_SELECT + " where c.user_id = $1", user_id, default_budget_id)
    return _view(row) if row is not None else None


async def list_customers(
    conn: asyncpg.Connection | asyncpg.Pool, default_budget_id: str | None = None
) -> list[dict[str, Any]]:
    rows = await conn.fetch(CUSTOMER_SELECT + " where $1::text is null order by c.user_id", None, default_budget_id)
    return [_view(row) for row in rows]
