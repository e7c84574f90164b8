"""The reconciliation export and `reconcile` on a real PostgreSQL.

Usage is recorded the way the proxy records it (`record_usage` with its frozen Lago row), with many
customers, users, teams and days and costs of up to 27 significant digits; Lago delivery states are
then set with SQL, as the publisher would. Every expected number is computed here, in Python, from
the events themselves (and, for the totals, from the stored event JSON), never by the code under test.
"""

from __future__ import annotations

import asyncio
import csv
import decimal
import io
import json
import random
from collections.abc import AsyncIterator, Iterable, Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import asyncpg
import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spendledger.ledger.config import LagoSettings
from spendledger.ledger.events import UsageRecorded
from spendledger.ledger.sinks.lago import lago_row
from spendledger.ledger.tokens import PART_FIELDS
from spendledger.ledger.usage import RecordingContext, record_usage
from spendledger.projections.export_files import csv_bytes, parquet_bytes
from spendledger.projections.lago_reconcile import reconcile
from spendledger.projections.reconciliation import (
    BY_FIELD,
    TOTAL_COLUMNS,
    PrecisionError,
    ReconciliationError,
    ReconciliationReport,
    check_totals,
    reconciliation_rows,
)
from spendledger.projections.spend_logs import day_range
from tests.support import PostgresForTests

LAGO = LagoSettings(api_base="http://lago.invalid", api_key="k", event_code="tokens", charge_by="end_user_id")
CONTEXT = RecordingContext()
KEY = "a" * 64
EXACT = decimal.Context(prec=200)  # the test's own arithmetic: wide enough that nothing rounds

# Instants around the edges of UTC days and months; the last one is written with a +02:00 offset
# (it is 23:00 on 31 October in UTC, so it belongs to October).
INSTANTS = [
    datetime(2026, 10, 31, 0, 0, 0, tzinfo=UTC),
    datetime(2026, 10, 31, 23, 59, 59, 999000, tzinfo=UTC),
    datetime(2026, 11, 1, 0, 0, 0, tzinfo=UTC),
    datetime(2026, 11, 1, 12, 30, tzinfo=UTC),
    datetime(2026, 11, 15, 8, 0, tzinfo=UTC),
    datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC),
    datetime(2026, 12, 1, 0, 0, 1, tzinfo=UTC),
    datetime(2026, 11, 1, 1, 0, tzinfo=timezone(timedelta(hours=2))),
]
STATE_COLUMN = {
    "delivered": "delivered",
    "pending": "pending",
    "dead": "dead_lettered",
    "unbillable": "unbillable",
    None: "not_sent",
}


def usage(call_id: str, ended_at: datetime, cost: Decimal, **fields: Any) -> UsageRecorded:
    values: dict[str, Any] = {
        "call_id": call_id,
        "route": "chat.completions",
        "model_group": "gpt-4o-mini",
        "deployment_id": "dep-1",
        "provider": "openai",
        "upstream_model": "gpt-4o-mini",
        "key_hash": KEY,
        "status": "success",
        "http_status": 200,
        "input_tokens": 10,
        "output_tokens": 5,
        "total_tokens": 15,
        "cost": cost,
        "priced": True,
        "started_at": ended_at - timedelta(seconds=1),
        "ended_at": ended_at,
    }
    values.update(fields)
    return UsageRecorded(**values)


def many_digit_cost(rng: random.Random) -> Decimal:
    """Up to 18 decimals (what Parquet's decimal128(38, 18) holds), often all of them used."""
    choice = rng.random()
    if choice < 0.05:
        return Decimal(0)  # failed requests are billed at 0
    if choice < 0.10:
        return Decimal("123456789.123456789012345678")  # 27 significant digits
    return Decimal(rng.randint(1, 10**20)).scaleb(-18)


