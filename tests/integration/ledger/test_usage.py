"""`ledger.usage.record_usage` on a real PostgreSQL: one round trip appends the terminal event,
creates the customer on first sight, and projects exact spend totals, under heavy concurrency."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from spendledger.ledger import store
from spendledger.ledger.events import CustomerCreated, UsageRecorded
from spendledger.ledger.money import ZERO, add, cost_of
from spendledger.ledger.usage import Recording, RecordingContext, record_usage, record_usages

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
KEY_A = "a" * 64
KEY_B = "b" * 64


def usage(call_id: str, **fields: Any) -> UsageRecorded:
    values: dict[str, Any] = {
        "call_id": call_id,
        "route": "chat.completions",
        "model_group": "gpt-4o-mini",
        "deployment_id": "dep-1",
        "provider": "openai",
        "upstream_model": "gpt-4o-mini",
        "key_hash": KEY_A,
        "status": "success",
        "http_status": 200,
        "input_tokens": 10,
        "output_tokens": 5,
        "total_tokens": 15,
        "input_cost_per_token": Decimal("0.0000015"),
        "output_cost_per_token": Decimal("0.000002"),
        "cost": Decimal("0.0011120000000000001"),
        "priced": True,
        "started_at": T0,
        "ended_at": T0 + timedelta(seconds=1),
    }
    values.update(fields)
    return UsageRecorded(**values)


async def spend(pool: asyncpg.Pool, scope: str, scope_id: str) -> asyncpg.Record | None:
    return await pool.fetchrow(
        "select spend, requests, input_tokens, output_tokens, last_at from spend_totals "
        "where scope = $1 and scope_id = $2",
        scope,
        scope_id,
    )


async def all_spend(pool: asyncpg.Pool) -> dict[tuple[str, str], tuple[Decimal, int, int, int]]:
    rows = await pool.fetch("select * from spend_totals")
    return {
        (r["scope"], r["scope_id"]): (r["spend"], r["requests"], r["input_tokens"], r["output_tokens"])
        for r in rows
    }


async def event_types(pool: asyncpg.Pool) -> list[tuple[str, str]]:
    rows = await pool.fetch("select stream, type from events order by position")
    return [(r["stream"], r["type"]) for r in rows]


async def test_first_call_writes_usage_and_creates_the_customer(pool: asyncpg.Pool) -> None:
    event = usage("call-1", customer_id="acme", user_id="u1", team_id="t1")
    key_spend = await record_usage(
        pool, event, RecordingContext(default_budget_id="tier-default"), metadata={"request_id": "r-1"}
    )

    assert key_spend == Decimal("0.0011120000000000001")
    assert await event_types(pool) == [
        ("customer:acme", "CustomerCreated"),
        ("request:call-1", "UsageRecorded"),
    ]

    async with pool.acquire() as conn:
        (created,) = await store.read_stream(conn, "customer:acme")
        (recorded,) = await store.read_stream(conn, "request:call-1")
    assert isinstance(created.event, CustomerCreated)
    assert created.event.user_id == "acme"
    assert created.event.budget_id == "tier-default"
    assert created.event.source == "first_sight"
    assert created.event.blocked is False
    assert created.version == 1
    assert recorded.event == event  # the stored event decodes to exactly what was recorded
    assert recorded.metadata == {"request_id": "r-1"}
    assert created.metadata == {"request_id": "r-1"}

    customer = await pool.fetchrow("select * from customers where user_id = 'acme'")
    assert customer is not None
    assert customer["budget_id"] == "tier-default"
    assert customer["blocked"] is False


async def test_second_call_for_a_known_customer_creates_nothing_more(pool: asyncpg.Pool) -> None:
    await record_usage(
        pool, usage("call-1", customer_id="acme"), RecordingContext(default_budget_id="tier-default")
    )
    key_spend = await record_usage(
        pool, usage("call-2", customer_id="acme"), RecordingContext(default_budget_id="another-default")
    )

    assert key_spend == Decimal("0.0022240000000000002")
    assert await event_types(pool) == [
        ("customer:acme", "CustomerCreated"),
        ("request:call-1", "UsageRecorded"),
        ("request:call-2", "UsageRecorded"),
    ]
    assert await pool.fetchval("select count(*) from customers") == 1
    # the budget of first sight stays; a later default does not overwrite it
    assert await pool.fetchval("select budget_id from customers where user_id = 'acme'") == "tier-default"


async def test_no_customer_no_customer_row(pool: asyncpg.Pool) -> None:
    await record_usage(
        pool, usage("call-1", customer_id=None), RecordingContext(default_budget_id="tier-default")
    )
    assert await pool.fetchval("select count(*) from customers") == 0
    assert await event_types(pool) == [("request:call-1", "UsageRecorded")]
    assert await spend(pool, "customer", "acme") is None


async def test_customer_without_default_budget(pool: asyncpg.Pool) -> None:
    await record_usage(pool, usage("call-1", customer_id="solo"))
    assert await pool.fetchval("select budget_id from customers where user_id = 'solo'") is None
    async with pool.acquire() as conn:
        (created,) = await store.read_stream(conn, "customer:solo")
    assert isinstance(created.event, CustomerCreated)
    assert created.event.budget_id is None


async def test_record_usage_on_a_connection_inside_a_transaction(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        async with conn.transaction():
            await record_usage(conn, usage("call-1", customer_id="c"))
            await record_usage(conn, usage("call-2", customer_id="c"))
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                await record_usage(conn, usage("call-3", customer_id="d"))
                raise RuntimeError("caller gives up")
    assert [s for s, _ in await event_types(pool)] == ["customer:c", "request:call-1", "request:call-2"]
    assert (await spend(pool, "key", KEY_A))["requests"] == 2  # type: ignore[index]


async def test_spend_totals_per_scope_are_exact_sums(pool: asyncpg.Pool) -> None:
    rng = random.Random(20261130)
    expected: dict[tuple[str, str], list[UsageRecorded]] = {}
    events = []
    for i in range(60):
        price_in = Decimal(rng.randint(1, 10**9)) / Decimal(10**15)
        price_out = Decimal(rng.randint(1, 10**9)) / Decimal(10**15)
        input_tokens, output_tokens = rng.randint(0, 100_000), rng.randint(0, 10_000)
        event = usage(
            f"call-{i}",
            key_hash=rng.choice([KEY_A, KEY_B]),
            user_id=rng.choice(["u1", "u2", None]),
            team_id=rng.choice(["t1", None]),
            customer_id=rng.choice(["acme", "globex", None]),
            model_group=rng.choice(["gpt-4o-mini", "gpt-4o"]),
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            total_tokens=input_tokens + output_tokens,
            input_cost_per_token=price_in,
            output_cost_per_token=price_out,
            cost=add(cost_of(input_tokens, price_in), cost_of(output_tokens, price_out)),
        )
        events.append(event)
        for scope, scope_id in (
            ("key", event.key_hash),
            ("user", event.user_id),
            ("team", event.team_id),
            ("customer", event.customer_id),
            ("model", event.model_group),
        ):
            if scope_id is not None:
                expected.setdefault((scope, scope_id), []).append(event)

    last_key_spend: dict[str, Decimal] = {}
    for event in events:
        returned = await record_usage(pool, event)
        assert returned is not None
        last_key_spend[event.key_hash] = returned

    totals = await all_spend(pool)
    assert set(totals) == set(expected)
    for scope_key, scoped in expected.items():
        assert totals[scope_key] == (
            add(*[e.cost for e in scoped]),
            len(scoped),
            sum(e.input_tokens for e in scoped),
            sum(e.output_tokens for e in scoped),
        ), scope_key
    for key_hash, returned in last_key_spend.items():
        assert returned == totals[("key", key_hash)][0]
    assert {k for k, v in totals.items() if v[0] == ZERO} == set()


async def test_zero_cost_and_unpriced_usage_still_counts_requests(pool: asyncpg.Pool) -> None:
    await record_usage(pool, usage("free", cost=Decimal(0), priced=False, input_cost_per_token=None))
    row = await spend(pool, "key", KEY_A)
    assert row is not None
    assert row["spend"] == ZERO and row["requests"] == 1
    assert row["input_tokens"] == 10 and row["output_tokens"] == 5


async def test_200_concurrent_records_for_one_customer_and_key_are_exact(pool: asyncpg.Pool) -> None:
    n = 200
    unit = Decimal("0.0011120000000000001")
    events = [
        usage(f"call-{i}", customer_id="hot-customer", user_id="hot-user", team_id="hot-team", cost=unit)
        for i in range(n)
    ]
    results = await asyncio.wait_for(
        asyncio.gather(
            *(record_usage(pool, e, RecordingContext(default_budget_id="tier-default")) for e in events)
        ),
        timeout=120,
    )

    total = unit * n
    assert total == Decimal("0.2224000000000000200")
    assert max(r for r in results if r is not None) == total
    assert len(set(results)) == n  # every call saw its own running total
    for scope, scope_id in [
        ("key", KEY_A),
        ("customer", "hot-customer"),
        ("user", "hot-user"),
        ("team", "hot-team"),
        ("model", "gpt-4o-mini"),
    ]:
        row = await spend(pool, scope, scope_id)
        assert row is not None, scope
        assert (row["spend"], row["requests"], row["input_tokens"], row["output_tokens"]) == (
            total,
            n,
            10 * n,
            5 * n,
        ), scope
    assert await pool.fetchval("select count(*) from events where type = 'UsageRecorded'") == n
    assert await pool.fetchval("select count(*) from events where type = 'CustomerCreated'") == 1
    assert await pool.fetchval("select count(*) from customers") == 1
    assert await pool.fetchval("select sum((data->>'cost')::numeric) from events") == total


async def test_concurrent_first_sight_of_many_customers_creates_each_once(pool: asyncpg.Pool) -> None:
    events = [usage(f"call-{i}", customer_id=f"cust-{i % 7}", key_hash=f"k{i % 3}") for i in range(140)]
    random.Random(7).shuffle(events)
    await asyncio.wait_for(
        asyncio.gather(*(record_usage(pool, e, RecordingContext(default_budget_id="d")) for e in events)),
        timeout=120,
    )
    created = await pool.fetch("select stream, version from events where type = 'CustomerCreated'")
    assert sorted(r["stream"] for r in created) == [f"customer:cust-{i}" for i in range(7)]
    assert {r["version"] for r in created} == {1}
    assert await pool.fetchval("select count(*) from customers where budget_id = 'd'") == 7
    for i in range(7):
        row = await spend(pool, "customer", f"cust-{i}")
        assert row is not None and row["requests"] == 20


async def test_a_failing_record_leaves_no_partial_rows(pool: asyncpg.Pool) -> None:
    await record_usage(
        pool,
        usage("dup", customer_id="acme", user_id="u1"),
        RecordingContext(default_budget_id="tier-default"),
    )
    events_before = await pool.fetch("select * from events order by position")
    customers_before = await pool.fetch("select * from customers order by user_id")
    spend_before = await all_spend(pool)

    # same call_id again, naming a new customer, user, team and key: refused as a whole
    again = usage("dup", customer_id="newco", user_id="u2", team_id="t9", key_hash=KEY_B, cost=Decimal("5"))
    with pytest.raises(asyncpg.UniqueViolationError):
        await record_usage(pool, again, RecordingContext(default_budget_id="tier-default"))
    async with pool.acquire() as conn, conn.transaction():
        with pytest.raises(asyncpg.UniqueViolationError):
            await record_usage(conn, again, RecordingContext(default_budget_id="tier-default"))

    assert await pool.fetch("select * from events order by position") == events_before
    assert await pool.fetch("select * from customers order by user_id") == customers_before
    assert await all_spend(pool) == spend_before
    assert await pool.fetchval("select count(*) from customers where user_id = 'newco'") == 0

    # and the ledger carries on normally afterwards
    await record_usage(
        pool, usage("after", customer_id="newco"), RecordingContext(default_budget_id="tier-default")
    )
    assert await pool.fetchval("select count(*) from customers where user_id = 'newco'") == 1


async def test_batches_first_see_each_customer_once_and_skip_those_seen_before(pool: asyncpg.Pool) -> None:
    context = RecordingContext(default_budget_id="d")
    await record_usage(pool, usage("before", customer_id="cust-0"), context)  # seen before the batches
    events = [usage(f"batch-call-{i}", customer_id=f"cust-{i % 7}", key_hash=f"k{i % 3}") for i in range(140)]
    random.Random(11).shuffle(events)
    batches = [events[lo : lo + 20] for lo in range(0, len(events), 20)]
    await asyncio.wait_for(
        asyncio.gather(*(record_usages(pool, [Recording(event=e) for e in batch], context) for batch in batches)),
        timeout=120,
    )
    created = await pool.fetch("select stream, version from events where type = 'CustomerCreated'")
    assert sorted(r["stream"] for r in created) == [f"customer:cust-{i}" for i in range(7)]
    assert {r["version"] for r in created} == {1}
    for i in range(7):
        row = await spend(pool, "customer", f"cust-{i}")
        assert row is not None and row["requests"] == 20 + (1 if i == 0 else 0)
