"""Budgets (pricing tiers), teams and internal users as `/budget/*`, `/team/*` and `/user/*` show them.

A team's or user's `spend` is the spend of its current budget period when it has a `max_budget` or a
`budget_duration` (the period `sl_admit` charges, anchored at its creation), otherwise its lifetime
spend; `budget_reset_at` is the end of the current period (null without a duration). Money is read
with `trim_scale` so it prints with its significant digits only (0.0000410 → 0.000041).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, Final

import asyncpg
import msgspec

from spendledger.ledger.connections import Queryable
from spendledger.ledger.keys import KeyRecord

# --- budgets -------------------------------------------------------------------------------------

_BUDGET_SELECT: Final = """
select budget_id, trim_scale(max_budget) as max_budget, trim_scale(soft_budget) as soft_budget,
       rpm_limit, tpm_limit, max_parallel_requests, budget_duration, created_at, updated_at
from budgets
"""


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def budget_view(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "budget_id": row["budget_id"],
        "max_budget": row["max_budget"],
        "soft_budget": row["soft_budget"],
        "rpm_limit": row["rpm_limit"],
        "tpm_limit": row["tpm_limit"],
        "max_parallel_requests": row["max_parallel_requests"],
        "budget_duration": row["budget_duration"],
        "created_at": _iso(row["created_at"]),
        "updated_at": _iso(row["updated_at"]),
    }


async def get_budget(conn: Queryable, budget_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(_BUDGET_SELECT + " where budget_id = $1", budget_id)
    return budget_view(row) if row is not None else None


async def get_budgets(conn: Queryable, budget_ids: Sequence[str]) -> list[dict[str, Any]]:
    """The budgets named, in the order named (unknown ids are left out: the caller checks)."""
    rows = await conn.fetch(_BUDGET_SELECT + " where budget_id = any($1::text[])", list(budget_ids))
    by_id = {row["budget_id"]: budget_view(row) for row in rows}
    return [by_id[budget_id] for budget_id in dict.fromkeys(budget_ids) if budget_id in by_id]


async def list_budgets(conn: Queryable) -> list[dict[str, Any]]:
    rows = await conn.fetch(_BUDGET_SELECT + " order by created_at, budget_id")
    return [budget_view(row) for row in rows]


# --- teams and internal users --------------------------------------------------------------------


def _period_columns(alias: str, scope: str, id_column: str) -> str:
    """`budget_reset_at` and `spend` of one team or user row, as select-list SQL.

    The period is the one containing now, or the first one when now is before the row's creation
    (read in the transaction that created it: `created_at` is the application's clock, later than
    the transaction's `now()`).
    """
    at = f"greatest(now(), {alias}.created_at)"
    return f"""
       sl_period_end({alias}.created_at, {alias}.budget_duration, {at}) as budget_reset_at,
       trim_scale(case
           when {alias}.max_budget is not null or {alias}.budget_duration is not null then coalesce((
               select bu.spent from budget_usage bu
               where bu.scope = '{scope}' and bu.scope_id = {alias}.{id_column}
                 and bu.period_start = sl_period_start({alias}.created_at, {alias}.budget_duration, {at})), 0)
           else coalesce((select st.spend from spend_totals st
                          where st.scope = '{scope}' and st.scope_id = {alias}.{id_column}), 0)
       end) as spend"""


_LIMIT_COLUMNS: Final = (
    "trim_scale({a}.max_budget) as max_budget, trim_scale({a}.soft_budget) as soft_budget, "
    "{a}.budget_duration, {a}.rpm_limit, {a}.tpm_limit, {a}.max_parallel_requests, {a}.models, "
    "{a}.metadata::text as metadata, {a}.created_at, {a}.updated_at"
)

_TEAM_SELECT: Final = f"""
select t.team_id, t.team_alias, t.blocked, {_LIMIT_COLUMNS.format(a="t")},
       {_period_columns("t", "team", "team_id")}
from teams t
"""

_USER_SELECT: Final = f"""
select u.user_id, u.user_email, u.user_alias, u.user_role, {_LIMIT_COLUMNS.format(a="u")},
       {_period_columns("u", "user", "user_id")}
from users u
"""


def _limits(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "max_budget": row["max_budget"],
        "soft_budget": row["soft_budget"],
        "spend": row["spend"],
        "budget_duration": row["budget_duration"],
        "budget_reset_at": _iso(row["budget_reset_at"]),
        "rpm_limit": row["rpm_limit"],
        "tpm_limit": row["tpm_limit"],
        "max_parallel_requests": row["max_parallel_requests"],
        "models": list(row["models"] or ()),
        "metadata": msgspec.json.decode(row["metadata"] or "{}"),
        "created_at": _iso(row["created_at"]),
        "updated_at": _iso(row["updated_at"]),
    }


def team_view(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "team_id": row["team_id"],
        "team_alias": row["team_alias"],
        "blocked": row["blocked"],
        **_limits(row),
    }


def user_view(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "user_id": row["user_id"],
        "user_email": row["user_email"],
        "user_alias": row["user_alias"],
        "user_role": row["user_role"],
        **_limits(row),
    }


async def get_team(conn: Queryable, team_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(_TEAM_SELECT + " where t.team_id = $1", team_id)
    return team_view(row) if row is not None else None


async def list_teams(conn: Queryable) -> list[dict[str, Any]]:
    rows = await conn.fetch(_TEAM_SELECT + " order by t.created_at, t.team_id")
    return [team_view(row) for row in rows]


async def get_user(conn: Queryable, user_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(_USER_SELECT + " where u.user_id = $1", user_id)
    return user_view(row) if row is not None else None


async def list_users(
    conn: Queryable, page: int, page_size: int, role: str | None = None, user_ids: Sequence[str] | None = None
) -> tuple[list[dict[str, Any]], int]:
    """One page of users, newest first (as LiteLLM), and how many users match in all."""
    where = " where ($1::text is null or u.user_role = $1) and ($2::text[] is null or u.user_id = any($2))"
    ids = list(user_ids) if user_ids is not None else None
    total = await conn.fetchval("select count(*) from users u" + where, role, ids)
    rows = await conn.fetch(
        _USER_SELECT + where + " order by u.created_at desc, u.user_id limit $3 offset $4",
        role,
        ids,
        page_size,
        (page - 1) * page_size,
    )
    return [user_view(row) for row in rows], int(total)


# --- the keys of a team or a user ----------------------------------------------------------------

_KEY_COLUMNS: Final = (
    "k.key_hash, k.key_name, k.key_alias, k.user_id, k.team_id, k.models, k.metadata::text as metadata, "
    "k.max_budget, k.budget_duration, k.budget_id, k.rpm_limit, k.tpm_limit, k.max_parallel_requests, "
    "k.expires, k.blocked, k.created_at, k.updated_at, k.allowed_customers"
)


async def keys_of(conn: Queryable, owner: str, owner_id: str) -> list[tuple[KeyRecord, Decimal]]:
    """The keys of a team (`owner="team"`) or a user (`owner="user"`), each with its lifetime spend."""
    column = {"team": "team_id", "user": "user_id"}[owner]
    rows = await conn.fetch(
        f"select {_KEY_COLUMNS}, trim_scale(coalesce(s.spend, 0)) as spend from keys k "
        "left join spend_totals s on s.scope = 'key' and s.scope_id = k.key_hash "
        f"where k.{column} = $1 order by k.created_at, k.key_hash",
        owner_id,
    )
    result = []
    for row in rows:
        values = dict(row)
        spend = values.pop("spend")
        values["models"] = tuple(values["models"] or ())
        values["allowed_customers"] = tuple(values["allowed_customers"] or ())
        values["metadata"] = msgspec.json.decode(values["metadata"] or "{}")
        result.append((KeyRecord(**values), spend))
    return result
