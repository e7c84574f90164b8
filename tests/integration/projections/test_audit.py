"""`projections.audit` on a real PostgreSQL: pages that never skip nor repeat an event while writers
append in transactions committing out of order, and filters that select exactly what they should."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import msgspec
import pytest

from spendledger.ledger import store
from spendledger.ledger.events import (
    BudgetDefined,
    CustomerCreated,
    Event,
    KeyBlocked,
    KeyGenerated,
    KeyUpdated,
    RequestRefused,
    TeamCreated,
    UsageRecorded,
    UserCreated,
    encode_event,
    event_type,
)
from spendledger.ledger.keys import generate_key, hash_key
from spendledger.projections.audit import (
    AuditEvent,
    AuditFilters,
    InvalidCursor,
    current_horizon,
    decode_cursor,
    encode_cursor,
    key_hash_for_alias,
    read_events,
)

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
KA, KB, KC = "a" * 64, "b" * 64, "c" * 64
EXACT_COST = "0.0011120000000000001"


def usage(
    call_id: str,
    *,
    key_hash: str = KA,
    customer: str | None = None,
    user: str | None = None,
    team: str | None = None,
    model: str = "m1",
    cost: str = EXACT_COST,
) -> UsageRecorded:
    return UsageRecorded(
        call_id=call_id,
        route="chat.completions",
        model_group=model,
        deployment_id="d",
        provider="openai",
        upstream_model="u",
        key_hash=key_hash,
        user_id=user,
        team_id=team,
        customer_id=customer,
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


def refused(call_id: str, *, key_hash: str, customer: str, model: str) -> RequestRefused:
    return RequestRefused(
        call_id=call_id,
        route="chat.completions",
        model_group=model,
        key_hash=key_hash,
        customer_id=customer,
        reason="budget_exceeded",
        scope="customer",
        scope_id=customer,
        refused_at=T0,
    )


async def read_all_pages(
    pool: asyncpg.Pool, filters: AuditFilters, limit: int, horizon: int | None = None
) -> list[AuditEvent]:
    events: list[AuditEvent] = []
    cursor: str | None = None
    while True:
        page, cursor = await read_events(pool, filters, cursor, limit, horizon)
        assert len(page) <= limit
        events.extend(page)
        if cursor is None:
            return events
        assert page, "a next cursor is only given after a full page"


def order_key(event: AuditEvent) -> tuple[int, int]:
    return int(event.txid), event.position


def assert_strictly_ordered(events: list[AuditEvent]) -> None:
    keys = [order_key(e) for e in events]
    assert all(a < b for a, b in itertools.pairwise(keys)), "pages not in (txid, position) order"


# --- the snapshot rule, deterministically --------------------------------------------------------


async def test_an_event_committed_behind_an_open_one_waits_for_it(pool: asyncpg.Pool) -> None:
    """Position 1 is still open when position 2 commits: a reader by position alone would take 2 and
    step over 1 for good; the audit log shows neither until 1 has committed, then both, in order."""
    async with pool.acquire() as slow, pool.acquire() as fast:
        slow_tx = slow.transaction()
        await slow_tx.start()
        (first,) = await store.append(slow, "request:slow", 0, [usage("slow")])
        async with fast.transaction():
            (second,) = await store.append(fast, "request:fast", 0, [usage("fast")])
        assert first < second

        naive = await store.read_all(fast, after_position=0)
        assert [e.position for e in naive] == [second]  # position 1 is not there yet: a follower
        # that trusted position would now continue after 2 and never read 1.
        assert await read_events(pool, AuditFilters(), None, 10) == ([], None)

        await slow_tx.commit()
    events, next_cursor = await read_events(pool, AuditFilters(), None, 10)
    assert [e.position for e in events] == [first, second]
    assert next_cursor is None


async def test_a_transaction_that_began_first_but_appended_last_comes_first(pool: asyncpg.Pool) -> None:
    """The lower transaction id can carry the higher position: the order is (txid, position)."""
    async with pool.acquire() as early, pool.acquire() as late:
        early_tx = early.transaction()
        await early_tx.start()
        await early.fetchval("select pg_current_xact_id()")  # takes its id now, appends later
        async with late.transaction():
            (late_position,) = await store.append(late, "request:late", 0, [usage("late")])
        page, _ = await read_events(pool, AuditFilters(), None, 10)
        assert page == []  # an older transaction is still open below it
        (early_position,) = await store.append(early, "request:early", 0, [usage("early")])
        await early_tx.commit()
    assert early_position > late_position
    events, _ = await read_events(pool, AuditFilters(), None, 10)
    assert [e.stream for e in events] == ["request:early", "request:late"]
    assert_strictly_ordered(events)


# --- pagination under concurrent appends ----------------------------------------------------------


WRITERS = 6
TRANSACTIONS_PER_WRITER = 25
PAGE = 4


async def test_paging_while_writers_append_sees_every_committed_event_exactly_once(
    pool: asyncpg.Pool,
) -> None:
    rng = random.Random(20261130)
    commits: list[list[int]] = []  # positions of each committed transaction, in commit order
    rolled_back: list[int] = []
    open_transactions = 0
    pages_read_behind_an_open_transaction = 0
    writers_done = asyncio.Event()

    async def writer(w: int) -> None:
        nonlocal open_transactions
        for i in range(TRANSACTIONS_PER_WRITER):
            async with pool.acquire() as conn:
                tx = conn.transaction()
                await tx.start()
                open_transactions += 1
                try:
                    if rng.random() < 0.3:
                        # Take a transaction id now and append later: a low txid, high positions.
                        await conn.fetchval("select pg_current_xact_id()")
                        await asyncio.sleep(rng.uniform(0, 0.03))
                    positions: list[int] = []
                    for j in range(rng.randint(1, 3)):
                        event = usage(f"w{w}-{i}-{j}", customer=f"c{(w + j) % 3}")
                        positions += await store.append(conn, f"request:w{w}-{i}-{j}", 0, [event])
                        await asyncio.sleep(rng.uniform(0, 0.01))
                    await asyncio.sleep(
                        rng.uniform(0, 0.04)
                    )  # stay open while others commit and pages are read
                    if rng.random() < 0.1:
                        await tx.rollback()
                        rolled_back.extend(positions)
                    else:
                        await tx.commit()
                        commits.append(positions)
                except BaseException:
                    await tx.rollback()
                    raise
                finally:
                    open_transactions -= 1

    async def writers() -> None:
        try:
            await asyncio.gather(*(writer(w) for w in range(WRITERS)))
        finally:
            writers_done.set()

    seen: list[AuditEvent] = []

    async def reader() -> None:
        nonlocal pages_read_behind_an_open_transaction
        cursor: str | None = None
        while True:
            finished = writers_done.is_set()  # before the read: then the read sees every commit
            if open_transactions:
                pages_read_behind_an_open_transaction += 1
            page, next_cursor = await read_events(pool, AuditFilters(), cursor, PAGE)
            seen.extend(page)
            if page:
                # Resume after the last event seen, also when no next page is promised yet.
                cursor = next_cursor or encode_cursor(page[-1].txid, page[-1].position)
            if next_cursor is None:
                if finished:
                    return
                await asyncio.sleep(0.002)

    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(writers(), reader()), timeout=60)
    elapsed = time.monotonic() - started

    rows = await pool.fetch("select position, txid::text as txid from events order by txid, position")
    committed_positions = sorted(p for positions in commits for p in positions)
    assert sorted(r["position"] for r in rows) == committed_positions
    assert not set(rolled_back) & set(committed_positions)

    # The union of the pages is every committed event, once each, in (txid, position) order.
    assert [e.position for e in seen] == [r["position"] for r in rows]
    assert [e.txid for e in seen] == [r["txid"] for r in rows]
    assert len({e.position for e in seen}) == len(seen)
    assert_strictly_ordered(seen)

    # The race was real: transactions committed out of position order, the (txid, position) order
    # differs from the position order, and pages were read while transactions were open.
    assert any(
        min(later) < max(earlier) for k, earlier in enumerate(commits) for later in commits[k + 1 :]
    ), "no transaction committed behind a later one"
    assert [r["position"] for r in rows] != sorted(r["position"] for r in rows)
    assert pages_read_behind_an_open_transaction > 10
    assert elapsed < 60


async def test_a_horizon_caps_a_read_at_what_had_committed_when_it_was_taken(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await store.append(conn, "request:before", 0, [usage("before")])
    horizon = await current_horizon(pool)
    async with pool.acquire() as conn, conn.transaction():
        await store.append(conn, "request:after", 0, [usage("after")])
    capped = await read_all_pages(pool, AuditFilters(), 1, horizon)
    assert [e.stream for e in capped] == ["request:before"]
    assert [e.stream for e in await read_all_pages(pool, AuditFilters(), 1)] == [
        "request:before",
        "request:after",
    ]


# --- filters --------------------------------------------------------------------------------------


class Row(msgspec.Struct, frozen=True):
    stream: str
    type: str
    data: dict[str, Any]
    recorded_at: datetime
    position: int
    txid: str


def cost_of(i: int) -> str:
    return f"0.00000{i + 1}000000000000{i + 1}"  # more digits than a float keeps


def dataset() -> list[tuple[str, Event]]:
    rows: list[tuple[str, Event]] = [
        (
            f"key:{KA}",
            KeyGenerated(key_hash=KA, key_name="sk-...aaaa", key_alias="alpha", user_id="u1", team_id="t1"),
        ),
        (
            f"key:{KB}",
            KeyGenerated(key_hash=KB, key_name="sk-...bbbb", key_alias="beta", user_id="u2", team_id="t1"),
        ),
        ("customer:c1", CustomerCreated(user_id="c1")),
        ("customer:u1", CustomerCreated(user_id="u1")),  # a customer named like user u1
        ("user:u1", UserCreated(user_id="u1")),
        ("user:u3", UserCreated(user_id="u3")),
        ("team:t1", TeamCreated(team_id="t1")),
        ("budget:gold", BudgetDefined(budget_id="gold", max_budget=Decimal("10"))),
    ]
    for i in range(12):
        key_hash = (KA, KB)[i % 2]
        event = usage(
            f"call-{i}",
            key_hash=key_hash,
            customer=("c1", "c2", "u1")[i % 3],
            user="u1" if key_hash == KA else "u2",
            team="t1",
            model=("m1", "m2")[i // 6],
            cost=cost_of(i),
        )
        rows.append((f"request:call-{i}", event))
    for i in range(3):
        rows.append((f"request:refused-{i}", refused(f"refused-{i}", key_hash=KA, customer="c2", model="m2")))
    rows += [
        (f"key:{KA}", KeyUpdated(key_hash=KA, key_alias="alpha2")),
        (f"key:{KA}", KeyBlocked(key_hash=KA)),
        (f"key:{KC}", KeyGenerated(key_hash=KC, key_name="sk-...cccc", key_alias="gamma", team_id="t2")),
        ("team:t2", TeamCreated(team_id="t2")),
        ("request:no-customer", usage("no-customer", key_hash=KC, team="t2", model="m1")),
    ]
    return rows


# Transaction ids of long-committed transactions, shuffled against the positions, crossing digit
# counts (9 → 10, 99 → 100) so that an order by their text instead of their value would show, some
# shared (one transaction, several events: the position decides).
PAST_TXIDS = (100, 9, 10, 99, 250, 9, 3, 600, 42, 100, 8, 99, 10, 500, 7, 90, 100, 601, 9, 3, 250)


async def load_dataset(pool: asyncpg.Pool) -> list[Row]:
    """Each event at its own minute (recorded_at set explicitly), written as by transactions that
    committed long ago in another order than their positions (txid set explicitly)."""
    horizon = await current_horizon(pool)
    assert max(PAST_TXIDS) < horizon
    versions: dict[str, int] = {}
    loaded: list[Row] = []
    for minute, (stream, event) in enumerate(dataset()):
        versions[stream] = versions.get(stream, 0) + 1
        recorded_at = T0 + timedelta(minutes=minute)
        data = encode_event(event).decode()
        row = await pool.fetchrow(
            "insert into events (stream, version, type, data, metadata, recorded_at, txid) "
            "values ($1, $2, $3, $4::jsonb, $5::jsonb, $6, $7::text::xid8) "
            "returning position, txid::text as txid",
            stream,
            versions[stream],
            event_type(event),
            data,
            json.dumps({"actor": "test"}),
            recorded_at,
            str(PAST_TXIDS[minute % len(PAST_TXIDS)]),
        )
        assert row is not None
        loaded.append(
            Row(stream, event_type(event), json.loads(data), recorded_at, row["position"], row["txid"])
        )
    return loaded


def entity(row: Row, field: str, prefix: str, value: str, *, skip_customers: bool = False) -> bool:
    named = row.data.get(field) == value and not (skip_customers and row.stream.startswith("customer:"))
    return named or row.stream == f"{prefix}:{value}"


def reference(rows: list[Row], f: AuditFilters) -> list[int]:
    """The filters' meaning, written independently of the SQL."""

    def keep(row: Row) -> bool:
        tests: list[Callable[[], bool]] = [
            lambda: f.customer is None or entity(row, "customer_id", "customer", f.customer),
            lambda: f.user is None or entity(row, "user_id", "user", f.user, skip_customers=True),
            lambda: f.team is None or entity(row, "team_id", "team", f.team),
            lambda: f.key is None or entity(row, "key_hash", "key", f.key),
            lambda: f.scope_key is None or entity(row, "key_hash", "key", f.scope_key),
            lambda: f.model is None or row.data.get("model_group") == f.model,
            lambda: not f.types or row.type in f.types,
            lambda: f.start is None or row.recorded_at >= f.start,
            lambda: f.end is None or row.recorded_at < f.end,
        ]
        return all(test() for test in tests)

    return [r.position for r in sorted(rows, key=lambda r: (int(r.txid), r.position)) if keep(r)]


