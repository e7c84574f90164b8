"""What the admin UI's pages read: the projections, paged and bounded, never a scan of the log.

Tiers with how many customers use them and their spend this period; customers by page (keyset on
`user_id`, searched by id or alias); a customer's days, models and recent requests (newest first,
by the audit log's cursor, with each request's Lago row); daily spend by model group, team or the
top customers over a range. Amounts are NUMERIC, trimmed, and stay Decimal.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Final

import asyncpg

from spendledger.projections.audit import decode_cursor, encode_cursor
from spendledger.projections.customers import CUSTOMER_SELECT

Queryable = asyncpg.Connection | asyncpg.Pool

_TIERS: Final = """
select b.budget_id, trim_scale(b.max_budget) as max_budget, trim_scale(b.soft_budget) as soft_budget,
       b.budget_duration, b.rpm_limit, b.tpm_limit, b.max_parallel_requests,
       count(c.user_id) as customers,
       trim_scale(coalesce(sum((
           select u.spent from budget_usage u
           where u.scope = 'customer' and u.scope_id = c.user_id
             and u.period_start = sl_period_start(c.created_at, b.budget_duration, now()))), 0)) as spend
from budgets b
left join customers c on coalesce(c.budget_id, $1::text) = b.budget_id
where b.budget_id not like 'customer-budget:%'
group by b.budget_id
order by b.created_at, b.budget_id
"""


async def budget_tiers(conn: Queryable, default_budget_id: str | None) -> list[dict[str, Any]]:
    """Every tier (not the customers' own limits) with its customers and their spend this period."""
    return [dict(row) for row in await conn.fetch(_TIERS, default_budget_id)]


async def customers_page(
    conn: Queryable,
    default_budget_id: str | None,
    search: str,
    after: str | None,
    size: int,
    tier: str | None = None,
) -> tuple[list[dict[str, Any]], str | None, int]:
    """One page of customers in id order after `after`: those whose id or alias contains `search`
    (and on `tier`, if given); the id to continue after (None: the last page), and how many match."""
    pattern = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    matches = (
        "(c.user_id ilike $3 or coalesce(c.alias, '') ilike $3) "
        "and ($5::text is null or coalesce(c.budget_id, $2::text) = $5)"
    )
    rows = await conn.fetch(
        CUSTOMER_SELECT + f" where {matches} and ($4::text is null or c.user_id > $4) order by c.user_id limit $1",
        size + 1,
        default_budget_id,
        pattern,
        after,
        tier,
    )
    total = await conn.fetchval(
        "select count(*) from customers c where (c.user_id ilike $1 or coalesce(c.alias, '') ilike $1) "
        "and ($3::text is null or coalesce(c.budget_id, $2::text) = $3)",
        pattern,
        default_budget_id,
        tier,
    )
    page = [dict(row) for row in rows[:size]]
    return page, (page[-1]["user_id"] if len(rows) > size else None), int(total)


async def daily_series(
    conn: Queryable, scope: str, start: date, end: date, scope_id: str | None = None, top: int | None = None
) -> tuple[dict[str, dict[date, Decimal]], Decimal]:
    """Spend by day of each `scope` id in [start, end] (the `top` spenders, the rest as "other"),
    and the exact total of the range."""
    rows = await conn.fetch(
        "select day, scope_id, trim_scale(spend) as spend from daily_spend "
        "where scope = $1 and day between $2 and $3 and ($4::text is null or scope_id = $4)",
        scope,
        start,
        end,
        scope_id,
    )
    totals: dict[str, Decimal] = {}
    for row in rows:
        totals[row["scope_id"]] = totals.get(row["scope_id"], Decimal(0)) + row["spend"]
    ranked = sorted(totals, key=lambda name: (-totals[name], name))
    kept = set(ranked if top is None else ranked[:top])
    series: dict[str, dict[date, Decimal]] = {name: {} for name in ranked if name in kept}
    for row in rows:
        name = row["scope_id"] if row["scope_id"] in kept else "other"
        days = series.setdefault(name, {})
        days[row["day"]] = days.get(row["day"], Decimal(0)) + row["spend"]
    return series, sum(totals.values(), Decimal(0))


async def spend_by_model(
    conn: Queryable, customer: str, start: datetime, end: datetime
) -> list[dict[str, Any]]:
    """A customer's requests, tokens and spend by model group in [start, end)."""
    rows = await conn.fetch(
        "select model_group, count(*) as requests, sum(total_tokens) as tokens, trim_scale(sum(spend)) as spend "
        "from spend_logs where end_user = $1 and recorded_at >= $2 and recorded_at < $3 "
        "group by model_group order by sum(spend) desc, model_group",
        customer,
        start,
        end,
    )
    return [dict(row) for row in rows]


_RECENT: Final = """
select e.txid::text as txid, e.position, e.recorded_at, l.request_id, l.model_group, l.status,
       l.total_tokens, trim_scale(l.spend) as spend, l.api_key, l.usage_estimated, o.state as lago_state
from events e
cross join lateral sl_spend_log_row(e.data) as l
left join outbox o on o.call_id = l.request_id and o.sink = 'lago'
where e.data->>'customer_id' = $1 and e.type = 'UsageRecorded'
  and ($2::xid8 is null or (e.txid, e.position) < ($2::xid8, $3::bigint))
order by e.txid desc, e.position desc
limit $4
"""


async def recent_requests(
    conn: Queryable, customer: str, before: str | None, size: int
) -> tuple[list[dict[str, Any]], str | None]:
    """A customer's requests, newest first, before the audit cursor `before`; and the cursor of the
    next (older) page, None at the first request. `InvalidCursor` for a cursor not made here."""
    txid, position = decode_cursor(before) if before is not None else (None, None)
    rows = await conn.fetch(_RECENT, customer, None if txid is None else str(txid), position, size + 1)
    page = [dict(row) for row in rows[:size]]
    more = len(rows) > size
    return page, (encode_cursor(page[-1]["txid"], page[-1]["position"]) if more else None)


def lago_states(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """How many of `rows` (recent requests) are in each Lago delivery state."""
    counts: dict[str, int] = {}
    for row in rows:
        state = row["lago_state"] or "none"
        counts[state] = counts.get(state, 0) + 1
    return counts


_KEYS: Final = """
select k.key_hash, k.key_name, k.key_alias, k.user_id, k.team_id, k.budget_id, trim_scale(k.max_budget) as max_budget,
       k.budget_duration, k.rpm_limit, k.tpm_limit, k.blocked, k.expires, k.created_at,
       trim_scale(coalesce(s.spend, 0)) as spend
from keys k
left join spend_totals s on s.scope = 'key' and s.scope_id = k.key_hash
order by k.created_at desc, k.key_hash
limit $1 offset $2
"""


async def keys_page(conn: Queryable, page: int, size: int) -> tuple[list[dict[str, Any]], int]:
    """One page of keys, newest first, each with its lifetime spend; and how many keys there are."""
    rows = await conn.fetch(_KEYS, size, (page - 1) * size)
    return [dict(row) for row in rows], int(await conn.fetchval("select count(*) from keys"))
