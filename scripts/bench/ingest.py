"""`POST /usage` throughput (issue 21): batches of 100 and of 1,000 records from 8 concurrent senders.

A fresh embedded PostgreSQL is migrated; `spendledger serve` runs on it as the README starts it
(default `--workers`, its publisher child delivering) with a master key of this run's own, priced
model groups, Lago on (`callbacks: ["lago"]`, LAGO_* at the fake sinks of
scripts/bench/fake_upstream.py) and webhooks on (`alerting: ["webhook"]`, WEBHOOK_URL and
WEBHOOK_SECRET at the same sinks) — the callbacks scripts/bench/proxy.py configures. Through its
management API: budget tiers, CUSTOMERS customers (most on a tier or with a budget of their own, so
each settle adds to budget rows) and one key, the senders' (not an admin's: its records are priced
by the gateway).

Then, for each batch size, `--records` records with unique call ids (each for one of the customers
at random, a tenth for none), the batches' bodies encoded beforehand, sent by SENDERS concurrent
senders (asyncio + httpx, a keep-alive connection each) as fast as they are answered. Measured:
records answered `recorded` per second of the run, each batch's latency (send to parsed answer),
CPU by process. Checked afterwards: the events table gained exactly one UsageRecorded per recorded
record (and nothing else), their costs sum to the answers', and the outbox holds one Lago row per
recorded record with a customer (those without one kept `unbillable`); and how long the publisher
took to deliver the Lago rows after the run's last answer.

If the target is not met (or with `--profile`): a py-spy profile of the server under the batches of
1,000 (CPU by step of the handler), and the PostgreSQL side of the handler's transaction timed
statement by statement from this client on batches copied from the run.

    .venv/bin/python scripts/bench/ingest.py [--records 200000] [--batches 100,1000] [--profile] [--write]

`--write` replaces the section "Usage ingest throughput (issue 21)" of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import asyncpg
import httpx
import msgspec
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.bench.proxy import (
    SPENDLEDGER,
    Meter,
    Service,
    _frames,
    fake,
    free_port,
    publisher_child,
    py_spy,
    spendledger_env,
    started,
)
from scripts.bench.report import write_section
from spendledger.api.publishing import outbox_rows_builder, recording_context
from spendledger.ledger.config import load_settings
from spendledger.ledger.db import EmbeddedDatabase, run_migrations
from spendledger.ledger.events import UsageRecorded, decode_event
from spendledger.ledger.ingest import budget_periods, recorded_calls
from spendledger.ledger.usage import Recording, record_usages

SECTION: Final = "Usage ingest throughput (issue 21)"
KEPT_PROFILE: Final = Path(tempfile.gettempdir()) / "sl-bench-ingest-profile.raw"  # for a flame graph
SENDERS: Final = 8
CUSTOMERS: Final = 1000
NO_CUSTOMER: Final = 0.1  # share of records billed to no customer (their Lago row is unbillable)
TARGET: Final = 20_000.0  # records/s
WARM_UP_BATCHES: Final = 2  # per sender, before each run (not counted)
TESTS_POLL_S: Final = 10.0
TESTS_WAIT_S: Final = 15 * 60.0
DRAIN_TIMEOUT_S: Final = 600.0
PG_BATCHES: Final = 20  # batches of 1,000 timed statement by statement
# Budget tiers: id, max_budget, budget_duration, share of the customers (the rest: a budget of
# their own, or none).
TIERS: Final = (("tier-free", 50, "1mo", 45), ("tier-pro", 5000, "1mo", 30), ("tier-team", 20000, "7d", 10))
OWN_BUDGET: Final = 10  # percent of customers with a budget of their own (customer-budget:<id>)
# Model groups: name, upstream, input and output price per token, share of the records.
MODELS: Final = (
    ("gpt-4o-mini", "openai/gpt-4o-mini", "0.00000015", "0.0000006", 60),
    ("gpt-4o", "openai/gpt-4o", "0.0000025", "0.00001", 25),
    ("claude-sonnet", "openrouter/anthropic/claude-3.5-sonnet", "0.000003", "0.000015", 15),
)


def config_text(master_key: str) -> str:
    """Priced model groups (never called), Lago and webhook alerting on, this run's master key."""
    models = "".join(
        f"  - model_name: {name}\n    litellm_params:\n      model: {upstream}\n"
        f"      api_key: bench-upstream\n      api_base: http://127.0.0.1:9/v1\n"
        f"    model_info:\n      input_cost_per_token: {price_in}\n      output_cost_per_token: {price_out}\n"
        for name, upstream, price_in, price_out, _ in MODELS
    )
    return (
        f"model_list:\n{models}"
        'litellm_settings:\n  callbacks: ["lago"]\n'
        f'general_settings:\n  master_key: {master_key}\n  alerting: ["webhook"]\n'
    )


def customer_id(index: int) -> str:
    return f"ingest-customer-{index:04d}"


# --- the records ----------------------------------------------------------------------------------


