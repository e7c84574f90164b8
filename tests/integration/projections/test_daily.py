"""The daily spend follower: exactly once across crashes, and behind writers that commit out of order."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg

from spendledger.ledger.events import UsageRecorded
from spendledger.ledger.usage import record_usage
from spendledger.projections.daily import catch_up, follow_once


def usage(call_id: str, customer: str, cost: str) -> UsageRecorded:
    now = datetime.now(UTC)
    return UsageRecorded(
        call_id=call_id,
        route="chat.completions",
        model_group="m",
        deployment_id="d",
        provider="openai",
        upstream_model="m",
        key_hash="k" * 64,
        customer_id=customer,
        status="success",
        http_status=200,
        input_tokens=2,
        output_tokens=1,
        total_tokens=3,
        cost=Decimal(cost),
        priced=True,
        started_at=now,
        ended_at=now,
    )


async def totals(pool: asyncpg.Pool) -> dict[str, Decimal]:
    rows = await pool.fetch(
        "select scope_id, sum(spend) as spend from daily_spend where scope = 'customer' group by 1"
    )
    return {r["scope_id"]: r["spend"] for r in rows}


async def log_totals(pool: asyncpg.Pool) -> dict[str, Decimal]:
    rows = await pool.fetch(
        "select data->>'customer_id' as c, sum((data->>'cost')::numeric) as spend from events "
        "where type = 'UsageRecorded' group by 1"
    )
    return {r["c"]: r["spend"] for r in rows}


async def test_a_crash_in_the_middle_of_a_batch_resumes_without_double_counting(
    pool: asyncpg.Pool, database_url: str
) -> None:
    for i in range(20):
        await record_usage(pool, usage(f"c-{i}", f"cust-{i % 3}", "0.0000012345"))
    assert await follow_once(pool, batch=7) == 7
    doomed = await asyncpg.connect(database_url)
    transaction = doomed.transaction()
    await transaction.start()
    assert await doomed.fetchval("select sl_follow_daily_spend(5)") == 5  # applied, not committed
    doomed.terminate()  # the process dies before COMMIT
    while (n := await follow_once(pool, batch=4)) != 0:  # -1 until the server has noticed the death
        if n < 0:
            await asyncio.sleep(0.05)
    assert await totals(pool) == await log_totals(pool)
    assert await pool.fetchval("select sum(requests) from daily_spend where scope = 'customer'") == 20
    last = await pool.fetchval("select max(position) from events")
    assert (
        await pool.fetchval("select last_position from projection_checkpoints where name = 'daily_spend'")
        == last
    )


async def test_only_one_follower_works_at_a_time(pool: asyncpg.Pool, database_url: str) -> None:
    await record_usage(pool, usage("one", "solo", "1"))
    holder = await asyncpg.connect(database_url)
    transaction = holder.transaction()
    await transaction.start()
    await holder.execute("select 1 from projection_checkpoints for update")
    assert await follow_once(pool) == -1
    await transaction.rollback()
    await holder.close()
    assert await follow_once(pool) > 0


async def test_events_committed_out_of_order_are_never_skipped(pool: asyncpg.Pool) -> None:
    """A writer that took its txid early and commits late must still be applied."""
    stop = asyncio.Event()

    async def slow_writer(n: int) -> None:
        async with pool.acquire() as conn:
            for i in range(10):
                async with conn.transaction():
                    await conn.execute("select pg_current_xact_id()")  # take a txid now …
                    await asyncio.sleep(0.03 * (n % 3))  # … and append after others did
                    await record_usage(conn, usage(f"w{n}-{i}", f"cust-{n}", "0.001"))

    async def follower() -> None:
        while not stop.is_set():
            await follow_once(pool, batch=3)
            await asyncio.sleep(0.005)

    following = asyncio.create_task(follower())
    await asyncio.gather(*(slow_writer(n) for n in range(6)))
    stop.set()
    await following
    await catch_up(pool)
    assert await totals(pool) == await log_totals(pool)
    assert await pool.fetchval("select sum(requests) from daily_spend where scope = 'customer'") == 60
