"""Budget leases: a process admits in memory from budget leased to it, its settles draw the lease
down exactly, it never admits past a budget (one process or two), and it takes no lease where it
could not decide as `sl_admit` does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import msgspec
import pytest

from spendledger.ledger.admission import Admission, Admitted, Refused, admit_request
from spendledger.ledger.directory import create_customer, set_customer_blocked
from spendledger.ledger.events import CustomerCreated
from spendledger.ledger.leases import HOLDS_PER_LEASE, SHARE, BudgetLeases
from spendledger.ledger.usage import NO_CONTEXT, Recording, record_usages
from tests.integration.ledger.test_group_admitter import HOLD, admission, held
from tests.integration.ledger.test_group_recorder import usage


async def customer_with(pool: asyncpg.Pool, customer: str, limits: dict[str, Any]) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await create_customer(conn, CustomerCreated(user_id=customer), limits, "test", datetime.now(UTC))


@pytest.fixture
async def leases(pool: asyncpg.Pool) -> AsyncIterator[BudgetLeases]:
    manager = BudgetLeases(pool)
    manager.start()
    yield manager
    await manager.stop()


async def leased(leases: BudgetLeases, request: Admission) -> Admitted:
    """Admit `request` once this process holds a lease for its scopes (granted in the background)."""
    for _ in range(1000):
        outcome = await leases.admit(request)
        if outcome is not None:
            return outcome
        await asyncio.sleep(0.01)
    raise AssertionError("no lease was granted")


async def lease_rows(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch("select call_id, amount from holds where call_id like 'lease:%' order by created_at")


async def settle(pool: asyncpg.Pool, outcomes: list[tuple[Admission, Admitted]], cost: Decimal) -> None:
    """Record the requests in one batch (or alone, for one) with their leases in the metadata."""
    await record_usages(
        pool,
        [
            Recording(
                event=msgspec.structs.replace(usage(a.call_id, a.scopes.customer_id or ""), cost=cost,
                                              budget_periods=o.budget_periods),
                metadata={"lease": o.lease} if o.lease else {},
            )
            for a, o in outcomes
        ],
        NO_CONTEXT,
    )


async def test_a_lease_admits_in_memory_and_its_settles_draw_it_down_exactly(
    pool: asyncpg.Pool, leases: BudgetLeases
) -> None:
    await customer_with(pool, "leased", {"max_budget": HOLD * 10_000})
    assert await leases.admit(admission("first", "leased")) is None  # one by one, and a lease is asked for
    first = await admit_request(pool, admission("first", "leased"))
    assert isinstance(first, Admitted) and first.lease is None
    requests = [admission(f"r-{i}", "leased") for i in range(5)]
    outcomes = [(requests[0], await leased(leases, requests[0]))]
    outcomes += [(r, o) for r in requests[1:] if (o := await leases.admit(r)) is not None]
    assert len(outcomes) == 5 and len({o.lease for _, o in outcomes}) == 1
    (lease,) = await lease_rows(pool)
    assert lease["amount"] == HOLD * HOLDS_PER_LEASE  # below a quarter of the room
    assert await pool.fetchval("select count(*) from holds") == 2  # the lease and the first request's hold
    assert await held(pool, "leased") == HOLD + lease["amount"]

    cost = Decimal("0.003")
    await settle(pool, outcomes[:1], cost)  # alone: sl_record_usage
    await settle(pool, outcomes[1:], cost)  # a batch: sl_record_usages
    for request, _ in outcomes:
        leases.finished(lease["call_id"], request.hold, cost)
    (after,) = await lease_rows(pool)
    assert after["amount"] == lease["amount"] - 5 * cost
    assert await held(pool, "leased") == HOLD + lease["amount"] - 5 * cost
    assert await pool.fetchval("select spent from budget_usage where scope = 'customer'") == 5 * cost

    await leases.stop()  # retires the lease: what it still holds goes back
    assert await lease_rows(pool) == []
    assert await held(pool, "leased") == HOLD  # the first request's own hold is still in flight


async def test_a_lease_takes_at_most_a_quarter_of_the_room(pool: asyncpg.Pool, leases: BudgetLeases) -> None:
    await customer_with(pool, "small", {"max_budget": HOLD * 40})
    await leases.admit(admission("ask", "small"))
    await leased(leases, admission("r", "small"))
    (lease,) = await lease_rows(pool)
    assert lease["amount"] == HOLD * 40 * SHARE


@pytest.mark.parametrize(
    "limits",
    [
        {"max_budget": HOLD * 20},  # room for fewer than MIN_HOLDS after the quarter
        {"max_budget": HOLD * 1000, "rpm_limit": 100},
        {"max_budget": HOLD * 1000, "tpm_limit": 10_000},
        {"max_budget": HOLD * 1000, "max_parallel_requests": 10},
    ],
    ids=["near-the-limit", "rpm", "tpm", "parallel"],
)
async def test_no_lease_where_requests_must_go_one_by_one(
    pool: asyncpg.Pool, leases: BudgetLeases, limits: dict[str, Any]
) -> None:
    await customer_with(pool, "one-by-one", limits)
    for i in range(5):
        assert await leases.admit(admission(f"r-{i}", "one-by-one")) is None
        await asyncio.sleep(0.02)
    assert await lease_rows(pool) == []
    assert await held(pool, "one-by-one") == 0


async def test_no_lease_for_a_blocked_customer_nor_a_refused_model(pool: asyncpg.Pool, leases: BudgetLeases) -> None:
    await customer_with(pool, "blocked", {"max_budget": HOLD * 1000})
    async with pool.acquire() as conn, conn.transaction():
        await set_customer_blocked(conn, "blocked", True, "test", datetime.now(UTC))
    for i in range(3):
        assert await leases.admit(admission(f"b-{i}", "blocked")) is None
        await asyncio.sleep(0.02)
    assert await lease_rows(pool) == []
    refused = await admit_request(pool, admission("b-9", "blocked"))
    assert isinstance(refused, Refused) and refused.reason == "customer_blocked"


async def test_a_lease_that_cannot_take_a_request_gives_its_room_back_first(
    pool: asyncpg.Pool, leases: BudgetLeases
) -> None:
    await customer_with(pool, "exhausted", {"max_budget": HOLD * 1000})
    await leases.admit(admission("ask", "exhausted"))
    await leased(leases, admission("r-0", "exhausted"))
    big = msgspec.structs.replace(admission("big", "exhausted"), hold=HOLD * HOLDS_PER_LEASE)
    assert await leases.admit(big) is None  # does not fit beside r-0: the lease retires
    (lease,) = await lease_rows(pool)
    assert lease["amount"] == HOLD  # only what r-0 took is still held
    assert await held(pool, "exhausted") == HOLD
    leases.finished(lease["call_id"], HOLD, Decimal(0))  # r-0 ends: the rest is released
    for _ in range(100):
        if not await lease_rows(pool):
            break
        await asyncio.sleep(0.01)
    assert await lease_rows(pool) == [] and await held(pool, "exhausted") == 0


async def test_invalidation_retires_every_lease(pool: asyncpg.Pool, leases: BudgetLeases) -> None:
    await customer_with(pool, "changed", {"max_budget": HOLD * 1000})
    await leases.admit(admission("ask", "changed"))
    await leased(leases, admission("r-0", "changed"))
    leases.invalidate()
    assert await leases.admit(admission("r-1", "changed")) is None
    (lease,) = await lease_rows(pool)
    leases.finished(lease["call_id"], HOLD, HOLD)
    await leases.stop()
    assert await lease_rows(pool) == []


async def test_changes_to_scopes_are_announced(pool: asyncpg.Pool, database_url: str) -> None:
    heard: list[str] = []
    listener = await asyncpg.connect(database_url)
    try:
        await listener.add_listener("sl_scope_changed", lambda *args: heard.append(args[3]))
        await customer_with(pool, "announced", {"max_budget": Decimal(1)})  # its own budget row too
        async with pool.acquire() as conn, conn.transaction():
            await set_customer_blocked(conn, "announced", True, "test", datetime.now(UTC))
        for _ in range(100):
            if len(heard) >= 3:
                break
            await asyncio.sleep(0.01)
    finally:
        await listener.close()
    assert sorted(heard[:2]) == ["budgets", "customers"] and heard[2:] == ["customers"]


async def test_two_processes_with_leases_never_admit_past_a_budget(database_url: str) -> None:
    """Two processes race 600 requests at a budget with room for 100 holds; every admitted request
    settles at its whole hold (the worst case): the spend never passes the budget."""
    pools = [await asyncpg.create_pool(database_url, min_size=2, max_size=8) for _ in range(2)]
    managers = [BudgetLeases(p) for p in pools]
    try:
        await customer_with(pools[0], "contested", {"max_budget": HOLD * 100})
        for manager in managers:
            manager.start()
        # Each process holds a lease before the race: a grant comes in the background, and on a
        # loaded machine all 600 could otherwise go by round trip before one arrives.
        for n, (pool, manager) in enumerate(zip(pools, managers, strict=True)):
            warm = admission(f"warm-{n}", "contested")
            outcome = await leased(manager, warm)
            await settle(pool, [(warm, outcome)], HOLD)
            assert outcome.lease is not None
            manager.finished(outcome.lease, HOLD, HOLD)
        under_lease = 0

        async def request(n: int) -> bool:
            nonlocal under_lease
            await asyncio.sleep(0.0005 * n)  # arrivals spread over 0.3 s
            pool, manager = pools[n % 2], managers[n % 2]
            one = admission(f"c-{n}", "contested")
            outcome = await manager.admit(one) or await admit_request(pool, one)
            if isinstance(outcome, Refused):
                return False
            under_lease += outcome.lease is not None
            await asyncio.sleep(0.001 * (n % 5))  # upstream time
            await settle(pool, [(one, outcome)], HOLD)
            if outcome.lease:
                manager.finished(outcome.lease, HOLD, HOLD)
            return True

        admitted = 2 + sum(await asyncio.gather(*(request(n) for n in range(600))))
        for manager in managers:
            await manager.stop()
        spent = await pools[0].fetchval("select spent from budget_usage where scope = 'customer'")
        assert spent == HOLD * admitted <= HOLD * 100
        assert under_lease > 0  # the leases were used, not only the round trips
        assert admitted >= 75  # early refusals only near the limit, and bounded by a lease's share
        assert await held(pools[0], "contested") == 0
        assert await pools[0].fetchval("select count(*) from holds") == 0
    finally:
        for pool in pools:
            await pool.close()


async def test_one_process_with_leases_admits_exactly_what_the_budget_holds(
    pool: asyncpg.Pool, leases: BudgetLeases
) -> None:
    """Requests one after another, each settling at its whole hold: exactly 100 fit, as without leases."""
    await customer_with(pool, "exact", {"max_budget": HOLD * 100})
    admitted = under_lease = 0
    for n in range(130):
        one = admission(f"e-{n}", "exact")
        outcome = await leases.admit(one) or await admit_request(pool, one)
        if isinstance(outcome, Admitted):
            admitted += 1
            under_lease += outcome.lease is not None
            await settle(pool, [(one, outcome)], HOLD)
            if outcome.lease:
                leases.finished(outcome.lease, HOLD, HOLD)
        await asyncio.sleep(0.002)  # let a lease be granted now and then
    assert admitted == 100 and under_lease > 50
    await leases.stop()
    assert await held(pool, "exact") == 0


async def test_an_abandoned_lease_is_released_by_the_hold_sweeper(pool: asyncpg.Pool) -> None:
    manager = BudgetLeases(pool)  # a process that dies with its lease: never stopped
    await customer_with(pool, "orphan", {"max_budget": HOLD * 1000})
    await manager.admit(admission("ask", "orphan"))
    await leased(manager, admission("r-0", "orphan"))
    assert await held(pool, "orphan") > 0
    await pool.execute("update holds set expires_at = now() - interval '1 second'")
    assert await pool.fetchval("select sl_expire_holds()") == 1
    assert await held(pool, "orphan") == 0