class _Usage(msgspec.Struct, omit_defaults=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Record(msgspec.Struct, omit_defaults=True):
    call_id: str
    model: str
    usage: _Usage
    user: str | None = None


class _Batch(msgspec.Struct):
    records: list[_Record]


@dataclass(frozen=True)
class Batch:
    body: bytes
    records: int
    with_customer: int


def records(prefix: str, count: int, rng: random.Random) -> Iterator[_Record]:
    """`count` records with the call ids `prefix`-0 … (unique within a run, runs told apart by
    `prefix`), each for a customer at random (or none), a model group by its share, token counts
    spread as chat calls are."""
    names = [m[0] for m in MODELS]
    weights = [m[4] for m in MODELS]
    for n in range(count):
        prompt = int(rng.lognormvariate(6.0, 1.0)) + 5
        completion = int(rng.lognormvariate(5.0, 0.8)) + 1
        user = None if rng.random() < NO_CUSTOMER else customer_id(rng.randrange(CUSTOMERS))
        yield _Record(
            call_id=f"{prefix}-{n}", model=rng.choices(names, weights)[0],
            usage=_Usage(prompt, completion, prompt + completion), user=user,
        )  # fmt: skip


def batches(prefix: str, count: int, size: int, rng: random.Random) -> list[Batch]:
    """The bodies of `count` records in batches of `size`, encoded now (not while timed)."""
    encoder = msgspec.json.Encoder()
    out: list[Batch] = []
    chunk: list[_Record] = []
    for record in records(prefix, count, rng):
        chunk.append(record)
        if len(chunk) == size:
            out.append(Batch(encoder.encode(_Batch(chunk)), size, sum(r.user is not None for r in chunk)))
            chunk = []
    if chunk:
        out.append(Batch(encoder.encode(_Batch(chunk)), len(chunk), sum(r.user is not None for r in chunk)))
    return out


# --- sending --------------------------------------------------------------------------------------


class _Result(msgspec.Struct):
    outcome: str
    cost: Decimal | None = None


class _Answer(msgspec.Struct):
    results: list[_Result]


_answer: Final = msgspec.json.Decoder(_Answer)


@dataclass
class Run:
    size: int
    prefix: str
    sent: int = 0
    with_customer: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    cost: Decimal = Decimal(0)
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cores: dict[str, float] = field(default_factory=dict)
    drain_s: float | None = None
    checks: list[tuple[str, bool]] = field(default_factory=list)
    tests_waited_s: float = 0.0
    busy: bool = False
    failure: str = ""

    @property
    def rate(self) -> float:
        return self.outcomes["recorded"] / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return (
            ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))] if ordered else math.nan
        )


