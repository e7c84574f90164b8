"""Admission batches: requests with the same scopes share a transaction, stay strict, and fail only
their own caller; requests with other scopes, and settles, run beside them without deadlock."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg

from spendledger.ledger.admission import Admission, Admitted, GroupAdmitter, Refused, admit_requests
from spendledger.ledger.directory import create_customer
from spendledger.ledger.events import CustomerCreated, KeyGenerated
from spendledger.ledger.keys import generate_key, hash_key
from spendledger.ledger.scopes import Scopes
from spendledger.ledger.usage import NO_CONTEXT, GroupRecorder, Recording
from tests.integration.ledger.test_group_recorder import COST, usage

HOLD = Decimal("0.01")


def admission(call_id: str, customer: str, key_hash: str = "k" * 64) -> Admission:
    now = datetime.now(UTC)
    return Admission(
        call_id=call_id,
        route="chat.completions",
        model="m",
        scopes=Scopes(key_hash, customer_id=customer),
        hold=HOLD,
        expires_at=now + timedelta(hours=1),
        refused_at=now,
    )


async def budgeted(pool: asyncpg.Pool, customer: str, max_budget: Decimal) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await create_customer(
            conn, CustomerCreated(user_id=customer), {"max_budget": max_budget}, "test", datetime.now(UTC)
        )


async def held(pool: asyncpg.Pool, customer: str) -> Decimal:
    value = await pool.fetchval(
        "select coalesce(sum(held), 0) from budget_usage where scope = 'customer' and scope_id = $1", customer
    )
    return Decimal(value)


async def test_a_batch_admits_in_order_until_the_budget_is_held(pool: asyncpg.Pool) -> None:
    await budgeted(pool, "room-for-3", HOLD * 3)
    outcomes = await admit_requests(pool, [admission(f"b-{i}", "room-for-3") for i in range(5)])
    assert [type(o) for o in outcomes] == [Admitted] * 3 + [Refused] * 2
    assert all(o.reason == "budget_exceeded" for o in outcomes if isinstance(o, Refused))
    assert await held(pool, "room-for-3") == HOLD * 3
    refused = await pool.fetch("select stream from events where type = 'RequestRefused' order by stream")
    assert [r["stream"] for r in refused] == ["request:b-3", "request:b-4"]
    assert await pool.fetchval("select count(*) from holds") == 3


async def test_concurrent_admissions_share_transactions_and_stay_strict(pool: asyncpg.Pool) -> None:
    await budgeted(pool, "room-for-40", HOLD * 40)
    admitter = GroupAdmitter(pool, max_batch=16)
    outcomes = await asyncio.gather(*(admitter.admit(admission(f"c-{i}", "room-for-40")) for i in range(100)))
    await admitter.stop()
    assert sum(isinstance(o, Admitted) for o in outcomes) == 40
    assert await held(pool, "room-for-40") == HOLD * 40
    # Batches: the 60 refusals were appended by fewer transactions than requests.
    refusals = await pool.fetchrow(
        "select count(*) as n, count(distinct txid) as transactions from events where type = 'RequestRefused'"
    )
    assert refusals is not None and refusals["n"] == 60 and refusals["transactions"] < 60


async def test_a_bad_admission_fails_only_its_own_caller(pool: asyncpg.Pool) -> None:
    """Two refusals of one call id cannot both append RequestRefused: the batch fails, and each
    request is then admitted alone."""
    await budgeted(pool, "full", Decimal(0))
    await budgeted(pool, "open", Decimal(1000))
    admitter = GroupAdmitter(pool)
    same = [admission("dup", "full"), admission("ok-1", "full"), admission("dup", "full")]
    results = await asyncio.gather(*(admitter.admit(a) for a in same), return_exceptions=True)
    await admitter.stop()
    assert isinstance(results[0], Refused) and isinstance(results[1], Refused)
    assert isinstance(results[2], asyncpg.UniqueViolationError)
    assert await pool.fetchval("select count(*) from events where type = 'RequestRefused'") == 2


async def test_mixed_scopes_with_settles_never_deadlock(pool: asyncpg.Pool) -> None:
    """Keys with parallel limits, customers with budgets, admissions in batches per scope set and
    settles in group commits, all at once: every request settles, the sums are exact."""
    now = datetime.now(UTC)
    keys = []
    async with pool.acquire() as conn, conn.transaction():
        for k in range(3):
            spec = KeyGenerated(key_hash=hash_key(f"sk-{k}"), key_name=f"sk-{k}", max_parallel_requests=1000)
            await generate_key(conn, spec, f"sk-{k}", "test", now)
            keys.append(spec.key_hash)
    for c in range(3):
        await budgeted(pool, f"cust-{c}", Decimal(1000))
    admitter, recorder = GroupAdmitter(pool), GroupRecorder(pool, NO_CONTEXT)
    recorder.start()

    async def one(i: int) -> None:
        key, customer = keys[i % 3], f"cust-{(i // 3) % 3}"
        outcome = await admitter.admit(admission(f"m-{i}", customer, key))
        assert isinstance(outcome, Admitted)
        await recorder.record(Recording(event=usage(f"m-{i}", customer, key, outcome.budget_periods)))

    try:
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(450))), timeout=120)
    finally:
        await admitter.stop()
        await recorder.stop()
    rows = await pool.fetch("select spent, held from budget_usage where scope = 'customer'")
    assert sorted(r["spent"] for r in rows) == [COST * 150] * 3
    assert all(r["held"] == 0 for r in rows)
    assert await pool.fetchval("select sum(count) from in_flight where scope = 'key'") == 0