def parts(rng: random.Random, input_tokens: int, output_tokens: int) -> dict[str, int]:
    """Cached input and reasoning in some requests, as a provider reports them (parts of the totals)."""
    if rng.random() < 0.5:
        return {}
    cached = rng.randint(0, input_tokens)
    return {
        "cached_input_tokens": cached,
        "cache_creation_input_tokens": rng.randint(0, input_tokens - cached),
        "reasoning_tokens": rng.randint(0, output_tokens),
    }


def random_ledger(seed: int, count: int) -> list[tuple[UsageRecorded, bool]]:
    """(event, has a Lago row) pairs: varied ids (None included), instants and costs."""
    rng = random.Random(seed)
    ledger = []
    for i in range(count):
        input_tokens, output_tokens = rng.randint(0, 50_000), rng.randint(0, 5_000)
        event = usage(
            f"call-{seed}-{i:04d}",
            rng.choice(INSTANTS),
            many_digit_cost(rng),
            customer_id=rng.choice(["acme", "globex", "initech", None]),
            user_id=rng.choice(["u1", "u2", None]),
            team_id=rng.choice(["t1", "t2", None]),
            model_group=rng.choice(["gpt-4o-mini", "gpt-4o"]),
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            total_tokens=input_tokens + output_tokens,
            **parts(rng, input_tokens, output_tokens),
        )
        ledger.append((event, rng.random() < 0.85))  # the rest were recorded while Lago was off
    return ledger


async def record(pool: asyncpg.Pool, ledger: Iterable[tuple[UsageRecorded, bool]]) -> None:
    for event, with_lago in ledger:
        await record_usage(pool, event, CONTEXT, outbox=[lago_row(event, LAGO)] if with_lago else [])


async def set_states(pool: asyncpg.Pool, seed: int) -> None:
    """What publishers would have done: most billable rows delivered, some dead, some pending."""
    rows = await pool.fetch("select id from outbox where sink = 'lago' and state = 'pending' order by id")
    rng = random.Random(seed)
    delivered = [r["id"] for r in rows if rng.random() < 0.7]
    dead = [r["id"] for r in rows if r["id"] not in delivered and rng.random() < 0.5]
    await pool.execute(
        "update outbox set state = 'delivered', delivered_at = now() where id = any($1)", delivered
    )
    await pool.execute("update outbox set state = 'dead', last_error = 'lago 422' where id = any($1)", dead)


async def lago_states(pool: asyncpg.Pool) -> dict[str, str]:
    rows = await pool.fetch("select dedupe_key, state from outbox where sink = 'lago'")
    return {r["dedupe_key"]: r["state"] for r in rows}


def label(instant: datetime, period: str) -> str:
    day = instant.astimezone(UTC).date()
    return day.isoformat() if period == "day" else day.strftime("%Y-%m")


def expected_rows(
    events: Iterable[UsageRecorded],
    states: dict[str, str],
    by: str,
    period: str,
    start: datetime | None = None,
    end: datetime | None = None,
) -> dict[tuple[str | None, str], dict[str, Any]]:
    groups: dict[tuple[str | None, str], dict[str, Any]] = {}
    for event in events:
        if (start and event.ended_at < start) or (end and event.ended_at >= end):
            continue
        key = (getattr(event, BY_FIELD[by]), label(event.ended_at, period))
        group = groups.setdefault(key, {column: 0 for column in TOTAL_COLUMNS} | {"spend": Decimal(0)})
        group["requests"] += 1
        group["input_tokens"] += event.input_tokens
        group["output_tokens"] += event.output_tokens
        for part in PART_FIELDS:
            group[part] += getattr(event, part)
        group["spend"] = EXACT.add(group["spend"], event.cost)
        group[STATE_COLUMN[states.get(event.call_id)]] += 1
    return groups


def by_key(report: ReconciliationReport) -> dict[tuple[str | None, str], dict[str, Any]]:
    keys = [(row[report.group_column], row["period"]) for row in report.rows]
    assert len(keys) == len(set(keys)), "one row per group and period"
    return {
        (row[report.group_column], row["period"]): {c: row[c] for c in TOTAL_COLUMNS} for row in report.rows
    }