async def send(base_url: str, key: str, work: Sequence[Batch], run: Run | None) -> float:
    """Send `work` from SENDERS senders, each its next batch once answered; wall seconds. Into
    `run` (None: a warm-up): outcomes, statuses, latencies, the answered costs."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    queue = iter(work)

    async def sender(client: httpx.AsyncClient) -> None:
        for batch in queue:  # one iterator shared: each batch goes to one sender
            started_at = time.perf_counter()
            response = await client.post("/usage", content=batch.body, headers=headers)
            answer = _answer.decode(response.content) if response.status_code == 200 else None
            elapsed = (time.perf_counter() - started_at) * 1000
            if run is None:
                continue
            run.statuses[response.status_code] += 1
            run.sent += batch.records
            run.with_customer += batch.with_customer
            run.latencies_ms.append(elapsed)
            if answer is None:
                run.failure = run.failure or f"{response.status_code}: {response.text[:300]}"
                continue
            for result in answer.results:
                run.outcomes[result.outcome] += 1
                if result.outcome == "recorded" and result.cost is not None:
                    run.cost += result.cost

    limits = httpx.Limits(max_connections=SENDERS, max_keepalive_connections=SENDERS)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as client:
        started_at = time.perf_counter()
        await asyncio.gather(*(sender(client) for _ in range(SENDERS)))
        return time.perf_counter() - started_at


def wait_for_tests(console: Console) -> tuple[float, bool]:
    """Wait (poll every TESTS_POLL_S, at most TESTS_WAIT_S) until no pytest runs on the machine;
    (seconds waited, still busy)."""
    started_at = time.monotonic()
    while subprocess.run(["pgrep", "-f", "pytest"], capture_output=True).returncode == 0:
        if time.monotonic() - started_at > TESTS_WAIT_S:
            console.print("[yellow]pytest still running after 15 minutes: measuring anyway[/yellow]")
            return time.monotonic() - started_at, True
        console.print("pytest is running: waiting …")
        time.sleep(TESTS_POLL_S)
    return time.monotonic() - started_at, False


# --- the ledger's side ----------------------------------------------------------------------------


async def _fetch(url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


def fetch(url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    return asyncio.run(_fetch(url, sql, *args))


def event_count(url: str) -> int:
    return int(fetch(url, "select count(*) as n from events")[0]["n"])


def wait_drained(url: str, since: float) -> float | None:
    """Seconds from `since` (perf_counter) until no Lago row is pending (None: not in DRAIN_TIMEOUT_S)."""
    while True:
        pending = fetch(url, "select count(*) as n from outbox where sink = 'lago' and state = 'pending'")[0][
            "n"
        ]
        if pending == 0:
            return time.perf_counter() - since
        if time.perf_counter() - since > DRAIN_TIMEOUT_S:
            return None
        time.sleep(0.2)


def check(url: str, run: Run, events_before: int) -> None:
    like = f"{run.prefix}-%"
    recorded = run.outcomes["recorded"]
    usage = fetch(
        url,
        "select count(*) as n, coalesce(sum((data->>'cost')::numeric), 0) as cost, count(data->>'customer_id') as billed "
        "from events where type = 'UsageRecorded' and stream like 'request:' || $1",
        like,
    )[0]  # fmt: skip
    lago = {
        r["state"]: r["n"]
        for r in fetch(
            url,
            "select state, count(*) as n from outbox where sink = 'lago' and call_id like $1 group by 1",
            like,
        )
    }
    billable = sum(n for state, n in lago.items() if state != "unbillable")
    gained = event_count(url) - events_before
    run.checks = [
        (f"answers: {dict(run.outcomes)}, statuses {dict(run.statuses)}",
         run.outcomes["recorded"] == run.sent and set(run.statuses) == {200}),
        (f"UsageRecorded events of the run {usage['n']:,} = recorded {recorded:,}", usage["n"] == recorded),
        (f"events table gained {gained:,} = recorded {recorded:,}", gained == recorded),
        (f"their costs sum to the answers' ({usage['cost']} = {run.cost})", usage["cost"] == run.cost),
        (f"Lago rows of customers {billable:,} = records with a customer {run.with_customer:,} "
         f"(= the events' {usage['billed']:,}); without one {lago.get('unbillable', 0):,} unbillable "
         f"= {recorded - run.with_customer:,}",
         billable == run.with_customer == usage["billed"] and lago.get("unbillable", 0) == recorded - run.with_customer),
    ]  # fmt: skip


# --- the profile ----------------------------------------------------------------------------------

# The handler's steps, by the function that runs them and its file: a stack is counted to the innermost
# of these in it (inclusive CPU); a stack with none of ours, to the framework if it is in it.
STEPS: Final = (
    ("body: JSON decode of the batch (decode_batch)", (("decode_batch", "api/ingest.py"),)),
    ("record: decode (_decode)", (("_decode", "api/ingest.py"),)),
    ("record: digest of what was sent", (("digest", "ledger/ingest.py"),)),
    (
        "record: scopes and price (_scopes, _charge)",
        (("_scopes", "api/ingest.py"), ("_charge", "api/ingest.py")),
    ),
    ("record: UsageRecorded built, rest of _prepare", (("_prepare", "api/ingest.py"),)),
    ("recorded_calls (call ids held already)", (("recorded_calls", "ledger/ingest.py"),)),
    ("budget_periods", (("budget_periods", "ledger/ingest.py"),)),
    ("Lago row (outbox_rows)", (("lago_rows", "api/publishing.py"), ("lago_row", "ledger/sinks/lago.py"))),
    ("record_usages: encode events, send, read", (("record_usages", "ledger/usage.py"),)),
    ("the transaction (begin, commit) and the pool", (("_record_new", "api/ingest.py"),)),
    ("answer: encode the results", (("json_response", "api/jsonio.py"),)),
    ("the rest of ingest (classify, results)", (("ingest", "api/ingest.py"),)),
    ("request: read the body, route, the key's check", (("post_usage", "api/routes/usage.py"),)),
)
FRAMEWORK: Final = "Litestar and uvicorn outside the handler (request, routing, guards, response)"
OUTSIDE: Final = "asyncpg protocol, asyncio/uvloop callbacks (outside a step)"
OTHER: Final = "other (publishing gauges, key cache, start-up frames)"


def _step(frame: str) -> str | None:
    function, _, where = frame.partition(" (")
    for step, marks in STEPS:
        if any(function == f and f"{path}:" in where for f, path in marks):
            return step
    return None


def profile_summary(raw: Path, seconds: float) -> list[tuple[str, float]]:
    """Cores (CPU seconds per second sampled), by handler step (STEPS), then the framework and the rest."""
    by_step: Counter[str] = Counter()
    for frames, n in _frames(raw).items():
        name = next((step for frame in reversed(frames) if (step := _step(frame)) is not None), None)
        if name is None:
            if any("litestar/" in f or "uvicorn/" in f for f in frames):
                name = FRAMEWORK
            elif any("asyncpg/" in f for f in frames):
                name = OUTSIDE
            else:
                name = OTHER
        by_step[name] += n
    rate = 100.0  # py-spy --rate
    return [(name, n / rate / seconds) for name, n in by_step.most_common()]


@dataclass
class PgTiming:
    statements: dict[str, list[float]] = field(default_factory=dict)  # ms per batch of 1,000
    period_start_us: float = 0.0  # one sl_period_start call
    nested: list[tuple[float, str]] = field(default_factory=list)  # auto_explain: ms, statement
    no_auto_explain: str = ""  # why there is none

    def add(self, name: str, ms: float) -> None:
        self.statements.setdefault(name, []).append(ms)


async def time_pg_side(url: str, config: Path, env: dict[str, str], source_prefix: str) -> PgTiming:
    """The handler's transaction, statement by statement, for PG_BATCHES batches of 1,000 copied from
    the run's events (new call ids): recorded_calls, budget_periods, record_usages, commit."""
    settings = load_settings(config, env)
    context = recording_context(settings)
    lago_rows = outbox_rows_builder(settings)
    rows = await _fetch(
        url,
        "select data::text as data, metadata::text as metadata from events where type = 'UsageRecorded' "
        "and stream like 'request:' || $1 limit $2",
        f"{source_prefix}-%", PG_BATCHES * 1000,
    )  # fmt: skip
    metadata_decoder = msgspec.json.Decoder(dict[str, Any])
    timing = PgTiming()
    conn = await asyncpg.connect(url)
    try:
        for b in range(PG_BATCHES):
            chunk = rows[b * 1000 : (b + 1) * 1000]
            if not chunk:
                break
            events: list[UsageRecorded] = []
            for i, row in enumerate(chunk):
                event = decode_event(row["data"])
                assert isinstance(event, UsageRecorded)
                events.append(msgspec.structs.replace(event, call_id=f"pg-{b}-{i}", budget_periods=()))
            metas = [metadata_decoder.decode(row["metadata"]) for row in chunk]
            t0 = time.perf_counter()
            transaction = conn.transaction()
            await transaction.start()
            held = await recorded_calls(conn, [e.call_id for e in events])
            assert not held
            t1 = time.perf_counter()
            periods = await budget_periods(conn, [e.scopes for e in events], events[0].ended_at, context, {"actor": "bench"})
            t2 = time.perf_counter()
            recordings = [
                Recording(event=msgspec.structs.replace(e, budget_periods=p), outbox=lago_rows(e), metadata=m)
                for e, p, m in zip(events, periods, metas, strict=True)
            ]
            t3 = time.perf_counter()
            await record_usages(conn, recordings, context)
            t4 = time.perf_counter()
            await transaction.commit()
            t5 = time.perf_counter()
            timing.add("recorded_calls (select of 1,000 streams)", (t1 - t0) * 1000)
            timing.add("budget_periods (sl_request_scopes × 1,000)", (t2 - t1) * 1000)
            timing.add("(client: build the recordings, Lago rows; not the server's cost)", (t3 - t2) * 1000)
            timing.add("record_usages → sl_record_usages (encode, send, run)", (t4 - t3) * 1000)
            timing.add("commit", (t5 - t4) * 1000)
            timing.add("the whole transaction", (t5 - t0) * 1000)
        # sl_period_start, which budget_periods calls once per budget of each record
        t0 = time.perf_counter()
        await conn.fetchval(
            "select count(sl_period_start(now() - make_interval(days => i % 28), '1mo', now())) "
            "from generate_series(1, 1000) as i"
        )
        timing.period_start_us = (time.perf_counter() - t0) * 1000
        # One more batch under auto_explain: each statement sl_record_usages runs, with its time.
        notices: list[str] = []
        conn.add_log_listener(lambda _conn, message: notices.append(str(message.message)))
        try:
            await conn.execute("load 'auto_explain'")
        except asyncpg.PostgresError as exc:  # pgserver's build ships no contrib modules
            timing.no_auto_explain = str(exc)
            return timing
        for setting in (
            "set auto_explain.log_min_duration = 0",
            "set auto_explain.log_analyze = on",
            "set auto_explain.log_nested_statements = on",
            "set auto_explain.log_timing = on",
            "set auto_explain.log_level = notice",
        ):
            await conn.execute(setting)
        events = []
        for i, row in enumerate(rows[:1000]):
            event = decode_event(row["data"])
            assert isinstance(event, UsageRecorded)
            events.append(msgspec.structs.replace(event, call_id=f"pgx-{i}"))
        async with conn.transaction():
            await record_usages(conn, [Recording(event=e, outbox=lago_rows(e)) for e in events], context)
        await asyncio.sleep(0.2)  # the notices arrive with the answers
        for notice in notices:
            found = re.match(
                r"duration: ([0-9.]+) ms\s+plan:\s*Query Text:\s*(.*?)(?:\n(?:Function Scan|Result|Insert|Update|Delete|Nested|Sort|Hash|Seq|Index|Aggregate|Subquery|Append|CTE|WindowAgg|ProjectSet|Limit|Unique|Merge|GroupAggregate|HashAggregate|Materialize)|$)",
                notice,
                re.S,
            )
            if found:
                timing.nested.append((float(found[1]), " ".join(found[2].split())[:160]))
    finally:
        await conn.close()
    return timing


