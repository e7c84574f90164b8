"""Admission throughput and latency (issue 3): `sl_admit` and group-committed `sl_record_usages`.

Each for --seconds with --concurrency asyncio workers on one asyncpg pool: (a) one hot customer budget
row, admit → settle; (b) 1,000 customers round robin, admit → settle; (c) admit only on a hot row,
holds released at the end by `expire_holds`; (d) as (a), one request at a time (what a request pays
in the database at one connection, with nothing to share a batch with). Then the budget rows must
hold exactly the recorded costs and nothing held. Prints a Markdown table; writes "## Admission (issue 3)" in docs/benchmarks.md.

    .venv/bin/python scripts/bench/admission.py [--seconds N] [--concurrency C] [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from rich import box
from rich.console import Console
from rich.table import Table

from spendledger.ledger.admission import Admission, Admitted, admit_request, expire_holds
from spendledger.ledger.db import EmbeddedDatabase, create_pool, run_migrations
from spendledger.ledger.directory import create_customer, define_budget
from spendledger.ledger.events import BudgetDefined, CustomerCreated, UsageRecorded
from spendledger.ledger.money import ZERO, add
from spendledger.ledger.scopes import Scopes
from spendledger.ledger.usage import NO_CONTEXT, GroupRecorder, Recording

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scripts.bench.report import DOC, write_section

PROJECT_ROOT = Path(__file__).resolve().parents[2]

TITLE = "Admission (issue 3)"
TIER = "bench-tier"
KEY = "k" * 64
HOLD = Decimal("0.001")
# Costs below the hold with many digits, so that an inexact sum could not pass the check.
COSTS = [Decimal(f"0.000{n:03d}123456789") for n in range(1, 997)]


@dataclass
class Result:
    name: str
    customers: list[str]
    settle: bool
    concurrency: int | None = None  # else --concurrency
    admits: list[float] = field(default_factory=list)  # seconds
    cycles: list[float] = field(default_factory=list)  # admit + settle, seconds
    cost: Decimal = ZERO
    elapsed: float = 0.0
    waits: Counter[str] = field(default_factory=Counter)
    check: str = ""
    load: str = ""  # how busy the machine was: other work on it skews every number


def admission(call_id: str, customer: str, expires_at: datetime) -> Admission:
    now = datetime.now(UTC)
    return Admission(
        call_id=call_id, route="chat.completions", model="bench-model", scopes=Scopes(KEY, customer_id=customer),
        hold=HOLD, expires_at=expires_at, refused_at=now,
    )  # fmt: skip


def usage(
    call_id: str, customer: str, cost: Decimal, periods: tuple[tuple[str, str, str], ...]
) -> UsageRecorded:
    now = datetime.now(UTC)
    return UsageRecorded(
        call_id=call_id, route="chat.completions", model_group="bench-model", deployment_id="bench-dep",
        provider="openai", upstream_model="bench-model", key_hash=KEY, customer_id=customer,
        status="success", http_status=200, input_tokens=10, output_tokens=5, total_tokens=15, cost=cost,
        priced=True, started_at=now, ended_at=now, budget_periods=periods,
    )  # fmt: skip


async def worker(
    pool: asyncpg.Pool, recorder: GroupRecorder, result: Result, turn: list[int], deadline: float
) -> None:
    expires_at = datetime.now(UTC) + (timedelta(hours=1) if result.settle else -timedelta(seconds=1))
    while time.perf_counter() < deadline:
        n = turn[0] = turn[0] + 1
        customer, call_id = result.customers[n % len(result.customers)], f"{result.name}-{uuid.uuid4().hex}"
        start = time.perf_counter()
        outcome = await admit_request(pool, admission(call_id, customer, expires_at))
        admitted = time.perf_counter()
        if not isinstance(outcome, Admitted):
            raise SystemExit(f"refused: {outcome}")
        result.admits.append(admitted - start)
        if result.settle:
            cost = COSTS[n % len(COSTS)]
            # As the server does: settles of concurrent requests share one commit (group commit).
            await recorder.record(Recording(event=usage(call_id, customer, cost, outcome.budget_periods)))
            result.cycles.append(time.perf_counter() - start)
            result.cost = add(result.cost, cost)


async def sample_waits(url: str, result: Result, done: asyncio.Event) -> None:
    """What the benchmark's backends are doing, every 50 ms: CPU, a lock, WAL flush, or the client."""
    conn = await asyncpg.connect(url)
    while not done.is_set():
        rows = await conn.fetch(
            "select coalesce(wait_event_type || ':' || wait_event, 'CPU') as w, count(*) as n "
            "from pg_stat_activity where datname = current_database() and pid <> pg_backend_pid() "
            "and backend_type = 'client backend' group by 1"
        )
        result.waits.update({r["w"]: r["n"] for r in rows})
        await asyncio.sleep(0.05)
    await conn.close()


def cpu_busy_ticks() -> tuple[int, int]:
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # (busy, all): idle and iowait are not busy


