"""`ledger.store` on a real PostgreSQL: append/read round trip, optimistic concurrency, an
append-only table, transaction ids on every row."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
import pytest

from spendledger.ledger import store
from spendledger.ledger.events import (
    CustomerCreated,
    KeyBlocked,
    KeyGenerated,
    KeyUnblocked,
    KeyUpdated,
    UsageRecorded,
)
from spendledger.ledger.store import ConcurrencyError

KEY = "b" * 64
T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def usage(call_id: str, cost: str = "0.0011120000000000001") -> UsageRecorded:
    return UsageRecorded(
        call_id=call_id,
        route="chat.completions",
        model_group="m",
        deployment_id="d",
        provider="openai",
        upstream_model="u",
        key_hash=KEY,
        status="success",
        http_status=200,
        input_tokens=3,
        output_tokens=4,
        total_tokens=7,
        cost=Decimal(cost),
        priced=True,
        started_at=T0,
        ended_at=T0,
    )


async def rows(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch("select * from events order by position")


async def test_append_and_read_stream_round_trip(pool: asyncpg.Pool) -> None:
    events = [
        KeyGenerated(key_hash=KEY, key_name="sk-...abcd", max_budget=Decimal("10.5")),
        KeyUpdated(key_hash=KEY, key_alias="renamed"),
        KeyBlocked(key_hash=KEY),
    ]
    async with pool.acquire() as conn, conn.transaction():
        positions = await store.append(conn, f"key:{KEY}", 0, events, {"actor": "test", "n": 1})
    assert len(positions) == 3
    assert positions == sorted(positions)

    async with pool.acquire() as conn:
        stored = await store.read_stream(conn, f"key:{KEY}")
        assert await store.stream_version(conn, f"key:{KEY}") == 3
        assert await store.stream_version(conn, "key:nobody") == 0
        assert await store.read_stream(conn, "key:nobody") == []
    assert [s.event for s in stored] == events
    assert [s.version for s in stored] == [1, 2, 3]
    assert [s.position for s in stored] == positions
    assert {s.stream for s in stored} == {f"key:{KEY}"}
    assert all(s.metadata == {"actor": "test", "n": 1} for s in stored)
    assert all(s.recorded_at.tzinfo is not None for s in stored)

    raw = await rows(pool)
    assert [r["type"] for r in raw] == ["KeyGenerated", "KeyUpdated", "KeyBlocked"]


async def test_append_continues_a_stream_and_read_all_orders_by_position(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await store.append(conn, "key:x", 0, [KeyGenerated(key_hash="x", key_name="n")])
        await store.append(conn, "customer:c", 0, [CustomerCreated(user_id="c")])
        await store.append(conn, "key:x", 1, [KeyBlocked(key_hash="x"), KeyUnblocked(key_hash="x")])
        await store.append(conn, "request:r1", 0, [usage("r1")], None)

        everything = await store.read_all(conn)
        assert [(s.stream, s.version, type(s.event).__name__) for s in everything] == [
            ("key:x", 1, "KeyGenerated"),
            ("customer:c", 1, "CustomerCreated"),
            ("key:x", 2, "KeyBlocked"),
            ("key:x", 3, "KeyUnblocked"),
            ("request:r1", 1, "UsageRecorded"),
        ]
        assert everything[-1].metadata == {}
        positions = [s.position for s in everything]
        assert positions == sorted(positions)

        after = await store.read_all(conn, after_position=positions[1])
        assert [s.position for s in after] == positions[2:]
        limited = await store.read_all(conn, after_position=0, limit=2)
        assert [s.position for s in limited] == positions[:2]
        assert await store.read_all(conn, after_position=positions[-1]) == []


async def test_money_in_events_keeps_exact_digits_in_jsonb(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await store.append(conn, "request:money", 0, [usage("money", "0.0011120000000000001")])
        text = await conn.fetchval("select data->>'cost' from events where stream = 'request:money'")
        as_numeric = await conn.fetchval("select (data->>'cost')::numeric from events")
        (stored,) = await store.read_stream(conn, "request:money")
    assert text == "0.0011120000000000001"
    assert as_numeric == Decimal("0.0011120000000000001")
    assert isinstance(stored.event, UsageRecorded)
    assert stored.event.cost == Decimal("0.0011120000000000001")


async def test_stale_expected_version_raises_concurrency_error(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await store.append(conn, "key:s", 0, [KeyGenerated(key_hash="s", key_name="n")])
        await store.append(conn, "key:s", 1, [KeyBlocked(key_hash="s")])
        for stale in (0, 1):
            with pytest.raises(ConcurrencyError) as caught:
                await store.append(conn, "key:s", stale, [KeyUnblocked(key_hash="s")])
            assert caught.value.stream == "key:s"
            assert caught.value.expected_version == stale
        assert await store.stream_version(conn, "key:s") == 2
        assert len(await store.read_stream(conn, "key:s")) == 2


async def test_expected_version_ahead_of_the_stream_raises_and_leaves_no_gap(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await store.append(conn, "key:g", 0, [KeyGenerated(key_hash="g", key_name="n")])
        with pytest.raises(ConcurrencyError):
            await store.append(conn, "key:g", 5, [KeyBlocked(key_hash="g")])
        with pytest.raises(ConcurrencyError):
            await store.append(conn, "key:new", 1, [KeyGenerated(key_hash="new", key_name="n")])
        assert [s.version for s in await store.read_stream(conn, "key:g")] == [1]
        assert await store.read_stream(conn, "key:new") == []


async def test_a_failed_batch_writes_none_of_its_events(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await store.append(conn, "key:b", 0, [KeyGenerated(key_hash="b", key_name="n")])
        with pytest.raises(ConcurrencyError):
            await store.append(conn, "key:b", 0, [KeyBlocked(key_hash="b"), KeyUnblocked(key_hash="b")])
        assert await store.stream_version(conn, "key:b") == 1
        assert await pool.fetchval("select count(*) from events") == 1


@pytest.mark.parametrize("contenders", [2, 8])
async def test_concurrent_appends_at_one_expected_version_let_exactly_one_win(
    pool: asyncpg.Pool, database_url: str, contenders: int
) -> None:
    async with pool.acquire() as conn:
        await store.append(conn, "key:race", 0, [KeyGenerated(key_hash="race", key_name="n")])
    connections = [await asyncpg.connect(database_url) for _ in range(contenders)]
    ready = asyncio.Barrier(contenders)

    async def contend(conn: asyncpg.Connection, index: int) -> list[int]:
        async with conn.transaction():
            await conn.execute("select 1")  # the transaction has begun
            await ready.wait()  # everyone starts from version 1 at the same moment
            return await store.append(
                conn, "key:race", 1, [KeyUpdated(key_hash="race", key_alias=f"a{index}")], {"i": index}
            )

    try:
        results = await asyncio.gather(
            *(contend(c, i) for i, c in enumerate(connections)), return_exceptions=True
        )
    finally:
        for conn in connections:
            await conn.close()

    winners = [r for r in results if isinstance(r, list)]
    losers = [r for r in results if not isinstance(r, list)]
    assert len(winners) == 1, results
    assert len(losers) == contenders - 1
    assert all(isinstance(r, ConcurrencyError) for r in losers), losers
    async with pool.acquire() as conn:
        stored = await store.read_stream(conn, "key:race")
    assert [s.version for s in stored] == [1, 2]


async def test_events_table_refuses_update_delete_and_truncate(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await store.append(conn, "key:ro", 0, [KeyGenerated(key_hash="ro", key_name="n")])
        await store.append(conn, "key:ro", 1, [KeyBlocked(key_hash="ro")])
    before = [dict(r) for r in await rows(pool)]

    statements = [
        "update events set type = 'Forged'",
        "update events set data = '{}'::jsonb where version = 2",
        "delete from events",
        "delete from events where version = 1",
        "truncate events",
        "truncate table events restart identity cascade",
    ]
    for sql in statements:
        with pytest.raises(asyncpg.PostgresError, match="append-only") as caught:
            await pool.execute(sql)
        assert isinstance(caught.value, asyncpg.InsufficientPrivilegeError), sql
        # inside an explicit transaction too
        async with pool.acquire() as conn:
            with pytest.raises(asyncpg.PostgresError, match="append-only"):
                async with conn.transaction():
                    await conn.execute(sql)

    assert [dict(r) for r in await rows(pool)] == before


async def test_every_row_has_a_txid_shared_by_its_transaction(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        async with conn.transaction():
            await store.append(conn, "key:t1", 0, [KeyGenerated(key_hash="t1", key_name="n")])
            await store.append(conn, "customer:t", 0, [CustomerCreated(user_id="t")])
            first_txid = await conn.fetchval("select pg_current_xact_id()::text")
        async with conn.transaction():
            await store.append(conn, "key:t1", 1, [KeyBlocked(key_hash="t1"), KeyUnblocked(key_hash="t1")])
        await store.append(conn, "key:t2", 0, [KeyGenerated(key_hash="t2", key_name="n")])  # autocommit

    column_type = await pool.fetchval(
        "select format_type(atttypid, atttypmod) from pg_attribute "
        "where attrelid = 'events'::regclass and attname = 'txid'"
    )
    assert column_type == "xid8"
    by_position = await pool.fetch("select position, txid::text as txid from events order by position")
    txids = [r["txid"] for r in by_position]
    assert None not in txids
    assert txids[0] == txids[1] == first_txid
    assert txids[2] == txids[3]
    assert len({txids[0], txids[2], txids[4]}) == 3
    assert int(txids[0]) < int(txids[2]) < int(txids[4])
    assert await pool.fetchval("select count(*) from events where txid is null") == 0


async def test_stream_version_is_unique(pool: asyncpg.Pool) -> None:
    definition = await pool.fetchval(
        "select pg_get_constraintdef(oid) from pg_constraint "
        "where conrelid = 'events'::regclass and conname = 'events_stream_version_key'"
    )
    assert definition == "UNIQUE (stream, version)"
    await pool.execute("insert into events (stream, version, type, data) values ('s', 1, 'T', '{}')")
    with pytest.raises(asyncpg.UniqueViolationError):
        await pool.execute("insert into events (stream, version, type, data) values ('s', 1, 'T', '{}')")
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute("insert into events (stream, version, type, data) values ('s', 0, 'T', '{}')")