# --- the storage floor ----------------------------------------------------------------------------

FLOOR_BATCHES: Final = 10  # batches of 1,000 per connection
# What each recorded record must leave behind, and nothing else: its UsageRecorded row (the run's
# own events, under new call ids, unmarked for the webhook follower) and its Lago row (state
# `unbillable`: the publisher leaves it be) — no HTTP, no pricing, no budgets, no projections.
_FLOOR_EVENTS: Final = """
insert into events (stream, version, type, data, metadata)
select 'request:' || (e.d->>'call_id'), 1, 'UsageRecorded', e.d, m.m - 'webhooks'
from jsonb_array_elements($1::jsonb) with ordinality as e(d, i)
join jsonb_array_elements($2::jsonb) with ordinality as m(m, j) on i = j
"""
_FLOOR_LAGO: Final = """
insert into outbox (sink, dedupe_key, payload, state, call_id)
select 'lago', 'floor:' || (e.d->>'call_id'), p.p, 'unbillable', e.d->>'call_id'
from jsonb_array_elements($1::jsonb) with ordinality as e(d, i)
join jsonb_array_elements($2::jsonb) with ordinality as p(p, j) on i = j
"""


@dataclass
class Floor:
    """Records/s PostgreSQL alone takes in, from SENDERS connections in batches of 1,000."""

    events_and_lago: float
    events_only: float


