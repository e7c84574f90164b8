"""The floor under spendledger's latency at 1 connection (issue 6): what any design of its shape adds.

DESIGN.md's hot path has two database round trips: the admission before the upstream call (which
budget leases, ledger/leases.py, take off the path of most requests) and the commit of the
request's `UsageRecorded` before its response, which no design of this shape can drop. This measures,
in the same run and on the same fake upstream, alternating: the upstream directly; the floor app
(scripts/bench/floor_app.py: spendledger's server, framework and upstream client, with only a
durable one-row append after the upstream call — `insert` — or also a `select 1` round trip
before it — `admit+insert`); and spendledger itself, set up as scripts/bench/proxy.py sets it up.
The difference between the floor (`insert`, with leases) and spendledger is what spendledger's
own admission and settle cost beyond the least their round trips do. Writes "## The floor …" of docs/benchmarks.md.

    .venv/bin/python scripts/bench/floor.py [--duration 10] [--rounds 3] [--connections 1]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.bench.floor_app import MODES
from scripts.bench.proxy import (
    CUSTOMER,
    DIRECT_KEY,
    FLOOR_UPSTREAM_KEY,
    Ledger,
    Meter,
    Run,
    Target,
    _interrupt,
    body,
    fake,
    floor_app,
    mean,
    model_list,
    settle,
    start_spendledger,
    wrk,
)
from scripts.bench.report import write_section
from spendledger.ledger.db import EmbeddedDatabase

TITLE = "The floor under the latency at 1 connection (issue 6)"
FLOOR_APP = "scripts/bench/floor_app.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of each measured run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of each target per conns")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up per target")
    parser.add_argument("--connections", type=int, nargs="+", default=[1], help="wrk's connection counts")
    parser.add_argument("--quiet-wait", type=float, default=30.0, help="seconds to wait at most for calm")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: apt-get update && apt-get install -y wrk")
    workdir = Path(tempfile.mkdtemp(prefix="sl-bench-floor-", dir="/tmp"))
    database: EmbeddedDatabase | None = None
    try:
        database = EmbeddedDatabase(workdir / "pg")
        with contextlib.ExitStack() as stack:
            bench(args, workdir, database, stack)
    finally:
        if database is not None:
            database.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def bench(args: argparse.Namespace, workdir: Path, database: EmbeddedDatabase, stack: contextlib.ExitStack) -> None:
    upstream = stack.enter_context(fake("upstream", workdir))
    sinks = stack.enter_context(fake("sinks", workdir))
    spendledger, publisher, sl_target = start_spendledger(stack, workdir, database.url, upstream, sinks, 1)
    targets = [Target("direct", upstream.url, DIRECT_KEY, body(CUSTOMER))]
    groups = {"spendledger": spendledger.process.pid, "upstream": upstream.process.pid,
              "sinks": sinks.process.pid, "postgres": int((database.data_dir / "postmaster.pid").read_text().split()[0])}  # fmt: skip
    if publisher is not None:
        groups["publisher"] = publisher
    (workdir / "floor.yaml").write_text(model_list(upstream.url, FLOOR_UPSTREAM_KEY))  # the same upstream
    for mode in MODES:
        app = stack.enter_context(floor_app(mode, workdir, database.url))
        targets.append(Target(f"floor {mode}", app.url, DIRECT_KEY, body(CUSTOMER)))
        groups[f"floor {mode}"] = app.process.pid
    targets.append(sl_target)
    meter, ledger = Meter(groups, {"publisher": "spendledger"}), Ledger(database.url)
    pg_version = str(ledger.value("show server_version"))
    # Where PostgreSQL's part of a request goes: time inside each function, and the WAL flushes.
    ledger.value("alter system set track_functions = 'pl'")
    ledger.value("alter system set track_wal_io_timing = on")
    ledger.value("select pg_reload_conf()")
    inside: dict[str, list[dict[str, float]]] = {}

    def measure(target: Target, conns: int, seconds: float) -> Run:
        meter.wait_quiet(0.3, args.quiet_wait)
        before = database_times(ledger)
        run = wrk(target, conns, seconds, meter)
        settle(ledger, upstream)  # every forwarded request recorded, the outbox drained
        inside.setdefault(target.name, []).append(per_request(before, database_times(ledger), run))
        if any(run.errors.values()):
            raise SystemExit(f"{target.name}: errors {run.errors}")
        print(f"{target.name:>18} c{conns:<3} {run.rps:9,.0f} req/s  p50 {run.p50_ms:6.2f} ms  "
              f"p99 {run.p99_ms:6.2f} ms", flush=True)  # fmt: skip
        return run

    for target in targets:
        measure(target, 1, args.warmup)
    runs: list[tuple[int, Run]] = []
    for conns in args.connections:
        for number in range(args.rounds):
            runs += [(number, measure(target, conns, args.duration)) for target in targets]
    ledger.close()
    text = markdown(runs, [t.name for t in targets], args) + database_markdown(inside)
    print(text)
    if not args.no_doc:
        command = f".venv/bin/python scripts/bench/floor.py {' '.join(sys.argv[1:])}".strip()
        write_section(TITLE, command, text, pg_version)
        print(f"wrote {TITLE!r} in docs/benchmarks.md")


def database_times(ledger: Ledger) -> dict[str, float]:
    """Cumulative ms inside each sl_ function (calls too) and in WAL flushes, as PostgreSQL counts them
    (its backends report at most once a second, so wait for them)."""
    time.sleep(1.5)
    ledger.value("select pg_stat_clear_snapshot()")
    times = {"wal_sync": float(ledger.value("select wal_sync from pg_stat_wal")),
             "wal_sync_ms": float(ledger.value("select wal_sync_time from pg_stat_wal")),
             "commits": float(ledger.value("select xact_commit from pg_stat_database where datname = current_database()"))}  # fmt: skip
    for row in ledger.rows("select funcname, calls, total_time from pg_stat_user_functions where funcname like 'sl_%'"):
        times[f"{row['funcname']} calls"] = float(row["calls"])
        times[f"{row['funcname']} ms"] = float(row["total_time"])
    return times


def per_request(before: dict[str, float], after: dict[str, float], run: Run) -> dict[str, float]:
    """Of one run: ms per request inside each function that was called, WAL flushes per request and
    their mean ms."""
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    requests = max(run.requests, 1)
    out: dict[str, float] = {}
    for key, value in delta.items():
        # Those called for at least one request in 200 (the sweeps and leases of a second are noise here).
        if key.endswith(" calls") and value / requests >= 0.005:
            function = key.removesuffix(" calls")
            out[f"{function}: calls per request"] = value / requests
            out[f"{function}: ms per call"] = delta[f"{function} ms"] / value
    if delta["wal_sync"] > 0:
        out["WAL flushes per request"] = delta["wal_sync"] / requests
        out["WAL flush: ms each"] = delta["wal_sync_ms"] / delta["wal_sync"]
    return out


def database_markdown(inside: dict[str, list[dict[str, float]]]) -> str:
    lines = ["", "Inside PostgreSQL during the measured runs (`track_functions`, `track_wal_io_timing`; means of the "
             "rounds, the warm-up excluded):", "", "| target | what | value |", "|---|---|---|"]  # fmt: skip
    for name, runs in inside.items():
        measured = runs[1:] or runs
        for key in sorted({k for r in measured for k in r}):
            lines.append(f"| {name} | {key} | {mean([r.get(key, 0.0) for r in measured]):.3f} |")
    return "\n".join(lines) + "\n"


def markdown(runs: list[tuple[int, Run]], names: list[str], args: argparse.Namespace) -> str:
    """Per target and connection count: req/s, p50, p99 (means of the rounds), and the p50 added over
    the upstream direct, round by round (each against its own round's direct run)."""
    lines = [
        "| target | conns | req/s | p50 ms | p99 ms | p50 added over direct, ms (mean; each round) |",
        "|---|---|---|---|---|---|",
    ]
    for conns in args.connections:
        direct = {n: r for n, r in runs if r.target == "direct" and r.connections == conns}
        for name in names:
            mine = [(n, r) for n, r in runs if r.target == name and r.connections == conns]
            added = [r.p50_ms - direct[n].p50_ms for n, r in mine]
            rounds = " / ".join(f"{a:+.2f}" for a in added)
            lines.append(
                f"| {name} | {conns} | {mean([r.rps for _, r in mine]):,.0f} | {mean([r.p50_ms for _, r in mine]):.2f} "
                f"| {mean([r.p99_ms for _, r in mine]):.2f} | "
                + ("–" if name == "direct" else f"**{mean(added):+.2f}** ({rounds})")
                + " |"
            )
    return (
        f"{args.rounds} rounds of {args.duration:g} s per target, alternating in the order of the table, "
        f"`wrk -t1 -c<conns>` with the body of scripts/bench/proxy.py; spendledger set up as there "
        "(a budgeted customer, Lago and signed webhooks on, `serve` as the README starts it: its publisher child delivers). "
        f"The floor app ({FLOOR_APP}): `none` is the HTTP path alone; `insert` adds a durable one-row append "
        "after the upstream call; `admit+insert` also a `select 1` round trip before it.\n\n"
        + "\n".join(lines)
        + "\n"
    )


if __name__ == "__main__":
    main()
