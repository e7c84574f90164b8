"""The admin UI benchmark's seed (scripts/bench/ui_pages.py) makes what it reports, through the
ledger's write path: the customers and usage events asked for, every projection agreeing with the
log (spend_totals, daily_spend), a Lago row per event, budget periods on the budgeted scopes."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from scripts.bench.ui_pages import TIERS, config_text, customer_id, lago_env, search_text, seed
from spendledger.ledger.config import load_settings
from spendledger.projections.daily import follow_once


@pytest.mark.parametrize(("customers", "expected"), [(10_000, "-050"), (1_000, "-0050"), (100, "-00050")])
def test_the_search_text_matches_about_one_percent_of_the_customer_ids(customers: int, expected: str) -> None:
    assert search_text(customers) == expected
    matching = sum(expected in customer_id(i, customers) for i in range(customers))
    assert matching == max(customers // 100, 1)


async def test_the_seed_makes_the_counts_asked_for_and_its_projections_agree_with_the_log(
    database_url: str, tmp_path: Path
) -> None:
    config = tmp_path / "spendledger.yaml"
    config.write_text(config_text("sk-test-ui-bench-not-public"))
    settings = load_settings(config, lago_env("http://127.0.0.1:1"))
    seeded = await seed(database_url, settings, customers=40, events=600)
    assert (seeded.customers, seeded.events) == (40, 600)
    assert seeded.biggest[1] >= seeded.smallest[1] >= 1
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("select count(*) from customers") == 40
        assert await conn.fetchval("select count(*) from events where type = 'CustomerCreated'") == 40
        assert await conn.fetchval("select count(*) from budgets") == seeded.budgets >= len(TIERS)
        assert await conn.fetchval("select count(*) from keys") == seeded.keys
        assert await conn.fetchval("select count(*) from events where type = 'UsageRecorded'") == 600
        assert await conn.fetchval("select count(*) from outbox where sink = 'lago'") == 600
        logged = await conn.fetchval("select sum((data->>'cost')::numeric) from events where type = 'UsageRecorded'")
        assert logged > Decimal(0)
        for scope in ("customer", "model", "key"):
            total = await conn.fetchval("select sum(spend) from spend_totals where scope = $1", scope)
            assert total == logged, scope
        assert await follow_once(conn) == 0  # the daily spend follower has caught up
        daily = await conn.fetchval("select sum(spend) from daily_spend where scope = 'customer'")
        assert daily == logged
        days = await conn.fetchval("select count(distinct day) from daily_spend")
        assert days >= 25  # spread over the last 30 days
        # Admission's budget periods: every customer has a budget (a tier or its own), so every event
        # of a customer counts in one of its customer's budget periods.
        periods = await conn.fetchval("select sum(spent) from budget_usage where scope = 'customer'")
        assert periods == logged
    finally:
        await conn.close()