async def storage_floor(url: str, source_prefix: str) -> Floor:
    """The most records/s this machine's PostgreSQL stores as the ledger must, the rest left out:
    an upper bound for the whole path, measured beside it."""
    rows = await _fetch(
        url,
        "select e.data::text as data, e.metadata::text as metadata, o.payload::text as payload "
        "from events e join outbox o on o.call_id = e.data->>'call_id' and o.sink = 'lago' "
        "where e.type = 'UsageRecorded' and e.stream like 'request:' || $1 limit 1000",
        f"{source_prefix}-%",
    )  # fmt: skip
    data_decoder = msgspec.json.Decoder(dict[str, Any])
    template = [data_decoder.decode(row["data"]) for row in rows]
    metadata = "[" + ",".join(row["metadata"] for row in rows) + "]"
    payloads = "[" + ",".join(row["payload"] for row in rows) + "]"

    def bodies(tag: str, sender: int) -> list[str]:
        out = []
        for b in range(FLOOR_BATCHES):
            for i, d in enumerate(template):
                d["call_id"] = f"floor-{tag}-{sender}-{b}-{i}"
            out.append(msgspec.json.encode(template).decode())
        return out

    async def run(tag: str, with_lago: bool) -> float:
        work = [bodies(tag, sender) for sender in range(SENDERS)]

        async def sender(batch_bodies: list[str]) -> None:
            conn = await asyncpg.connect(url)
            try:
                for body in batch_bodies:
                    async with conn.transaction():
                        await conn.execute(_FLOOR_EVENTS, body, metadata)
                        if with_lago:
                            await conn.execute(_FLOOR_LAGO, body, payloads)
            finally:
                await conn.close()

        started_at = time.perf_counter()
        await asyncio.gather(*(sender(w) for w in work))
        return SENDERS * FLOOR_BATCHES * len(template) / (time.perf_counter() - started_at)

    return Floor(events_and_lago=await run("both", True), events_only=await run("events", False))


# --- the run --------------------------------------------------------------------------------------


@dataclass
class Setup:
    key: str
    customers: int
    budgets: int
    own_budgets: int
    no_budget: int
    seconds: float


def set_up(base_url: str, master_key: str, rng: random.Random) -> Setup:
    """Budget tiers, CUSTOMERS customers and the senders' key, through the management API."""
    started_at = time.perf_counter()
    admin = {"Authorization": f"Bearer {master_key}"}
    own = none = 0
    with httpx.Client(base_url=base_url, headers=admin, timeout=60) as client:
        for budget_id, max_budget, duration, _ in TIERS:
            client.post("/budget/new", json={"budget_id": budget_id, "max_budget": max_budget,
                                             "budget_duration": duration}).raise_for_status()  # fmt: skip
        tiers, weights = [t[0] for t in TIERS], [t[3] for t in TIERS]
        for index in range(CUSTOMERS):
            body: dict[str, object] = {"user_id": customer_id(index)}
            draw = rng.randrange(100)
            if draw < sum(weights):
                body["budget_id"] = rng.choices(tiers, weights)[0]
            elif draw < sum(weights) + OWN_BUDGET:
                body |= {"max_budget": rng.choice((100, 1000)), "budget_duration": "1mo"}
                own += 1
            else:
                none += 1
            client.post("/customer/new", json=body).raise_for_status()
        key = client.post("/key/generate", json={"key_alias": "ingest-bench-sender"})
        key.raise_for_status()
    return Setup(key.json()["key"], CUSTOMERS, len(TIERS), own, none, time.perf_counter() - started_at)


