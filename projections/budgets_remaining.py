"""What is left of the budgets an operator marks (`general_settings.budget_gauges`), for the
Prometheus gauges (api/budget_gauges.py).

Each marked scope is read as admission reads it (`sl_request_scopes`: a key's own limit or its
tier's, a customer's tier, the global budget) in its current period (`sl_period_start`): the limit,
and what is spent and held in the period. One query for every mark.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Final

import msgspec
from asyncpg import Pool

from spendledger.ledger.connections import Connection
from spendledger.ledger.scopes import BudgetSettings

SCOPE_FIELDS: Final = {"key": "key_hash", "user": "user_id", "team": "team_id", "customer": "customer_id"}

_REMAINING: Final = """
select s.scope, s.scope_id, s.max_budget, coalesce(u.spent, 0) as spent, coalesce(u.held, 0) as held
from jsonb_array_elements($1::jsonb) as p, sl_request_scopes(p) as s
left join budget_usage u
  on u.scope = s.scope and u.scope_id = s.scope_id
 and u.period_start = sl_period_start(s.anchor, s.budget_duration, now())
where s.max_budget is not null and (p->>'scope') = s.scope
"""


class Mark(msgspec.Struct, frozen=True):
    scope: str  # key, user, team, customer or global
    scope_id: str  # "global" for the global budget


class Remaining(msgspec.Struct, frozen=True, kw_only=True):
    scope: str
    scope_id: str
    max_budget: Decimal
    remaining: Decimal  # the limit less what the period has spent and holds (below 0: overspent by a HoldExceeded)


async def budgets_remaining(
    conn: Pool | Connection, marks: Sequence[Mark], settings: BudgetSettings
) -> list[Remaining]:
    params = [
        {"scope": m.scope, **({SCOPE_FIELDS[m.scope]: m.scope_id} if m.scope in SCOPE_FIELDS else {}), **_global(settings)}
        for m in marks
    ]
    rows = await conn.fetch(_REMAINING, msgspec.json.encode(params).decode())
    return [
        Remaining(
            scope=r["scope"], scope_id=r["scope_id"], max_budget=r["max_budget"],
            remaining=r["max_budget"] - r["spent"] - r["held"],
        )
        for r in rows
    ]  # fmt: skip


def _global(settings: BudgetSettings) -> dict[str, str | None]:
    return {
        "global_max_budget": None if settings.global_max_budget is None else str(settings.global_max_budget),
        "global_budget_duration": settings.global_budget_duration,
        "default_budget_id": settings.default_budget_id,
    }
