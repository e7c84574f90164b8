"""Outbox delivery to Lago (issue 4): (a) drain a backlog of N pending Lago rows (one INSERT … SELECT
generate_series) with P in-process publishers (`Publisher` + `LagoSink`, own httpx client each), then
check the receiver holds N distinct transaction_ids and the outbox N delivered rows; (b) `record_usage`
with its `lago_row` at R/s for S s while one publisher runs: lag = delivered_at − created_at, ack = the
publisher saw its mark committed − created_at. Receivers, each under uvicorn in a child process (not
sharing our GIL): the fake Lago of tests/fakes/lago.py, and a raw ASGI app that only dedupes
transaction_ids. Publish cycles are timed by phase. Writes "## Outbox delivery (issue 4)" of
docs/benchmarks.md.

    .venv/bin/python scripts/bench/outbox.py [--backlog 100000] [--rate 200] [--seconds 10]
        [--publishers 1] [--receiver fake|raw|both] [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import msgspec
import uvicorn
from rich import box
from rich.console import Console
from rich.table import Table

from spendledger.ledger.config import LagoSettings
from spendledger.ledger.db import EmbeddedDatabase, create_pool, run_migrations
from spendledger.ledger.events import UsageRecorded
from spendledger.ledger.outbox import Claimed, Delivery, Publisher, Sink
from spendledger.ledger.sinks.lago import LagoSink, lago_row
from spendledger.ledger.usage import record_usage

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scripts.bench.report import DOC, write_section
from tests.fakes.lago import DEFAULT_API_KEY, FakeLago

PROJECT_ROOT = Path(__file__).resolve().parents[2]

TITLE = "Outbox delivery (issue 4)"
PHASES = ("claim", "post", "mark", "commit")
# lago_row's payload, built in SQL: 1,000 subscribers, varying token counts, a many-digit cost.
BACKLOG_SQL = """
insert into outbox (sink, dedupe_key, payload, call_id)
select 'lago', tid, jsonb_build_object('transaction_id', tid, 'external_subscription_id', sub,
    'external_customer_id', sub, 'code', 'llm_usage', 'timestamp', round(extract(epoch from now()), 3),
    'properties', jsonb_build_object('input_tokens', 100 + g % 900, 'output_tokens', 20 + g % 400,
        'total_tokens', 120 + g % 900 + g % 400, 'model', 'gpt-4o-mini',
        'response_cost', (g % 997) * 0.000000123456789)), tid
from (select g, 'bench-' || md5(g::text) as tid, 'cust-' || g % 1000 as sub
      from generate_series(1, $1::int) as g) as s
"""


class _Event(msgspec.Struct):
    transaction_id: str


class Receiver:
    """ASGI: `/bench/stats` and `/bench/reset` for us; all else to the fake Lago or, without one,
    decoded for its transaction_ids, counted, deduped and answered 200."""

    def __init__(self, fake: FakeLago | None) -> None:
        self.fake, self.ids, self.posts = fake, set[str](), 0
        self._decode = msgspec.json.Decoder(dict[str, list[_Event]]).decode

    def stats(self) -> dict[str, int]:
        if self.fake is None:
            return {"distinct": len(self.ids), "posts": self.posts}
        ids = self.fake.accepted_transaction_ids()
        return {"distinct": len(set(ids)), "posts": len(self.fake.event_requests())}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.fake is not None and not scope["path"].startswith("/bench/"):
            return await self.fake(scope, receive, send)
        body, more, reply = b"", True, b'{"events":[]}'
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        if scope["path"] == "/bench/stats":
            reply = msgspec.json.encode(self.stats())
        elif scope["path"] == "/bench/reset":
            self.ids, self.posts = set(), 0
            if self.fake is not None:
                self.fake.reset()
        else:
            self.ids.update(e.transaction_id for e in self._decode(body)["events"])
            self.posts += 1
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(reply)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": reply})
        return None


def serve(kind: str, out: Connection) -> None:
    """The child process. With IPPROTO_TCP named, asyncio sets TCP_NODELAY on accepted connections:
    without it (as in run_fake_lago) every answer waits ~40 ms for a delayed ACK (Nagle)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts them
    out.send(sock.getsockname()[1])
    app = Receiver(FakeLago() if kind == "fake" else None)
    config = uvicorn.Config(app, loop="asyncio", log_level="warning", lifespan="off", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


@contextlib.contextmanager
def receiver(kind: str) -> Iterator[str]:
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=serve, args=(kind, theirs), daemon=True)
    process.start()
    try:
        if not ours.poll(30):
            raise SystemExit(f"the {kind} receiver did not start")
        yield f"http://127.0.0.1:{ours.recv()}"
    finally:
        process.terminate()
        process.join(10)