def measure(
    args: argparse.Namespace, console: Console, server: Service, database: EmbeddedDatabase, meter: Meter,
    key: str, size: int, rng: random.Random,
) -> Run:  # fmt: skip
    prefix = f"r{size}"
    run = Run(size, prefix)
    work = batches(prefix, args.records, size, rng)
    warm = batches(f"warm{size}", WARM_UP_BATCHES * SENDERS * size, size, rng)
    console.print(
        f"batches of {size:,}: {len(work):,} bodies encoded ({sum(len(b.body) for b in work) / 2**20:.0f} MiB)"
    )
    asyncio.run(send(server.url, key, warm, None))
    wait_drained(database.url, time.perf_counter())
    fetch(database.url, "vacuum analyze")
    run.tests_waited_s, run.busy = (0.0, False) if args.no_wait else wait_for_tests(console)
    events_before = event_count(database.url)
    before = meter.sample()
    run.seconds = asyncio.run(send(server.url, key, work, run))
    end = time.perf_counter()
    run.cores = Meter.cores(before, meter.sample())
    run.drain_s = wait_drained(database.url, end)
    check(database.url, run, events_before)
    console.print(
        f"batches of {size:,}: {run.rate:,.0f} records/s, p50 {statistics.median(run.latencies_ms):.0f} ms, "
        f"p95 {run.percentile(0.95):.0f} ms, Lago delivered {f'{run.drain_s:.1f}' if run.drain_s is not None else '–'} s after"
    )
    for text, ok in run.checks:
        console.print(f"  {'ok ' if ok else '[red]FAIL[/red]'} {text}")
    return run


@dataclass
class Profile:
    records: int
    rate: float
    seconds: float
    steps: list[tuple[str, float]]
    pg: PgTiming
    server_cores: float


def profile(
    args: argparse.Namespace, console: Console, server: Service, database: EmbeddedDatabase, meter: Meter,
    key: str, rng: random.Random, workdir: Path, config: Path, env: dict[str, str],
) -> Profile | None:  # fmt: skip
    spy = py_spy()
    if spy is None:
        console.print("[yellow]no py-spy (.venv/bin/pip install py-spy): no profile[/yellow]")
        return None
    run = Run(1000, "prof")
    work = batches("prof", args.profile_records, 1000, rng)
    raw = workdir / "profile.raw"
    argv = [
        spy,
        "record",
        "--pid",
        str(server.process.pid),
        "--rate",
        "100",
        "--nonblocking",
        "--format",
        "raw",
        "-o",
        str(raw),
    ]
    spying = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    spied_from = time.perf_counter()
    time.sleep(1.0)
    before = meter.sample()
    run.seconds = asyncio.run(send(server.url, key, work, run))
    cores = Meter.cores(before, meter.sample())
    spying.send_signal(2)  # SIGINT: py-spy writes what it has
    _, err = spying.communicate(timeout=60)
    spied_s = time.perf_counter() - spied_from
    if raw.exists():
        shutil.copy(raw, KEPT_PROFILE)
    if not raw.exists():
        console.print(
            f"[yellow]py-spy wrote nothing ({spying.returncode}): {err.decode(errors='replace')[:500]}[/yellow]"
        )
        return None
    wait_drained(database.url, time.perf_counter())
    pg = asyncio.run(time_pg_side(database.url, config, env, run.prefix))
    return Profile(
        run.outcomes["recorded"],
        run.rate,
        run.seconds,
        profile_summary(raw, spied_s),
        pg,
        cores["server"] - cores["publisher"],
    )