CASES: dict[str, AuditFilters] = {
    "everything": AuditFilters(),
    "customer c1": AuditFilters(customer="c1"),
    "customer c2": AuditFilters(customer="c2"),
    "customer u1 (named like a user)": AuditFilters(customer="u1"),
    "customer nobody": AuditFilters(customer="nobody"),
    "user u1": AuditFilters(user="u1"),
    "user u2": AuditFilters(user="u2"),
    "user u3 (own stream only)": AuditFilters(user="u3"),
    "team t1": AuditFilters(team="t1"),
    "team t2": AuditFilters(team="t2"),
    "key A": AuditFilters(key=KA),
    "key B": AuditFilters(key=KB),
    "key C": AuditFilters(key=KC),
    "model m1": AuditFilters(model="m1"),
    "model m2": AuditFilters(model="m2"),
    "type UsageRecorded": AuditFilters(types=("UsageRecorded",)),
    "types RequestRefused, KeyGenerated": AuditFilters(types=("RequestRefused", "KeyGenerated")),
    "time range": AuditFilters(start=T0 + timedelta(minutes=5), end=T0 + timedelta(minutes=14)),
    "from a time on": AuditFilters(start=T0 + timedelta(minutes=20)),
    "until a time": AuditFilters(end=T0 + timedelta(minutes=3)),
    "customer c2 and model m2": AuditFilters(customer="c2", model="m2"),
    "key A refusals": AuditFilters(key=KA, types=("RequestRefused",)),
    "user u1 and team t1": AuditFilters(user="u1", team="t1"),
    "team t1, customer c1, model m1": AuditFilters(team="t1", customer="c1", model="m1"),
    "scope A": AuditFilters(scope_key=KA),
    "scope A cannot widen to key B": AuditFilters(scope_key=KA, key=KB),
    "scope A and key A": AuditFilters(scope_key=KA, key=KA),
    "scope A and customer c1": AuditFilters(scope_key=KA, customer="c1"),
    "scope A and customer c2 in a time range": AuditFilters(
        scope_key=KA, customer="c2", start=T0 + timedelta(minutes=10), end=T0 + timedelta(minutes=30)
    ),
    "scope B and team t1 usage": AuditFilters(scope_key=KB, team="t1", types=("UsageRecorded",)),
}


