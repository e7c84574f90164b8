"""spendledger's setups against each other (issue 17): alternating A/B runs on one database.

Each variant is started in turn with proxy.py's setup (a generated key, the budgeted customer, Lago
and signed webhooks on the fake receivers), warmed for 2 s, measured with `wrk -c<conns>`, and
stopped; --rounds rounds. Prints each run and the means; writes nothing (the numbers go into
docs/benchmarks.md by hand, with this command).

Variants: `child` (the default `serve`), `stopped` (the same with its publisher child SIGSTOPped
for the run: nothing delivers), `inline` (the publisher on the serving event loop), `separate`
(`serve --no-publisher` beside `spendledger publish`), `nice<N>` (the child reniced to N), `w<N>`
(`--workers N`).

    .venv/bin/python scripts/bench/variants.py child,stopped,inline [--rounds 3] [--duration 8] [--connections 1]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.bench.proxy import Ledger, Meter, Run, Service, fake, mean, settle, start_spendledger, wrk
from spendledger.ledger.db import EmbeddedDatabase


def measure(
    variant: str, args: argparse.Namespace, workdir: Path, database: EmbeddedDatabase, upstream: Service, sinks: Service
) -> Run:
    with contextlib.ExitStack() as stack:
        workers = int(variant[1:]) if variant.startswith("w") else 1
        mode = variant if variant in ("inline", "separate") else "child"
        server, publisher, target = start_spendledger(stack, workdir, database.url, upstream, sinks, workers, mode)
        if variant.startswith("nice") and publisher is not None:
            os.setpriority(os.PRIO_PROCESS, publisher, int(variant.removeprefix("nice")))
        postgres = int((database.data_dir / "postmaster.pid").read_text().split()[0])
        groups = {"spendledger": server.process.pid, "postgres": postgres, "fakes": upstream.process.pid}
        nested = {}
        if publisher is not None:
            groups["publisher"] = publisher
            if mode == "child":
                nested["publisher"] = "spendledger"
        meter = Meter(groups, nested)
        wrk(target, args.connections, 2, meter)
        if variant == "stopped" and publisher is not None:
            os.kill(publisher, signal.SIGSTOP)
        try:
            run = wrk(target, args.connections, args.duration, meter)
        finally:
            if variant == "stopped" and publisher is not None:
                os.kill(publisher, signal.SIGCONT)
        ledger = Ledger(database.url)
        try:
            settle(ledger, upstream)  # delivered before the next variant starts
        finally:
            ledger.close()
        return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("variants", help="comma-separated: child, stopped, inline, separate, nice<N>, w<N>")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=1)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
    variants = args.variants.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="sl-bench-variants-", dir="/tmp"))
    database: EmbeddedDatabase | None = None
    runs: dict[str, list[Run]] = {v: [] for v in variants}
    try:
        database = EmbeddedDatabase(workdir / "pg")
        with fake("upstream", workdir) as upstream, fake("sinks", workdir) as sinks:
            rounds(variants, runs, args, workdir, database, upstream, sinks)
    finally:
        if database is not None:
            database.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nmeans of {args.rounds} rounds of {args.duration:g} s at {args.connections} connection(s):")
    for variant, mine in runs.items():
        print(f"{variant:>9}: {mean([r.rps for r in mine]):7,.0f} req/s  p50 {mean([r.p50_ms for r in mine]):6.2f} ms"
              f"  p99 {mean([r.p99_ms for r in mine]):7.2f} ms")  # fmt: skip


def rounds(
    variants: list[str], runs: dict[str, list[Run]], args: argparse.Namespace, workdir: Path,
    database: EmbeddedDatabase, upstream: Service, sinks: Service,
) -> None:  # fmt: skip
    for number in range(args.rounds):
        for variant in variants:
            run = measure(variant, args, workdir, database, upstream, sinks)
            runs[variant].append(run)
            cpu = " ".join(f"{k} {v:.2f}" for k, v in run.cpu.items() if k not in ("bench", "wrk"))
            print(f"{variant:>9} round {number + 1}: {run.rps:7,.0f} req/s  p50 {run.p50_ms:6.2f} ms  "
                  f"p99 {run.p99_ms:7.2f} ms  cores: {cpu}", flush=True)  # fmt: skip
            time.sleep(1)


if __name__ == "__main__":
    main()