def run_all(args: argparse.Namespace, console: Console) -> None:
    rng = random.Random(21)
    master_key = "sk-" + secrets.token_urlsafe(24)  # this run's own: never a publicly known key
    workdir = Path(tempfile.mkdtemp(prefix="sl-bench-ingest-"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        database = EmbeddedDatabase(workdir / "pg")
    runs: list[Run] = []
    prof: Profile | None = None
    floor: Floor | None = None
    try:
        with contextlib.ExitStack() as stack:
            sinks: Service = stack.enter_context(fake("sinks", workdir))
            config = workdir / "spendledger.yaml"
            config.write_text(config_text(master_key))
            console.print(f"migrating {database.url.split('@')[-1]} …")
            run_migrations(database.url)
            env = spendledger_env(database.url, sinks)
            port = free_port()
            argv = [
                *SPENDLEDGER,
                "serve",
                "--config",
                str(config),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ]
            server = stack.enter_context(started(
                "spendledger", argv, workdir, f"http://127.0.0.1:{port}", "/health/readiness", env=env, timeout_s=120
            ))  # fmt: skip
            publisher = publisher_child(server.process.pid)
            setup = set_up(server.url, master_key, rng)
            console.print(f"set up in {setup.seconds:.1f} s: {setup}")
            pg_version = str(fetch(database.url, "show server_version")[0]["server_version"])
            postmaster = int(next(database.data_dir.rglob("postmaster.pid")).read_text().split()[0])
            meter = Meter(
                {"server": server.process.pid, "publisher": publisher, "postgres": postmaster, "sinks": sinks.process.pid},
                nested={"publisher": "server"},
            )  # fmt: skip
            for size in args.batches:
                runs.append(measure(args, console, server, database, meter, setup.key, size, rng))
            met = bool(runs) and min(r.rate for r in runs) >= TARGET
            if runs:
                wait_drained(database.url, time.perf_counter())
                floor = asyncio.run(storage_floor(database.url, runs[-1].prefix))
                console.print(f"storage floor: {floor}")
            if args.profile or (not met and not args.no_profile):
                console.print("profiling the batches of 1,000 …")
                prof = profile(args, console, server, database, meter, setup.key, rng, workdir, config, env)
            if any(r.failure for r in runs):
                console.rule("the server's log, its end")
                print(server.log(4000), flush=True)
    finally:
        database.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    body = report(args, setup, runs, prof, floor)
    print(body, flush=True)
    if args.write:
        if not all(ok for r in runs for _, ok in r.checks) or any(r.failure for r in runs):
            console.print("[red]not written: a check failed[/red]")
        else:
            write_section(SECTION, command(args), body, pg_version)
            console.print(f"written: docs/benchmarks.md, ## {SECTION}")


# --- the report -----------------------------------------------------------------------------------


def command(args: argparse.Namespace) -> str:
    return (
        f".venv/bin/python scripts/bench/ingest.py --records {args.records} "
        f"--batches {','.join(str(b) for b in args.batches)}" + (" --profile" if args.profile else "")
    )


def table(runs: Sequence[Run]) -> str:
    lines = [
        "| batch | records recorded | seconds | records/s | batch p50 ms | p95 ms | max ms | Lago delivered, s after "
        "| CPU cores: server / publisher / PostgreSQL / client / rest | checks |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        c = r.cores
        ok = all(passed for _, passed in r.checks) and not r.failure
        drain = f"{r.drain_s:.1f}" if r.drain_s is not None else f"not in {DRAIN_TIMEOUT_S:.0f}"
        lines.append(
            f"| {r.size:,} | {r.outcomes['recorded']:,} of {r.sent:,} | {r.seconds:.1f} | **{r.rate:,.0f}** | "
            f"{statistics.median(r.latencies_ms):.0f} | {r.percentile(0.95):.0f} | {max(r.latencies_ms):.0f} | {drain} | "
            f"{c['server'] - c['publisher']:.2f} / {c['publisher']:.2f} / {c['postgres']:.2f} / {c['bench']:.2f} / "
            f"{c['others']:.2f} | {'ok' if ok else '**failed**'} |"
        )
    return "\n".join(lines)


def profile_text(prof: Profile) -> list[str]:
    lines = [
        "",
        f"Where the time goes: `py-spy record --rate 100` on the server during {prof.records:,} more records "
        f"in batches of 1,000 ({prof.rate:,.0f} records/s while profiled, the profiler slowing it; the server process "
        f"{sum(c for _, c in prof.steps):.2f} cores in the samples). CPU of the server process by step of the handler, in cores "
        f"(µs per record = cores / records/s):",
        "",
        "| step (innermost frame of the step in the stack) | cores | µs per record |",
        "|---|---|---|",
    ]
    for name, cores in prof.steps:
        lines.append(f"| {name} | {cores:.3f} | {cores / max(prof.rate, 1e-9) * 1e6:.1f} |")
    lines += [
        "",
        f"PostgreSQL's side of the handler's transaction, timed from this client, one connection, {PG_BATCHES} "
        "batches of 1,000 copied from the run's events (new call ids, the same customers and budgets):",
        "",
        "| statement | p50 ms per 1,000 | mean ms | µs per record (p50) |",
        "|---|---|---|---|",
    ]
    for name, ms in prof.pg.statements.items():
        lines.append(
            f"| {name} | {statistics.median(ms):.1f} | {statistics.fmean(ms):.1f} | {statistics.median(ms):.0f} |"
        )
    lines += [
        "",
        f"One `sl_period_start` call (the calendar rule; budget_periods calls it once per budget of each record): "
        f"{prof.pg.period_start_us:.0f} µs (1,000 calls timed).",
    ]
    if prof.pg.no_auto_explain:
        lines.append(f"(No statement-level timing inside `sl_record_usages`: {prof.pg.no_auto_explain}.)")
    if prof.pg.nested:
        lines += [
            "",
            "One more batch of 1,000 under `auto_explain` (`log_nested_statements`, `log_analyze`: the timing "
            "itself adds to each), the statements that took 1 ms or more, slowest first:",
            "",
            "| ms | statement (its start) |",
            "|---|---|",
        ]
        for took, text in sorted(prof.pg.nested, reverse=True):
            if took >= 1.0:
                lines.append(f"| {took:.1f} | `{text.replace('|', '/').replace('`', '')}` |")
    return lines


def report(
    args: argparse.Namespace, setup: Setup, runs: Sequence[Run], prof: Profile | None, floor: Floor | None
) -> str:
    lines = [
        f"One machine runs everything ({len(os.sched_getaffinity(0))} cores): an embedded PostgreSQL, "
        "`spendledger serve --config …` as the README runs it (default `--workers`, 1; its publisher child "
        'delivering) with Lago on (`callbacks: ["lago"]`) and webhooks on (`alerting: ["webhook"]`, signed) at '
        "the fake sinks of scripts/bench/fake_upstream.py, and the client: "
        f"{SENDERS} concurrent senders (asyncio, httpx, a keep-alive connection each), each sending its next batch "
        "when the last is answered; the bodies encoded before the timing.",
        "",
        f"Set up through the management API ({setup.seconds:.0f} s): {setup.budgets} budget tiers, {setup.customers:,} "
        f"customers ({setup.customers - setup.own_budgets - setup.no_budget:,} on a tier, {setup.own_budgets} with a "
        f"budget of their own, {setup.no_budget} without: each settle adds to budget_usage rows), one key of no "
        f"admin (its records priced by the gateway from {len(MODELS)} model groups). Each run: {args.records:,} "
        f"records with unique call ids, each for one of the customers at random ({NO_CUSTOMER:.0%} for none), "
        f"after {WARM_UP_BATCHES} warm-up batches per sender and `vacuum analyze`; records/s is records answered "
        "`recorded` over the run's wall time (first send to last answer); a batch's latency is from its send to "
        "its answer parsed.",
        "",
        table(runs),
        "",
        "Checks after each run: every record answered `recorded` (all answers 200); the events table gained "
        "exactly one UsageRecorded per recorded record and nothing else; their costs sum to the answers'; the "
        "outbox holds one Lago row per recorded record with a customer (pending or delivered), the others "
        '`unbillable`. "Lago delivered" is how long after the run\'s last answer the publisher child had '
        "delivered every Lago row (it delivers during the run too).",
        "",
    ]
    for r in runs:
        lines.append(
            f"- batches of {r.size:,}: "
            + "; ".join(text for text, _ in r.checks)
            + (f"; **{r.failure}**" if r.failure else "")
        )
        if r.tests_waited_s > 1 or r.busy:
            lines.append(f"  (waited {r.tests_waited_s:.0f} s for a test suite to finish"
                         + ("; it still ran: **the machine was busy**" if r.busy else "") + ")")  # fmt: skip
    lines.append(
        "- CPU in cores over each run: the server process (its handler), its publisher child (Lago deliveries, "
        "the webhook follower), PostgreSQL (all its backends), this client, the rest of the machine."
    )
    rates = [r.rate for r in runs]
    verdict = (
        f"**met** ({', '.join(f'{r.rate:,.0f}' for r in runs)} records/s)"
        if rates and min(rates) >= TARGET
        else f"**not met**: {', '.join(f'{r.size:,} a batch: {r.rate:,.0f}' for r in runs)} records/s"
    )
    lines += ["", f"Requirement, at least {TARGET:,.0f} records/s with Lago and webhooks on: {verdict}."]
    if floor is not None:
        lines += [
            "",
            f"The storage floor, measured after the runs on the same database: PostgreSQL alone, from {SENDERS} "
            f"connections in batches of 1,000 (the run's own events and Lago payloads under new call ids, prepared "
            f"beforehand), storing only what each record must leave behind — {floor.events_and_lago:,.0f} records/s "
            f"for its UsageRecorded row and its Lago row, {floor.events_only:,.0f} records/s for the event row alone "
            "(no HTTP, no pricing, no budgets, no projections, nothing delivered). The whole path reached "
            + ", ".join(f"{r.rate / floor.events_and_lago:.0%}" for r in runs)
            + " of the first (batches of " + ", ".join(f"{r.size:,}" for r in runs) + ").",
        ]
    if prof is not None:
        lines += profile_text(prof)
    return "\n".join(lines) + "\n"


def _sizes(text: str) -> list[int]:
    sizes = [int(s) for s in text.split(",") if s.strip()]
    if not sizes or any(not 1 <= s <= 1000 for s in sizes):
        raise argparse.ArgumentTypeError("batch sizes from 1 to 1,000, comma separated")
    return sizes


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # stop the server, the sinks and PostgreSQL on the way out


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=200_000, help="records per run")
    parser.add_argument("--batches", type=_sizes, default=[100, 1000], help="batch sizes, one run each")
    parser.add_argument("--profile-records", type=int, default=100_000, help="records sent while profiled")
    parser.add_argument("--profile", action="store_true", help="profile even if the target is met")
    parser.add_argument("--no-profile", action="store_true", help="no profile even if the target is not met")
    parser.add_argument(
        "--no-wait", action="store_true", help="measure even while a test suite runs (smoke runs)"
    )
    parser.add_argument("--write", action="store_true", help=f"replace '## {SECTION}' in docs/benchmarks.md")
    args = parser.parse_args()
    run_all(args, Console())


if __name__ == "__main__":
    main()