async def test_each_filter_selects_exactly_its_events_on_every_page_size(pool: asyncpg.Pool) -> None:
    rows = await load_dataset(pool)
    for name, filters in CASES.items():
        expected = reference(rows, filters)
        for limit in (1, 2, 5, 1000):
            events = await read_all_pages(pool, filters, limit)
            assert [e.position for e in events] == expected, f"{name}, pages of {limit}"
            assert_strictly_ordered(events)
    everything = reference(rows, AuditFilters())
    by_text = [r.position for r in sorted(rows, key=lambda r: (r.txid, r.position))]
    assert everything != sorted(everything) and everything != by_text  # the order is really tested
    # The cases mean something: neither everything nor nothing, mostly.
    sizes = {name: len(reference(rows, f)) for name, f in CASES.items()}
    assert sizes["customer nobody"] == 0 and sizes["scope A cannot widen to key B"] == 0
    assert sizes["user u1"] != sizes["customer u1 (named like a user)"]
    assert 0 < sizes["scope A and customer c1"] < sizes["scope A"] < sizes["everything"]


async def test_events_come_with_their_exact_json_and_every_column(pool: asyncpg.Pool) -> None:
    rows = await load_dataset(pool)
    events = await read_all_pages(pool, AuditFilters(types=("UsageRecorded",), key=KB), 3)
    assert events
    by_position = {r.position: r for r in rows}
    for event in events:
        row = by_position[event.position]
        assert (event.stream, event.type, event.txid, event.recorded_at) == (
            row.stream,
            row.type,
            row.txid,
            row.recorded_at,
        )
        assert event.version == 1
        assert json.loads(bytes(event.metadata)) == {"actor": "test"}
        data = json.loads(bytes(event.data), parse_float=Decimal)
        assert data["key_hash"] == KB
        # The digits recorded are the digits returned: no float on the way.
        assert f"{data['cost']}" in bytes(event.data).decode()
    (call_1,) = [e for e in events if e.stream == "request:call-1"]
    assert f'"cost": {cost_of(1)},'.encode() in bytes(call_1.data)
    assert f'"cost": {cost_of(1)},'.encode() in msgspec.json.encode(call_1)


