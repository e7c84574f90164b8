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
import msgspec

from spendledger.projections.audit import decode_cursor, encode_cursor
from spendledger.projections.customers import CUSTOMER_SELECT

Queryable = asyncpg.Connection | asyncpg.Pool

# A tier's customers and their spend this period. A customer's period depends on its budget's
# duration and its anchor's class (sl_period_class: its day in the budget zone, or the anchor itself
# before the calendar began), so the period start is computed once per (tier, class), not once
# per customer.
_TIERS: Final = """
with members as materialized (
    select c.user_id, c.created_at, b.budget_id, b.budget_duration, sl_period_class(c.created_at) as anchor_class
    from budgets b
    join customers c on coalesce(c.budget_id, $1::text) = b.budget_id
    where b.budget_id not like 'customer-budget:%'
),
classes as materialized (
    select budget_id, anchor_class, sl_period_start(min(created_at), min(budget_duration), now()) as period_start
    from members group by budget_id, anchor_class
),
spent as (
    select m.budget_id, m.user_id, u.spent, t.spend as lifetime
    from members m
    join classes k on k.budget_id = m.budget_id and k.anchor_class = m.anchor_class
    left join budget_usage u on u.scope = 'customer' and u.scope_id = m.user_id and u.period_start = k.period_start
    left join spend_totals t on t.scope = 'customer' and t.scope_id = m.user_id
)
select b.budget_id, trim_scale(b.max_budget) as max_budget, trim_scale(b.soft_budget) as soft_budget,
       b.budget_duration, b.rpm_limit, b.tpm_limit, b.max_parallel_requests,
       count(s.user_id) as customers,
       trim_scale(coalesce(sum(case
           when b.max_budget is not null or b.budget_duration is not null then s.spent
           else s.lifetime end), 0)) as spend
from budgets b
left join spent s on s.budget_id = b.budget_id
where b.budget_id not like 'customer-budget:%'
group by b.budget_id
order by min(b.created_at), b.budget_id
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


# One statement per series: the range's totals by id are summed once (`totals`), ranked, and both
# the top spenders and the drawn ones' days come back in one answer (kind 'rank' / 'day'). The drawn ids
# are one materialized row: a generic plan (asyncpg prepares statements) may loop over it per day row.
_SERIES: Final = """
with totals as materialized (
    select scope_id, sum(spend) as total from daily_spend
    where scope = $1 and day between $2 and $3 and ($4::text is null or scope_id = $4)
    group by scope_id
),
ranked as materialized (
    select scope_id, total, row_number() over (order by total desc, scope_id) as rank,
           sum(total) over () as everything
    from totals
),
top as materialized (select coalesce(array_agg(scope_id), '{}') as ids from ranked where rank <= $6)
select 'rank' as kind, null::date as day, scope_id as name, trim_scale(total) as spend,
       trim_scale(everything) as everything
from ranked where rank <= $5
union all
select 'day', d.day, case when d.scope_id = any(top.ids) then d.scope_id else $7 end, trim_scale(sum(d.spend)), null
from daily_spend d
cross join top
where d.scope = $1 and d.day between $2 and $3 and ($4::text is null or d.scope_id = $4)
group by 2, 3
"""

OTHERS: Final = "(the rest)"


class DailySeries(msgspec.Struct, frozen=True, kw_only=True):
    ranked: list[tuple[str, Decimal]]  # the top spenders of the range, each with its total
    days: dict[str, dict[date, Decimal]]  # the `drawn` top spenders' days, the rest as OTHERS
    total: Decimal  # of everyone in the range


async def daily_series(
    conn: Queryable, scope: str, start: date, end: date, scope_id: str | None = None, drawn: int = 6, listed: int = 20
) -> DailySeries:
    """Spend of `scope` ids in [start, end] (UTC days): the `listed` top spenders with their totals,
    the days of the `drawn` top ones (everyone else summed as OTHERS), and the range's exact total.
    Summed in PostgreSQL: only those rows reach Python."""
    rows = await conn.fetch(_SERIES, scope, start, end, scope_id, listed, drawn, OTHERS)
    ranked = sorted((row for row in rows if row["kind"] == "rank"), key=lambda row: (-row["spend"], row["name"]))
    days: dict[str, dict[date, Decimal]] = {row["name"]: {} for row in ranked[:drawn]}
    for row in rows:
        if row["kind"] == "day":
            days.setdefault(row["name"], {})[row["day"]] = row["spend"]
    return DailySeries(
        ranked=[(row["name"], row["spend"]) for row in ranked],
        days=days,
        total=ranked[0]["everything"] if ranked else Decimal(0),
    )


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
    rows = await conn.fetch(_RECENT, customer, txid, position, size + 1)
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