def cpu_seconds() -> tuple[float, float]:
    """CPU time used so far by this process, and by the whole machine (others' work included)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return time.process_time(), (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    name: str
    receiver: str
    events: int = 0
    delivered: int = 0
    elapsed: float = 0.0
    lag_ms: tuple[float, float, float] | None = None  # p50, p99, max of delivered_at − created_at
    ack_ms: list[float] = field(default_factory=list)
    record_ms: list[float] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    batches: int = 0
    notes: str = ""
    check: str = ""


class TimedPublisher(Publisher):
    """A Publisher whose non-empty cycles are stamped: start | post | posted | marked | end."""

    def __init__(self, pool: asyncpg.Pool, db: str, sink: LagoSink, result: Result) -> None:
        super().__init__(pool, db, [sink])
        self.result, self.stamps, deliver = result, list[float](), sink.deliver

        async def timed(rows: Sequence[Claimed]) -> Delivery:
            self.stamps.append(time.perf_counter())
            delivery = await deliver(rows)
            self.stamps.append(time.perf_counter())
            return delivery

        sink.deliver = timed  # type: ignore[method-assign]

    async def publish_once(self, sink: Sink) -> int:
        self.stamps[:] = [time.perf_counter()]
        if n := await super().publish_once(sink):
            self.stamps.append(time.perf_counter())
            for phase, start, end in zip(PHASES, self.stamps[:-1], self.stamps[1:], strict=True):
                self.result.phases[phase] += end - start
            self.result.batches += 1
        return n

    async def _mark(self, conn: Any, sink: Sink, rows: Sequence[Claimed], delivery: Delivery) -> None:
        await super()._mark(conn, sink, rows, delivery)
        self.stamps.append(time.perf_counter())


async def publish(pool: asyncpg.Pool, db: str, url: str, result: Result, publishers: int,
                  settings: LagoSettings, load: Callable[[], Awaitable[int]]) -> None:  # fmt: skip
    """Run publishers while `load` runs and until all its rows are delivered (or 300 s more pass)."""
    async with httpx.AsyncClient() as http:
        (await http.post(url + "/bench/reset")).raise_for_status()
    everything = asyncio.Event()

    def on_delivered(_sink: str, rows: Sequence[Claimed], delivery: Delivery) -> None:
        now, ids = time.time(), set(delivery.delivered)
        result.ack_ms += [(now - row.created_at.timestamp()) * 1000 for row in rows if row.id in ids]
        result.delivered += len(ids)
        if result.events and result.delivered >= result.events:
            everything.set()

    clients = [httpx.AsyncClient(limits=httpx.Limits(max_connections=100)) for _ in range(publishers)]
    pubs = [TimedPublisher(pool, db, LagoSink(settings, client), result) for client in clients]
    for pub in pubs:
        pub.on_delivered.append(on_delivered)
    cpu, start = cpu_seconds(), time.perf_counter()
    tasks = [asyncio.create_task(pub.run()) for pub in pubs]
    result.events = await load()
    if result.delivered < result.events:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(everything.wait(), 300)
    result.elapsed = time.perf_counter() - start
    ours, machine = ((b - a) / result.elapsed for a, b in zip(cpu, cpu_seconds(), strict=True))
    result.notes += f"CPU: this process {ours:.0%}, machine {machine:.0%} of {os.cpu_count()}00%"
    for task in tasks:
        task.cancel()
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(outcome, Exception):  # a publisher that died: the bench is void
            raise outcome
    for client in clients:
        await client.aclose()
    async with httpx.AsyncClient() as http:
        stats = (await http.get(url + "/bench/stats")).json()
    states = {r[0]: r[1] for r in await pool.fetch("select state, count(*) from outbox group by 1")}
    ok = stats["distinct"] == result.events == states.get("delivered") == sum(states.values())
    result.check = (f"{'ok' if ok else 'FAILED'}: receiver has {stats['distinct']:,} distinct "
                    f"transaction_ids from {stats['posts']:,} posts; outbox {states}")  # fmt: skip


async def bench(db: str, url: str, kind: str, args: argparse.Namespace) -> list[Result]:
    settings = LagoSettings(api_base=url, api_key=DEFAULT_API_KEY, event_code="llm_usage", charge_by="end_user_id")  # fmt: skip
    drain = Result(f"(a) drain {args.backlog:,}, {args.publishers} publisher(s)", kind)
    steady = Result(f"(b) {args.rate:g}/s for {args.seconds:g} s, 1 publisher", kind)
    pool = await create_pool(db, min_size=2, max_size=args.publishers + 32)

    async def record(n: int) -> None:
        now, start = datetime.now(UTC), time.perf_counter()
        event = UsageRecorded(
            call_id=f"bench-{uuid.uuid4()}", route="chat.completions", model_group="gpt-4o-mini",
            deployment_id="bench-dep", provider="openai", upstream_model="gpt-4o-mini", key_hash="k" * 64,
            customer_id=f"cust-{n % 100}", status="success", http_status=200, input_tokens=812,
            output_tokens=164, total_tokens=976, cost=Decimal("0.000220200000000001"), priced=True,
            started_at=now, ended_at=now,
        )  # fmt: skip
        await record_usage(pool, event, outbox=[lago_row(event, settings)])
        steady.record_ms.append((time.perf_counter() - start) * 1000)

    async def backlog() -> int:
        return int(args.backlog)

    async def at_rate() -> int:
        await asyncio.sleep(0.2)  # the publisher is listening
        start, tasks = time.perf_counter(), list[asyncio.Task[None]]()
        while (due := len(tasks) / args.rate) < args.seconds:
            await asyncio.sleep(max(0.0, start + due - time.perf_counter()))
            tasks.append(asyncio.create_task(record(len(tasks))))
        await asyncio.gather(*tasks)
        return len(tasks)

    try:
        start = time.perf_counter()
        await pool.execute(BACKLOG_SQL, args.backlog)
        await pool.execute("vacuum analyze outbox")  # as autovacuum would, while a backlog builds up
        drain.notes = f"insert + vacuum analyze {time.perf_counter() - start:.1f} s; "
        await publish(pool, db, url, drain, args.publishers, settings, backlog)
        await pool.execute("truncate outbox")
        await publish(pool, db, url, steady, 1, settings, at_rate)
        lags = await pool.fetchrow(
            "select percentile_cont(array[0.5, 0.99]) within group (order by lag), max(lag) from (select "
            "extract(epoch from delivered_at - created_at)::float8 * 1000 as lag from outbox) as s"
        )
        if lags is not None and lags[0] is not None:
            steady.lag_ms = (lags[0][0], lags[0][1], lags[1])
        steady.notes += f"; record_usage p50 {pct(steady.record_ms, 0.5):.1f} ms, p99 {pct(steady.record_ms, 0.99):.1f} ms"  # fmt: skip
        await pool.execute("truncate outbox")
    finally:
        await pool.close()
    return [drain, steady]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def table(results: list[Result]) -> Table:
    out = Table(box=box.MARKDOWN)
    for column in ("scenario", "receiver", "events", "events/s", "lag p50 ms", "lag p99 ms", "lag max ms",
                   "ack p99 ms", "claim / post / mark / commit, ms per batch", "check"):  # fmt: skip
        out.add_column(column)
    for r in results:
        lag = [f"{v:.1f}" for v in (*r.lag_ms, pct(r.ack_ms, 0.99))] if r.lag_ms else ["–"] * 4
        split = " / ".join(f"{r.phases[p] * 1000 / max(1, r.batches):.1f}" for p in PHASES)
        out.add_row(r.name, r.receiver, f"{r.events:,}", f"{r.delivered / r.elapsed:,.0f}", *lag, split,
                    r.check.split(":")[0])  # fmt: skip
    return out


def doc_body(results: list[Result], markdown: str) -> str:
    notes = "\n".join(f"- {r.name}, {r.receiver}: {r.check}; {r.notes}" for r in results)
    return f"{markdown.strip()}\n\n{notes}\n"


async def admin(url: str, sql: str) -> str:
    """Run `sql` on the server; return the server's version."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
        return str(await conn.fetchval("show server_version"))
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    for flag, cast, default in (("--backlog", int, 100_000), ("--rate", float, 200.0),
                                ("--seconds", float, 10.0), ("--publishers", int, 1)):  # fmt: skip
        parser.add_argument(flag, type=cast, default=default)
    parser.add_argument("--receiver", choices=("fake", "raw", "both"), default="both")
    parser.add_argument("--database-url", help="a server where we may CREATE DATABASE (else embedded)")
    args = parser.parse_args()
    data_dir, server, admin_url = None, None, args.database_url
    if admin_url is None:
        data_dir = Path(tempfile.mkdtemp(prefix="sl-bench-pg-", dir="/tmp"))
        server = EmbeddedDatabase(data_dir)
        admin_url = server.url
    name, results = f"sl_bench_{uuid.uuid4().hex[:12]}", list[Result]()
    db = urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}"))
    try:
        pg_version = asyncio.run(admin(admin_url, f"create database {name}"))
        try:
            run_migrations(db)
            for kind in ("fake", "raw") if args.receiver == "both" else (args.receiver,):
                with receiver(kind) as url:
                    results += asyncio.run(bench(db, url, kind, args))
        finally:
            asyncio.run(admin(admin_url, f"drop database if exists {name} with (force)"))
    finally:
        if server is not None:
            server.stop()
        if data_dir is not None:
            shutil.rmtree(data_dir, ignore_errors=True)
    console = Console(width=240, record=True)
    console.print(table(results))
    for r in results:
        print(f"{r.name}, {r.receiver}: {r.check}; {r.notes}")
    argv = [("URL" if a == args.database_url else a) for a in sys.argv[1:]]  # no password in the doc
    command = " ".join([".venv/bin/python", "scripts/bench/outbox.py", *argv])
    write_section(TITLE, command, doc_body(results, console.export_text()), pg_version)
    print(f"wrote {DOC.relative_to(PROJECT_ROOT)}")
    if any(not r.check.startswith("ok") for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