async def run(pool: asyncpg.Pool, url: str, result: Result, seconds: float, concurrency: int) -> None:
    turn, done = [0], asyncio.Event()
    sampler = asyncio.create_task(sample_waits(url, result, done))
    (busy, ticks), cpu, start = cpu_busy_ticks(), time.process_time(), time.perf_counter()
    recorder = GroupRecorder(pool, NO_CONTEXT)
    recorder.start()
    await asyncio.gather(*(worker(pool, recorder, result, turn, start + seconds) for _ in range(concurrency)))
    await recorder.stop()
    result.elapsed = time.perf_counter() - start
    (busy_end, ticks_end), client = cpu_busy_ticks(), (time.process_time() - cpu) / result.elapsed
    machine_busy = (busy_end - busy) / max(1, ticks_end - ticks)
    result.load = f"machine CPU {machine_busy:.0%} busy, of which this client {client:.2f} cores"
    done.set()
    await sampler
    released = len(result.admits) if result.settle else await expire_holds(pool)
    spent, held = await pool.fetchrow(  # type: ignore[misc]  # an aggregate: always one row
        "select coalesce(sum(spent), 0), coalesce(sum(held), 0) from budget_usage "
        "where scope = 'customer' and scope_id = any($1::text[])",
        result.customers,
    )
    ok = spent == result.cost and held == 0 and released == len(result.admits)
    result.check = f"{'ok' if ok else 'FAILED'}: spent {spent}, recorded {result.cost}, held {held}"
    if not result.settle:
        result.check += f", {released} of {len(result.admits)} holds released by expire_holds"


async def setup(url: str, customers: list[str]) -> None:
    now, conn = datetime.now(UTC), await asyncpg.connect(url)
    async with conn.transaction():
        await define_budget(conn, BudgetDefined(budget_id=TIER, max_budget=Decimal(10**9)), "bench", now)
        for customer in customers:
            await create_customer(conn, CustomerCreated(user_id=customer, budget_id=TIER), {}, "bench", now)
    await conn.close()


def percentile(values: list[float], q: float) -> str:
    if not values:
        return "–"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:.2f}"


def table(results: list[Result]) -> Table:
    out = Table(box=box.MARKDOWN)
    for column in ("scenario", "admissions/s", "admit p50 ms", "admit p99 ms", "admit+settle p50 ms",
                   "admit+settle p99 ms", "check"):  # fmt: skip
        out.add_column(column)
    for r in results:
        out.add_row(
            r.name, f"{len(r.admits) / r.elapsed:,.0f}", percentile(r.admits, 0.5), percentile(r.admits, 0.99),
            percentile(r.cycles, 0.5), percentile(r.cycles, 0.99), r.check.split(":")[0],
        )  # fmt: skip
    return out


async def bench(admin_url: str, seconds: float, concurrency: int) -> tuple[list[Result], str]:
    """Create our own database on the server, migrate it, run (a) to (d), drop the database."""
    name = f"sl_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f"create database {name}")
    try:
        url = urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}"))
        await asyncio.to_thread(run_migrations, url)  # alembic runs its own event loop
        hot = Result("(a) hot budget, admit+settle", ["bench-hot-a"], settle=True)
        spread = Result("(b) 1,000 customers, admit+settle", [f"bench-c{i:03d}" for i in range(1000)], True)
        only = Result("(c) hot budget, admit only", ["bench-hot-c"], settle=False)
        lone = Result("(d) one at a time, admit+settle", ["bench-hot-d"], settle=True, concurrency=1)
        results = [hot, spread, only, lone]
        await setup(url, [customer for result in results for customer in result.customers])
        pool = await create_pool(url, min_size=concurrency, max_size=concurrency)
        try:
            for result in results:
                await run(pool, url, result, seconds, result.concurrency or concurrency)
        finally:
            await pool.close()
        return results, str(await admin.fetchval("show server_version"))
    finally:
        await admin.execute(f"drop database if exists {name} with (force)")
        await admin.close()


def doc_body(results: list[Result], markdown: str) -> str:
    share = [", ".join(f"{w} {n / r.waits.total():.0%}" for w, n in r.waits.most_common(5)) for r in results]
    waits = "\n".join(f"- {r.name}: {text}" for r, text in zip(results, share, strict=True))
    return (
        f"{markdown.strip()}\n\n"
        + "\n".join(f"- {r.name}: {r.check}; {r.load}" for r in results)
        + f"\n\nBackends of the benchmark by wait event (sampled every 50 ms):\n\n{waits}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--database-url", help="a server where we may CREATE DATABASE (else embedded)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")  # pgserver's platformdirs: harmless
    data_dir = None if args.database_url else Path(tempfile.mkdtemp(prefix="sl-bench-pg-", dir="/tmp"))
    server = EmbeddedDatabase(data_dir) if data_dir else None
    try:
        admin_url = server.url if server else args.database_url
        results, pg_version = asyncio.run(bench(admin_url, args.seconds, args.concurrency))
    finally:
        if server is not None:
            server.stop()
        if data_dir is not None:
            shutil.rmtree(data_dir, ignore_errors=True)
    buffer = io.StringIO()
    Console(file=buffer, width=200, color_system=None).print(table(results))
    Console(width=200).print(table(results))
    for r in results:
        print(f"{r.name}: {r.check}; {r.load}; waits: {dict(r.waits.most_common(6))}")
    argv = " ".join(sys.argv[1:]).replace(args.database_url or "\0", "URL")  # no password in the doc
    command = f".venv/bin/python scripts/bench/admission.py {argv}".strip()
    write_section(TITLE, command, doc_body(results, buffer.getvalue()), pg_version)
    print(f"wrote {DOC.relative_to(PROJECT_ROOT)}")
    if any(not r.check.startswith("ok") for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
