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
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ledger.db import EmbeddedDatabase
from scripts.bench.floor_app import MODES
from scripts.bench.proxy import (
    CUSTOMER,
    DIRECT_KEY,
    Ledger,
    Meter,
    Run,
    Service,
    Target,
    _interrupt,
    body,
    fake,
    free_port,
    mean,
    model_list,
    settle,
    start_spendledger,
    started,
    wrk,
)
from scripts.bench.report import write_section

TITLE = "The floor under the latency at 1 connection (issue 6)"
FLOOR_UPSTREAM_KEY = "floor-upstream"  # the fake upstream counts the floor apps' requests apart
FLOOR_APP = "scripts/bench/floor_app.py"


def floor_app(mode: str, workdir: Path, database_url: str) -> contextlib.AbstractContextManager[Service]:
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "--factory", "scripts.bench.floor_app:create_app", "--host",
            "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http", "httptools", "--log-level",
            "warning", "--no-access-log"]  # fmt: skip
    env = {"FLOOR_MODE": mode, "FLOOR_CONFIG": str(workdir / "floor.yaml"), "DATABASE_URL": database_url}
    return started(f"floor {mode}", argv, workdir, f"http://127.0.0.1:{port}", "/health", env=env)


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
    spendledger, publisher, sl_target = start_spendledger(stack, workdir, database.url, upstream, sinks, 1, True)
    targets = [Target("direct", upstream.url, DIRECT_KEY, body(CUSTOMER))]
    groups = {"spendledger": spendledger.process.pid, "upstream": upstream.process.pid,
              "sinks": sinks.process.pid, "postgres": int((database.data_dir / "postmaster.pid").read_text().split()[0])}  # fmt: skip
    if publisher is not None:
        groups["publisher"] = publisher.pid
    (workdir / "floor.yaml").write_text(model_list(upstream.url, FLOOR_UPSTREAM_KEY))  # the same upstream
    for mode in MODES:
        app = stack.enter_context(floor_app(mode, workdir, database.url))
        targets.append(Target(f"floor {mode}", app.url, DIRECT_KEY, body(CUSTOMER)))
        groups[f"floor {mode}"] = app.process.pid
    targets.append(sl_target)
    meter, ledger = Meter(groups), Ledger(database.url)
    pg_version = str(ledger.value("show server_version"))

    def measure(target: Target, conns: int, seconds: float) -> Run:
        meter.wait_quiet(0.3, args.quiet_wait)
        run = wrk(target, conns, seconds, meter)
        settle(ledger, upstream)  # every forwarded request recorded, the outbox drained
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
    text = markdown(runs, [t.name for t in targets], args)
    print(text)
    if not args.no_doc:
        command = f".venv/bin/python scripts/bench/floor.py {' '.join(sys.argv[1:])}".strip()
        write_section(TITLE, command, text, pg_version)
        print(f"wrote {TITLE!r} in docs/benchmarks.md")


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
        "(a budgeted customer, Lago and signed webhooks on, `serve --no-publisher` beside `spendledger publish`). "
        f"The floor app ({FLOOR_APP}): `none` is the HTTP path alone; `insert` adds a durable one-row append "
        "after the upstream call; `admit+insert` also a `select 1` round trip before it.\n\n"
        + "\n".join(lines)
        + "\n"
    )


if __name__ == "__main__":
    main()
