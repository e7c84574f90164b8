"""Group commit: concurrent settles share transactions, stay exact, and fail only their own caller."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from spendledger.ledger.admission import Admission, Admitted, admit_request
from spendledger.ledger.directory import create_customer
from spendledger.ledger.events import CustomerCreated, KeyGenerated, UsageRecorded
from spendledger.ledger.keys import generate_key, hash_key
from spendledger.ledger.scopes import Scopes
from spendledger.ledger.usage import NO_CONTEXT, GroupRecorder, Recording

COST = Decimal("0.000123456789")


def usage(
    call_id: str, customer: str, key_hash: str = "k" * 64, periods: tuple[tuple[str, str, str], ...] = ()
) -> UsageRecorded:
    now = datetime.now(UTC)
    return UsageRecorded(
        call_id=call_id,
        route="chat.completions",
        model_group="m",
        deployment_id="d",
        provider="openai",
        upstream_model="m",
        key_hash=key_hash,
        customer_id=customer,
        status="success",
        http_status=200,
        input_tokens=3,
        output_tokens=2,
        total_tokens=5,
        cost=COST,
        priced=True,
        started_at=now,
        ended_at=now,
        budget_periods=periods,
    )


async def test_concurrent_recordings_are_batched_and_exact(pool: asyncpg.Pool) -> None:
    recorder = GroupRecorder(pool, NO_CONTEXT, max_batch=32)
    recorder.start()
    try:
        await asyncio.gather(
            *(recorder.record(Recording(event=usage(f"call-{i}", f"c{i % 5}"))) for i in range(300))
        )
    finally:
        await recorder.stop()
    assert await pool.fetchval("select count(*) from events where type = 'UsageRecorded'") == 300
    assert await pool.fetchval("select spend from spend_totals where scope = 'key'") == COST * 300
    # Fewer transactions than recordings: the events share transaction ids.
    assert await pool.fetchval("select count(distinct txid) from events where type = 'UsageRecorded'") < 300


async def test_a_bad_recording_fails_only_its_own_caller(pool: asyncpg.Pool) -> None:
    recorder = GroupRecorder(pool, NO_CONTEXT)
    recorder.start()
    try:
        await recorder.record(Recording(event=usage("taken", "c")))
        results = await asyncio.gather(
            *(recorder.record(Recording(event=usage(call_id, "c"))) for call_id in ("a", "taken", "b", "c2")),
            return_exceptions=True,
        )
    finally:
        await recorder.stop()
    assert isinstance(results[1], asyncpg.UniqueViolationError)
    others = [r for i, r in enumerate(results) if i != 1]
    assert sorted(others) == [COST * n for n in (2, 3, 4)]  # running key totals, whatever the order
    assert await pool.fetchval("select count(*) from events where type = 'UsageRecorded'") == 4
    assert (
        await pool.fetchval("select spend from spend_totals where scope = 'customer' and scope_id = 'c'")
        == COST * 4
    )


async def test_parallel_slots_and_budgets_settle_without_deadlock(pool: asyncpg.Pool) -> None:
    """A key with a parallel limit and a customer with a budget: admissions and batched settles
    take their rows in one order, so none waits for the other in a cycle."""
    now = datetime.now(UTC)
    async with pool.acquire() as conn, conn.transaction():
        spec = KeyGenerated(
            key_hash=hash_key("sk-parallel"), key_name="sk-...llel", max_parallel_requests=1000
        )
        await generate_key(conn, spec, "sk-parallel", "test", now)
        await create_customer(
            conn, CustomerCreated(user_id="budgeted"), {"max_budget": Decimal(1000)}, "test", now
        )
    recorder = GroupRecorder(pool, NO_CONTEXT)
    recorder.start()

    async def one(i: int) -> None:
        admission = Admission(
            call_id=f"p-{i}",
            route="chat.completions",
            model="m",
            scopes=Scopes(spec.key_hash, customer_id="budgeted"),
            hold=Decimal("0.01"),
            expires_at=now + timedelta(hours=1),
            refused_at=now,
        )
        outcome = await admit_request(pool, admission)
        assert isinstance(outcome, Admitted)
        await recorder.record(
            Recording(event=usage(f"p-{i}", "budgeted", spec.key_hash, outcome.budget_periods))
        )

    try:
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(200))), timeout=60)
    finally:
        await recorder.stop()
    row = await pool.fetchrow(
        "select spent, held from budget_usage where scope = 'customer' and scope_id = 'budgeted'"
    )
    assert row is not None and row["spent"] == COST * 200 and row["held"] == 0
    assert await pool.fetchval("select count from in_flight where scope = 'key'") == 0


@pytest.mark.parametrize("size", [1, 7])
async def test_record_without_start_records_alone(pool: asyncpg.Pool, size: int) -> None:
    recorder = GroupRecorder(pool, NO_CONTEXT)
    for i in range(size):
        assert await recorder.record(Recording(event=usage(f"alone-{i}", "solo"))) == COST * (i + 1)