async def ledger_totals_from_the_log(pool: asyncpg.Pool) -> dict[str, Any]:
    """The totals, from the stored event JSON, added up here with Python Decimal."""
    rows = await pool.fetch("select data::text as data from events where type = 'UsageRecorded'")
    spend, requests, input_tokens, output_tokens = Decimal(0), 0, 0, 0
    part_totals = dict.fromkeys(PART_FIELDS, 0)
    for row in rows:
        data = json.loads(row["data"], parse_float=Decimal)
        spend = EXACT.add(spend, Decimal(data["cost"]))
        requests += 1
        input_tokens += data["input_tokens"]
        output_tokens += data["output_tokens"]
        for part in PART_FIELDS:
            part_totals[part] += data.get(part, 0)
    return {
        "requests": requests,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        **part_totals,
        "spend": spend,
    }


@pytest.fixture(scope="module")
def ledger_database_url(postgres: PostgresForTests) -> Iterator[str]:
    url = postgres.new_database()
    yield url
    postgres.drop_database(url)


@pytest.fixture(scope="module")
async def recorded_ledger(
    ledger_database_url: str,
) -> AsyncIterator[tuple[asyncpg.Pool, list[UsageRecorded]]]:
    """One database with the random ledger recorded (and its delivery states set), for the tests
    that only read it: recorded once per module instead of once per test (about a second each).
    Their pool is read-only, so a test that wrote to it would fail instead of changing what the
    next one reads."""
    writer = await asyncpg.create_pool(ledger_database_url, min_size=1, max_size=2)
    assert writer is not None
    entries = random_ledger(seed=7, count=120)
    try:
        await record(writer, entries)
        await set_states(writer, seed=7)
    finally:
        await writer.close()
    reader = await asyncpg.create_pool(
        ledger_database_url, min_size=1, max_size=10, server_settings={"default_transaction_read_only": "on"}
    )
    assert reader is not None
    try:
        yield reader, [event for event, _ in entries]
    finally:
        await reader.close()


@pytest.fixture
def ledger_pool(recorded_ledger: tuple[asyncpg.Pool, list[UsageRecorded]]) -> asyncpg.Pool:
    """A read-only pool on the database that holds `ledger`."""
    return recorded_ledger[0]


@pytest.fixture
def ledger(recorded_ledger: tuple[asyncpg.Pool, list[UsageRecorded]]) -> list[UsageRecorded]:
    return recorded_ledger[1]


# --- the export ---


@pytest.mark.parametrize("by", ["customer", "user", "team"])
@pytest.mark.parametrize("period", ["day", "month"])
async def test_rows_per_group_and_period_and_totals_are_the_ledgers_exactly(
    ledger_pool: asyncpg.Pool, ledger: list[UsageRecorded], by: str, period: str
) -> None:
    report = await reconciliation_rows(ledger_pool, by, period)
    states = await lago_states(ledger_pool)
    assert by_key(report) == expected_rows(ledger, states, by, period)
    # Ordered by period, then id, usage without an id last.
    order = [
        (row["period"], row[report.group_column] is None, row[report.group_column] or "")
        for row in report.rows
    ]
    assert order == sorted(order)

    from_log = await ledger_totals_from_the_log(ledger_pool)
    assert {c: report.summary[c] for c in from_log} == from_log
    assert report.summary["spend"] == EXACT.add(Decimal(0), sum((e.cost for e in ledger), Decimal(0)))
    # Every request is in exactly one delivery column.
    counts = {
        column: sum(1 for e in ledger if STATE_COLUMN[states.get(e.call_id)] == column)
        for column in STATE_COLUMN.values()
    }
    assert {c: report.summary[c] for c in counts} == counts
    assert sum(counts.values()) == report.summary["requests"] == len(ledger)
    assert all(counts[c] > 0 for c in counts), counts  # the data set exercises every state