async def test_key_aliases_resolve_through_the_directory_then_through_the_log(pool: asyncpg.Pool) -> None:
    await load_dataset(pool)  # KeyGenerated / KeyUpdated events only: none of them is in `keys`
    assert await key_hash_for_alias(pool, "alpha") == KA
    assert await key_hash_for_alias(pool, "alpha2") == KA  # the alias a KeyUpdated gave it
    assert await key_hash_for_alias(pool, "gamma") == KC
    assert await key_hash_for_alias(pool, "nobody") is None

    plaintext = "sk-audit-directory-key"
    spec = KeyGenerated(key_hash=hash_key(plaintext), key_name="sk-...-key", key_alias="in-directory")
    async with pool.acquire() as conn, conn.transaction():
        await generate_key(conn, spec, plaintext, actor="test", now=T0)
    assert await key_hash_for_alias(pool, "in-directory") == hash_key(plaintext)


async def test_bad_cursors_limits_and_types_are_refused(pool: asyncpg.Pool) -> None:
    assert decode_cursor(encode_cursor("12345", 678)) == (12345, 678)
    assert decode_cursor(encode_cursor(2**64 - 1, 2**63 - 1)) == (2**64 - 1, 2**63 - 1)
    for bad in ("", "!!!", "not-a-cursor", "djE6eDox", encode_cursor(1, 1) + "=", "a" * 200):
        with pytest.raises(InvalidCursor):
            decode_cursor(bad)
    with pytest.raises(InvalidCursor):
        decode_cursor("djE6MTg0NDY3NDQwNzM3MDk1NTE2MTY6MQ")  # txid 2**64: out of xid8's range
    for limit in (0, 1001, -5):
        with pytest.raises(ValueError, match="limit"):
            await read_events(pool, AuditFilters(), None, limit)
    with pytest.raises(ValueError, match="NoSuchEvent"):
        await read_events(pool, AuditFilters(types=("UsageRecorded", "NoSuchEvent")), None, 10)
    with pytest.raises(InvalidCursor):
        await read_events(pool, AuditFilters(), "garbage!", 10)


