"""`ledger.ingest.budget_periods` on a real PostgreSQL: the budget rows an ingested record's cost is
added to are the ones admission would hold for a proxied request of the same scopes — the config's
default tier for a customer seen for the first time (created then, as admission creates it) and
the global budget included."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import asyncpg

from spendledger.ledger import directory
from spendledger.ledger.events import BudgetDefined, CustomerCreated
from spendledger.ledger.ingest import budget_periods
from spendledger.ledger.scopes import BudgetSettings, Scopes

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
KEY = "k" * 64
SETTINGS = BudgetSettings(
    default_budget_id="default-tier", global_max_budget=Decimal(100), global_budget_duration="1mo"
)


async def _period(pool: asyncpg.Pool, customer: str | None) -> str:
    """The start of the monthly period current at NOW for the customer's anchor (its creation), or
    the global budget's (the epoch): sl_period_start, the rule admission uses."""
    anchor = "'epoch'::timestamptz" if customer is None else "(select created_at from customers where user_id = $2)"
    args = (NOW,) if customer is None else (NOW, customer)
    start: datetime = await pool.fetchval(f"select sl_period_start({anchor}, '1mo', $1)", *args)
    return start.isoformat()


async def _directory(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn, conn.transaction():
        for tier in ("default-tier", "pro"):
            event = BudgetDefined(budget_id=tier, max_budget=Decimal(10), budget_duration="1mo")
            await directory.define_budget(conn, event, "master_key", NOW)
        await directory.create_customer(conn, CustomerCreated(user_id="on-pro", budget_id="pro"), {}, "m", NOW)
        await directory.create_customer(conn, CustomerCreated(user_id="no-tier"), {}, "m", NOW)


async def test_a_new_customer_is_created_on_the_default_tier_and_counts_in_it(pool: asyncpg.Pool) -> None:
    await _directory(pool)
    async with pool.acquire() as conn, conn.transaction():
        (periods,) = await budget_periods(conn, [Scopes(KEY, customer_id="fresh")], NOW, SETTINGS, {"actor": "key:x"})
    assert periods == (("customer", "fresh", await _period(pool, "fresh")), ("global", "global", await _period(pool, None)))
    assert await pool.fetchval("select budget_id from customers where user_id = 'fresh'") == "default-tier"
    meta = await pool.fetchval("select metadata->>'actor' from events where stream = 'customer:fresh'")
    assert meta == "key:x"


async def test_known_customers_count_in_their_own_tier_or_the_default_and_all_in_the_global(
    pool: asyncpg.Pool,
) -> None:
    await _directory(pool)
    scopes = [Scopes(KEY, customer_id="on-pro"), Scopes(KEY), Scopes(KEY, customer_id="no-tier")]
    async with pool.acquire() as conn, conn.transaction():
        found = await budget_periods(conn, scopes, NOW, SETTINGS, {})
    month = await _period(pool, None)
    assert found == [
        (("customer", "on-pro", await _period(pool, "on-pro")), ("global", "global", month)),
        (("global", "global", month),),
        (("customer", "no-tier", await _period(pool, "no-tier")), ("global", "global", month)),
    ]


async def test_repeated_scopes_are_asked_once_and_answered_at_each_position(pool: asyncpg.Pool) -> None:
    await _directory(pool)
    a, b = Scopes(KEY, customer_id="on-pro"), Scopes(KEY, customer_id="later")
    async with pool.acquire() as conn, conn.transaction():
        each = [await budget_periods(conn, [s], NOW, SETTINGS, {}) for s in (a, b)]
        together = await budget_periods(conn, [a, b, a, a, b], NOW, SETTINGS, {})
    assert together == [each[0][0], each[1][0], each[0][0], each[0][0], each[1][0]]
    assert await pool.fetchval("select count(*) from events where stream = 'customer:later'") == 1


async def test_without_budget_settings_only_the_scopes_own_budgets_count(pool: asyncpg.Pool) -> None:
    await _directory(pool)
    async with pool.acquire() as conn, conn.transaction():
        found = await budget_periods(
            conn, [Scopes(KEY, customer_id="no-tier"), Scopes(KEY, customer_id="new")], NOW, BudgetSettings(), {}
        )
    assert found == [(), ()]
    assert await pool.fetchval("select budget_id from customers where user_id = 'new'") is None