async def test_summary_spend_has_every_digit(pool: asyncpg.Pool) -> None:
    costs = [Decimal("0.000000000000000001"), Decimal("99999999999999999999.999999999999999999")]
    await record(
        pool, [(usage(f"c{i}", INSTANTS[2], cost, customer_id="x"), True) for i, cost in enumerate(costs)]
    )
    report = await reconciliation_rows(pool, "customer", "day")
    assert report.summary["spend"] == Decimal("100000000000000000000")
    assert report.rows[0]["spend"] == Decimal("100000000000000000000")
    assert str(report.summary["spend"]) == "100000000000000000000"  # trim_scale: no trailing zeros


async def test_the_date_range_is_utc_days_inclusive(
    ledger_pool: asyncpg.Pool, ledger: list[UsageRecorded]
) -> None:
    start, end = day_range(date(2026, 11, 1), date(2026, 11, 30))
    assert start is not None and end is not None
    report = await reconciliation_rows(ledger_pool, "team", "day", start, end)
    assert report.as_json()["start"] == "2026-11-01T00:00:00+00:00"
    assert report.as_json()["end"] == "2026-12-01T00:00:00+00:00"  # the day after the last
    metadata = pq.read_table(io.BytesIO(parquet_bytes(report))).schema.metadata or {}
    assert metadata[b"spendledger.start"] == b"2026-11-01T00:00:00+00:00"
    assert metadata[b"spendledger.end"] == b"2026-12-01T00:00:00+00:00"
    states = await lago_states(ledger_pool)
    expected = expected_rows(ledger, states, "team", "day", start, end)
    assert by_key(report) == expected
    assert {period for _, period in expected} == {"2026-11-01", "2026-11-15", "2026-11-30"}
    assert report.summary["requests"] == sum(1 for e in ledger if start <= e.ended_at < end)
    # The +02:00 instant is 23:00 on 31 October in UTC: outside the range, and in October's row.
    assert any(e.ended_at == INSTANTS[-1] for e in ledger)
    october = await reconciliation_rows(
        ledger_pool, "team", "day", *day_range(date(2026, 10, 31), date(2026, 10, 31))
    )
    assert october.summary["requests"] == sum(1 for e in ledger if e.ended_at.astimezone(UTC).month == 10)


async def test_an_empty_ledger_gives_no_rows_and_zero_totals(pool: asyncpg.Pool) -> None:
    report = await reconciliation_rows(pool, "customer", "month")
    assert report.rows == []
    assert report.summary == {column: 0 for column in TOTAL_COLUMNS}


async def test_rows_that_disagree_with_the_totals_are_refused(
    ledger_pool: asyncpg.Pool, ledger: list[UsageRecorded]
) -> None:
    report = await reconciliation_rows(ledger_pool, "customer", "day")
    tampered = [dict(row) for row in report.rows]
    tampered[0]["spend"] += Decimal("0.000000000000000001")
    with pytest.raises(ReconciliationError, match="spend: rows add up to"):
        check_totals(ReconciliationReport("customer", "day", None, None, tampered, report.summary))
    tampered = [dict(row) for row in report.rows][1:]
    with pytest.raises(ReconciliationError, match="requests"):
        check_totals(ReconciliationReport("customer", "day", None, None, tampered, report.summary))


async def test_rows_and_totals_agree_while_usage_is_being_recorded(pool: asyncpg.Pool) -> None:
    """Rows and summary come from one snapshot: recording between the two queries cannot make
    them disagree."""
    entries = random_ledger(seed=11, count=200)
    stop = asyncio.Event()

    async def writer(chunk: list[tuple[UsageRecorded, bool]]) -> None:
        await record(pool, chunk)

    async def exporter() -> int:
        exports = 0
        while not stop.is_set():
            await reconciliation_rows(pool, "customer", "day")
            exports += 1
        return exports

    export_task = asyncio.create_task(exporter())
    await asyncio.gather(*(writer(entries[i::4]) for i in range(4)))
    stop.set()
    assert await export_task > 0
    report = await reconciliation_rows(pool, "customer", "day")
    assert report.summary["requests"] == 200