# --- who made a change ---------------------------------------------------------------------------


async def test_the_actor_filter_selects_each_actors_changes_on_every_page_size(pool: asyncpg.Pool) -> None:
    """`actor` matches `metadata.actor` exactly: the master key's changes, a generated key's
    ("key:<sha256>"), never usage events (they name no actor); it intersects the other filters."""
    by_key = f"key:{KA}"
    appended: list[tuple[str, str | None, str]] = []  # (stream, actor, type), in append order
    for i in range(9):
        actor = ("master_key", by_key, "master_key")[i % 3]
        stream, event = (
            (f"budget:b{i}", BudgetDefined(budget_id=f"b{i}"))
            if i % 2
            else (f"key:{i:064x}", KeyGenerated(key_hash=f"{i:064x}", key_name="sk-...0000", team_id="t1"))
        )
        async with pool.acquire() as conn, conn.transaction():
            await store.append(conn, stream, 0, [event], {"actor": actor})
            await store.append(conn, f"request:u{i}", 0, [usage(f"u{i}", team="t1")], {})
        appended += [(stream, actor, event_type(event)), (f"request:u{i}", None, "UsageRecorded")]

    def expected(actor: str, type_: str | None = None) -> list[str]:
        return [s for s, a, t in appended if a == actor and (type_ is None or t == type_)]

    for limit in (1, 2, 1000):
        for actor in ("master_key", by_key):
            events = await read_all_pages(pool, AuditFilters(actor=actor), limit)
            assert [e.stream for e in events] == expected(actor)
            assert all(json.loads(bytes(e.metadata))["actor"] == actor for e in events)
        keys_by_master = await read_all_pages(pool, AuditFilters(actor="master_key", team="t1"), limit)
        assert [e.stream for e in keys_by_master] == expected("master_key", "KeyGenerated")
    assert len(expected("master_key")) == 6 and len(expected(by_key)) == 3
    assert await read_all_pages(pool, AuditFilters(actor="key:" + "f" * 64), 10) == []


async def test_the_actor_filter_reads_its_index(pool: asyncpg.Pool) -> None:
    """Migration 0015's partial index serves `metadata->>'actor' = $1` in (txid, position) order
    (the planner may still prefer a scan of a tiny table: it is only kept from choosing one)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("set local enable_seqscan = off")
        plan = await conn.fetchval(
            "explain (format json) select position from events "
            "where metadata->>'actor' = $1 and txid < pg_snapshot_xmin(pg_current_snapshot()) "
            "order by txid, position limit 10",
            "master_key",
        )
    assert "events_actor" in plan
