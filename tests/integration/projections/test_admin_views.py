"""`projections.admin_views` at its boundary: the Budgets tab's per-tier spend equals what each of
the tier's customers shows on its own (`customer_info`, a period computed per customer), whatever
the durations and anchors; daily series keep every digit and fold the rest exactly."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from spendledger.ledger import directory
from spendledger.ledger.events import BudgetDefined, CustomerCreated
from spendledger.projections.admin_views import OTHERS, budget_tiers, daily_series
from spendledger.projections.customers import customer_info

NOW = datetime.now(UTC)
TIERS = {  # budget_id -> (max_budget, budget_duration)
    "daily": (Decimal(4), "1d"),
    "monthly": (Decimal(10), "1mo"),
    "half-minute": (Decimal(1), "30s"),
    "every-3-days": (Decimal(2), "3d"),  # periods that do depend on the anchor's day
    "two-monthly": (Decimal(20), "2mo"),
    "capped-forever": (Decimal(3), None),
    "no-limit": (None, None),
}


async def _seed(pool: asyncpg.Pool, aligned_from: datetime) -> dict[str, list[str]]:
    """Customers on each tier created over 40 days; spend in their current period and in an
    earlier one (which must not count); the calendar's start set to `aligned_from`."""
    members: dict[str, list[str]] = {tier: [] for tier in TIERS}
    async with pool.acquire() as conn, conn.transaction():
        for tier, (max_budget, duration) in TIERS.items():
            event = BudgetDefined(budget_id=tier, max_budget=max_budget, budget_duration=duration)
            await directory.define_budget(conn, event, "master_key", NOW - timedelta(days=50))
            for n in range(12):
                user_id = f"{tier}-{n}"
                await directory.create_customer(
                    conn, CustomerCreated(user_id=user_id, budget_id=tier), {}, "master_key", NOW
                )
                members[tier].append(user_id)
        # Anchors over 36 days, at different times of day (the ledger stamps creation with its clock).
        await conn.execute(
            "update customers set created_at = $1::timestamptz - make_interval(days => 3 * n + 1, hours => 7 * n) "
            "from (select user_id as id, substring(user_id from '(\\d+)$')::int as n from customers) as k "
            "where user_id = k.id",
            NOW,
        )
        await conn.execute("update budget_calendar set aligned_from = $1", aligned_from)
        # Spend this period (as sl_open_period would open it) and in the period before.
        await conn.execute(
            """
            insert into budget_usage (scope, scope_id, period_start, spent)
            select 'customer', c.user_id, p.start, p.spent
            from customers c join budgets b on b.budget_id = c.budget_id
            cross join lateral (values
                (sl_period_start(c.created_at, b.budget_duration, now()), 0.000001 * (10 + length(c.user_id))),
                (sl_period_start(c.created_at, b.budget_duration, now()) - interval '400 days', 5)
            ) as p(start, spent)
            on conflict do nothing
            """
        )
        await conn.execute(
            "insert into spend_totals (scope, scope_id, spend) "
            "select 'customer', user_id, 0.0011120000000000001 from customers where budget_id = 'no-limit'"
        )
    return members


@pytest.mark.parametrize("calendar_began", ["long ago", "after every customer"])
async def test_each_tiers_spend_is_the_sum_of_its_customers_own(pool: asyncpg.Pool, calendar_began: str) -> None:
    aligned_from = NOW - timedelta(days=400) if calendar_began == "long ago" else NOW - timedelta(minutes=1)
    members = await _seed(pool, aligned_from)
    tiers = {row["budget_id"]: row for row in await budget_tiers(pool, None)}
    assert set(tiers) == set(TIERS)
    for tier, users in members.items():
        each = [await customer_info(pool, user_id) for user_id in users]
        expected = sum((info["spend"] for info in each if info), Decimal(0))
        assert tiers[tier]["customers"] == len(users)
        assert tiers[tier]["spend"] == expected, tier
        assert expected > 0


async def test_customers_with_no_tier_count_on_the_default_tier(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await directory.define_budget(conn, BudgetDefined(budget_id="default", max_budget=Decimal(1)), "m", NOW)
        for user_id in ("plain-1", "plain-2"):
            await directory.create_customer(conn, CustomerCreated(user_id=user_id), {}, "m", NOW)
    assert (await budget_tiers(pool, "default"))[0]["customers"] == 2
    assert (await budget_tiers(pool, None))[0]["customers"] == 0


async def test_daily_series_keep_every_digit_and_fold_the_rest_exactly(pool: asyncpg.Pool) -> None:
    first = date(2026, 11, 1)
    rows = [
        (first + timedelta(days=d), f"c{n}", Decimal("0.0011120000000000001") * (n + 1) + d)
        for n in range(9)
        for d in range(3)
    ]
    await pool.executemany(
        "insert into daily_spend (day, scope, scope_id, requests, spend) values ($1, 'customer', $2, 1, $3)", rows
    )
    series = await daily_series(pool, "customer", first, first + timedelta(days=2), drawn=3, listed=5)
    exact_total = sum((spend for _, _, spend in rows), Decimal(0))
    assert series.total == exact_total
    assert [name for name, _ in series.ranked] == ["c8", "c7", "c6", "c5", "c4"]
    assert series.ranked[0][1] == sum((s for _, who, s in rows if who == "c8"), Decimal(0))
    assert set(series.days) == {"c8", "c7", "c6", OTHERS}
    drawn = sum((sum(days.values(), Decimal(0)) for days in series.days.values()), Decimal(0))
    assert drawn == exact_total  # the chart's stacks add up to the total, to the last digit
    one = await daily_series(pool, "customer", first, first, scope_id="c0", drawn=1, listed=1)
    assert one.total == Decimal("0.0011120000000000001") and set(one.days) == {"c0"}