# --- CSV and Parquet ---


def read_csv(content: bytes, report: ReconciliationReport) -> tuple[list[dict[str, Any]], list[str]]:
    lines = list(csv.reader(io.StringIO(content.decode())))
    assert lines[0] == list(report.columns)
    rows = []
    for line in lines[1:-1]:
        row: dict[str, Any] = dict(zip(report.columns, line, strict=True))
        row[report.group_column] = row[report.group_column] or None
        for column in TOTAL_COLUMNS:
            row[column] = Decimal(row[column]) if column == "spend" else int(row[column])
        rows.append(row)
    return rows, lines[-1]


@pytest.mark.parametrize("by", ["customer", "team"])
async def test_csv_round_trip_is_exact(
    ledger_pool: asyncpg.Pool, ledger: list[UsageRecorded], by: str
) -> None:
    report = await reconciliation_rows(ledger_pool, by, "month")
    content = csv_bytes(report)
    rows, total = read_csv(content, report)
    assert rows == report.rows
    # Money is written with its exact digits, never with an exponent.
    text = content.decode()
    for row in report.rows:
        assert f",{format(row['spend'], 'f')}," in text
    assert "E-" not in text and "e-" not in text
    assert total[:2] == ["TOTAL", ""]
    assert dict(zip(TOTAL_COLUMNS, total[2:], strict=True)) == {
        column: format(report.summary[column], "f") if column == "spend" else str(report.summary[column])
        for column in TOTAL_COLUMNS
    }
    from_log = await ledger_totals_from_the_log(ledger_pool)
    assert Decimal(total[2 + TOTAL_COLUMNS.index("spend")]) == from_log["spend"]


async def test_csv_writes_tiny_amounts_without_an_exponent(pool: asyncpg.Pool) -> None:
    await record(pool, [(usage("tiny", INSTANTS[3], Decimal("0.0000001"), customer_id="t"), True)])
    content = csv_bytes(await reconciliation_rows(pool, "customer", "day")).decode()
    assert content.splitlines()[1] == "t,2026-11-01,1,10,5,0,0,0,0,0,0,0,0.0000001,0,1,0,0,0,0"
    assert content.splitlines()[2] == "TOTAL,,1,10,5,0,0,0,0,0,0,0,0.0000001,0,1,0,0,0,0"


@pytest.mark.parametrize("period", ["day", "month"])
async def test_parquet_round_trip_is_exact(
    ledger_pool: asyncpg.Pool, ledger: list[UsageRecorded], period: str
) -> None:
    report = await reconciliation_rows(ledger_pool, "customer", period)
    table = pq.read_table(io.BytesIO(parquet_bytes(report)))
    assert table.schema.field("spend").type == pa.decimal128(38, 18)
    assert table.schema.field("requests").type == pa.int64()
    assert table.column_names == list(report.columns)
    assert table.to_pylist() == report.rows  # Decimal equality: every digit
    metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    assert metadata["spendledger.by"] == "customer"
    assert metadata["spendledger.period"] == period
    assert "spendledger.start" not in metadata and "spendledger.end" not in metadata
    for column in TOTAL_COLUMNS:
        value = report.summary[column]
        assert metadata[f"spendledger.summary.{column}"] == (
            format(value, "f") if column == "spend" else str(value)
        )
    from_log = await ledger_totals_from_the_log(ledger_pool)
    assert Decimal(metadata["spendledger.summary.spend"]) == from_log["spend"]
    spend_column = table.column("spend").to_pylist()
    assert EXACT.add(Decimal(0), sum(spend_column, Decimal(0))) == from_log["spend"]


async def test_parquet_refuses_an_amount_it_cannot_hold_and_csv_keeps_it(pool: asyncpg.Pool) -> None:
    nineteen_decimals = Decimal("0.0011120000000000001")
    await record(pool, [(usage("fine", INSTANTS[3], nineteen_decimals, customer_id="p"), True)])
    report = await reconciliation_rows(pool, "customer", "day")
    with pytest.raises(PrecisionError, match=r"0\.0011120000000000001 does not fit Parquet decimal128"):
        parquet_bytes(report)
    rows, _ = read_csv(csv_bytes(report), report)
    assert rows[0]["spend"] == nineteen_decimals


