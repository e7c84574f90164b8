"""The webhook follower alone (issue 17): PostgreSQL time per usage event it follows, this
checkout's `sl_webhook_rows` against an older text of it, alternating in one database.

spendledger (`serve --no-publisher`, so nothing follows meanwhile) serves the proxy benchmark's
requests (a budgeted customer, Lago and webhooks on) at 1 and at 64 connections until the log holds
--events marked usage events; the server stops. Then each variant follows the whole backlog in
batches of the publisher's size (`sl_follow_webhooks`), inside a transaction rolled back after, so
every variant and round follows the same events from the same checkpoint; the variants alternate,
--rounds times. The older text is the `DOWNGRADE` of an alembic revision (--base-revision, default
0020: before its scopes were resolved once per run).

    .venv/bin/python scripts/bench/webhook_follower.py [--events 4000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import asyncpg

from scripts.bench.proxy import Ledger, Meter, fake, start_spendledger, wrk
from spendledger.ledger.db import EmbeddedDatabase, split_sql
from spendledger.ledger.sql import function_definitions
from spendledger.ledger.webhook_rows import BATCH

PROJECT_ROOT = Path(__file__).resolve().parents[2]

CONTEXT = '{"webhooks": true, "default_budget_id": null, "global_max_budget": null, "global_budget_duration": null}'


def revision_text(number: str, name: str) -> str:
    """`DOWNGRADE` of revision `number`: the function texts it replaced."""
    [path] = (PROJECT_ROOT / "alembic" / "versions").glob(f"{number}_*.py")
    spec = importlib.util.spec_from_file_location(f"revision_{number}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text: str = module.DOWNGRADE
    if f"{name}(" not in text.lower():
        raise SystemExit(f"revision {number}'s downgrade does not define {name}")
    return text


def load_backlog(workdir: Path, database: EmbeddedDatabase, events: int) -> int:
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(fake("upstream", workdir))
        sinks = stack.enter_context(fake("sinks", workdir))
        _, _, target = start_spendledger(stack, workdir, database.url, upstream, sinks, 1, "none")
        ledger = Ledger(database.url)
        try:
            for connections in (1, 64):  # runs of one event, then the batches of a loaded server
                while (marked := backlog(ledger)) < events * (1 if connections == 64 else 0.3):
                    wrk(target, connections, 2, Meter({}))
            return marked
        finally:
            ledger.close()


def backlog(ledger: Ledger) -> int:
    return int(ledger.value(
        "select count(*) from events e, projection_checkpoints c where c.name = 'webhooks' "
        "and (e.txid, e.position) > (c.last_txid, c.last_position) and e.metadata ? 'webhooks'"
    ))  # fmt: skip


async def follow_all(conn: asyncpg.Connection) -> tuple[float, int]:
    """Follow the whole backlog in a transaction rolled back after; (seconds, events read)."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        start, total = time.perf_counter(), 0
        while (n := await conn.fetchval("select sl_follow_webhooks($1, $2::jsonb)", BATCH, CONTEXT)) > 0:
            total += n
        return time.perf_counter() - start, total
    finally:
        await transaction.rollback()


async def compare(url: str, variants: dict[str, str], rounds: int) -> dict[str, list[float]]:
    conn = await asyncpg.connect(url)
    per_event: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for number in range(rounds + 1):  # the first round warms the caches and is not counted
            for name, text in variants.items():
                for statement in split_sql(text):
                    await conn.execute(statement)
                seconds, events = await follow_all(conn)
                if number:
                    per_event[name].append(seconds / events * 1e6)
                    print(f"{name:>10} round {number}: {events:,} events in {seconds * 1000:,.0f} ms "
                          f"({seconds / events * 1e6:.1f} µs per event)", flush=True)  # fmt: skip
    finally:
        await conn.close()
    return per_event


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=4000, help="marked usage events to follow")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--base-revision", default="0020")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
    variants = {
        f"before {args.base_revision}": revision_text(args.base_revision, "sl_webhook_rows"),
        "this checkout": function_definitions()["sl_webhook_rows"],
    }
    workdir = Path(tempfile.mkdtemp(prefix="sl-bench-follower-", dir="/tmp"))
    database: EmbeddedDatabase | None = None
    try:
        database = EmbeddedDatabase(workdir / "pg")
        marked = load_backlog(workdir, database, args.events)
        print(f"backlog: {marked:,} marked usage events", flush=True)
        per_event = asyncio.run(compare(database.url, variants, args.rounds))
        for name, values in per_event.items():
            print(f"{name}: median {statistics.median(values):.1f} µs per event followed "
                  f"({', '.join(f'{v:.1f}' for v in values)})")  # fmt: skip
    finally:
        if database is not None:
            database.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