async def test_parquet_refuses_an_amount_too_large(pool: asyncpg.Pool) -> None:
    await record(pool, [(usage("huge", INSTANTS[3], Decimal(10) ** 20, customer_id="p"), True)])
    with pytest.raises(PrecisionError, match="does not fit"):
        parquet_bytes(await reconciliation_rows(pool, "customer", "day"))


async def test_parquet_keeps_trailing_zero_scale_and_null_ids(pool: asyncpg.Pool) -> None:
    entries = [
        (usage("a", INSTANTS[3], Decimal("1.500000000000000000000"), customer_id=None), False),
        (usage("b", INSTANTS[3], Decimal("0.000000000000000001"), customer_id="z"), True),
    ]
    await record(pool, entries)
    report = await reconciliation_rows(pool, "customer", "day")
    table = pq.read_table(io.BytesIO(parquet_bytes(report)))
    assert table.to_pylist() == report.rows
    assert [row["customer_id"] for row in report.rows] == ["z", None]
    assert report.rows[1]["not_sent"] == 1


# --- reconcile ---


async def deliver_all(pool: asyncpg.Pool) -> None:
    await pool.execute("update outbox set state = 'delivered', delivered_at = now() where state = 'pending'")


async def test_a_clean_ledger_has_no_differences(pool: asyncpg.Pool) -> None:
    entries = random_ledger(seed=3, count=80)
    await record(pool, [(event, with_lago or event.customer_id is not None) for event, with_lago in entries])
    # Usage without a customer and without a Lago row (Lago off) is not a difference either.
    await record(pool, [(usage("no-lago-no-customer", INSTANTS[0], Decimal("1.25")), False)])
    await deliver_all(pool)
    assert await reconcile(pool) == []
    async with pool.acquire() as conn, conn.transaction():
        assert await reconcile(conn) == []  # inside the caller's own transaction too
    # Another representation of the same number (0.5000 for 0.5) is the same amount.
    await pool.execute(
        "update outbox set payload = jsonb_set(payload, '{properties,response_cost}', "
        "round((payload->'properties'->>'response_cost')::numeric, 25)::text::jsonb) "
        "where sink = 'lago' and state = 'delivered'"
    )
    padded = await pool.fetchval(
        "select payload->'properties'->>'response_cost' from outbox where dedupe_key = 'call-3-0000'"
    )
    assert padded.endswith("0000") and len(padded.split(".")[1]) == 25
    assert await reconcile(pool) == []


async def test_lago_charged_by_team_reconciles_on_the_team(pool: asyncpg.Pool) -> None:
    by_team = LagoSettings(api_base="http://x", api_key="k", event_code="tokens", charge_by="team_id")
    for i, team in enumerate(["t1", "t2", None]):
        event = usage(f"team-{i}", INSTANTS[4], Decimal("0.1"), team_id=team, customer_id="acme")
        await record_usage(pool, event, CONTEXT, outbox=[lago_row(event, by_team)])
    await deliver_all(pool)
    assert await reconcile(pool, "team_id") == []
    # Read by the customer, every delivered event names the wrong subscriber.
    kinds = [(d["call_id"], d["kind"]) for d in await reconcile(pool, "end_user_id")]
    assert kinds == [
        ("team-0", "payload_mismatch"),
        ("team-1", "payload_mismatch"),
        ("team-2", "unbillable_with_charge_by_id"),
    ]


async def test_every_kind_of_difference_is_reported(pool: asyncpg.Pool) -> None:
    cost = Decimal("0.000123456789012345678")
    events = {
        name: usage(name, INSTANTS[3], cost, customer_id="acme", user_id="u1")
        for name in [
            "ok",
            "deleted",
            "altered-cost",
            "altered-subscriber",
            "string-tokens",
            "pending",
            "dead",
            "kept",
        ]
    }
    await record(pool, [(event, True) for event in events.values()])
    await deliver_all(pool)
    await pool.execute("delete from outbox where sink = 'lago' and dedupe_key = 'deleted'")
    await pool.execute(
        "update outbox set payload = jsonb_set(payload, '{properties,response_cost}', '0.000123456789012345679') "
        "where dedupe_key = 'altered-cost'"
    )
    await pool.execute(
        'update outbox set payload = payload || \'{"external_subscription_id": "globex"}\' '
        "where dedupe_key = 'altered-subscriber'"
    )
    await pool.execute(
        "update outbox set payload = jsonb_set(payload, '{properties,input_tokens}', '\"10\"') "
        "where dedupe_key = 'string-tokens'"
    )
    await pool.execute(
        "update outbox set state = 'pending', attempts = 3, last_error = 'lago answered 503' where dedupe_key = 'pending'"
    )
    await pool.execute(
        "update outbox set state = 'dead', attempts = 1, last_error = 'lago 422: poison' where dedupe_key = 'dead'"
    )
    await pool.execute("update outbox set state = 'unbillable' where dedupe_key = 'kept'")
    ghost = lago_row(usage("ghost", INSTANTS[3], Decimal("9.99"), customer_id="acme"), LAGO)
    await pool.execute(
        "insert into outbox (sink, dedupe_key, payload, state, call_id) values ('lago', 'ghost', $1::jsonb, 'delivered', 'ghost')",
        msgspec.json.Encoder(decimal_format="number").encode(ghost.payload).decode(),
    )

    differences = await reconcile(pool)
    by_call = {d["call_id"]: d for d in differences}
    assert [d["call_id"] for d in differences] == sorted(by_call)  # one per call id, in order
    assert {call_id: d["kind"] for call_id, d in by_call.items()} == {
        "altered-cost": "payload_mismatch",
        "altered-subscriber": "payload_mismatch",
        "dead": "dead",
        "deleted": "missing_in_lago",
        "ghost": "not_in_ledger",
        "kept": "unbillable_with_charge_by_id",
        "pending": "pending",
        "string-tokens": "payload_mismatch",
    }
    assert by_call["altered-cost"]["ledger"] == {"response_cost": cost}
    assert by_call["altered-cost"]["lago"] == {"response_cost": Decimal("0.000123456789012345679")}
    assert by_call["altered-subscriber"]["ledger"] == {"external_subscription_id": "acme"}
    assert by_call["altered-subscriber"]["lago"] == {"external_subscription_id": "globex"}
    assert by_call["string-tokens"]["ledger"] == {"input_tokens": 10}
    assert by_call["string-tokens"]["lago"] == {"input_tokens": "10"}
    deleted = by_call["deleted"]
    assert deleted["lago"] is None
    assert deleted["ledger"]["external_subscription_id"] == "acme"
    assert deleted["ledger"]["response_cost"] == cost
    assert by_call["ghost"]["ledger"] is None
    assert by_call["ghost"]["lago"]["state"] == "delivered"
    assert by_call["ghost"]["lago"]["response_cost"] == Decimal("9.99")
    assert by_call["pending"]["lago"]["state"] == "pending"
    assert by_call["pending"]["lago"]["last_error"] == "lago answered 503"
    assert by_call["dead"]["lago"]["last_error"] == "lago 422: poison"
    assert by_call["dead"]["ledger"]["response_cost"] == cost
    assert by_call["kept"]["lago"]["state"] == "unbillable"

    # The export shows the same picture in its delivery columns.
    report = await reconciliation_rows(pool, "customer", "day")
    assert report.summary["requests"] == len(events)
    assert {
        c: report.summary[c] for c in ("delivered", "pending", "dead_lettered", "unbillable", "not_sent")
    } == {
        "delivered": 4,
        "pending": 1,
        "dead_lettered": 1,
        "unbillable": 1,
        "not_sent": 1,
    }
