"""Rebuild speed (issue 5): replay 1,000,000 generated usage events into fresh projections.

An embedded PostgreSQL in a temp dir (or --database-url: a database of our own is created and
dropped there); N usage events over a month for 1,000 customers and 50 teams are generated in SQL;
a first rebuild builds the live projections; then a verify-only rebuild (replay + row-by-row
comparison) and a swapping rebuild are timed. Writes "## Rebuild (issue 5)" in docs/benchmarks.md.

    .venv/bin/python scripts/bench/rebuild.py [--events 1000000] [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.bench.report import write_section
from spendledger.ledger.db import EmbeddedDatabase, run_migrations
from spendledger.projections.export_files import csv_bytes
from spendledger.projections.rebuild import Report, rebuild
from spendledger.projections.reconciliation import reconciliation_rows

GENERATE = """
insert into events (stream, version, type, data, metadata)
select 'request:bench-' || i, 1, 'UsageRecorded', jsonb_build_object(
    'type', 'UsageRecorded', 'call_id', 'bench-' || i, 'route', 'chat.completions', 'model_group', 'gpt-4o-mini',
    'deployment_id', 'd1', 'provider', 'openai', 'upstream_model', 'gpt-4o-mini', 'key_hash', md5((i % 200)::text),
    'customer_id', 'customer-' || (i % 1000), 'team_id', 'team-' || (i % 50), 'status', 'success',
    'http_status', 200, 'input_tokens', 100 + i % 37, 'output_tokens', 20 + i % 11, 'total_tokens', 120 + i % 37 + i % 11,
    'cost', (0.00000015 * (100 + i % 37) + 0.0000006 * (20 + i % 11))::numeric, 'priced', true,
    'started_at', timestamptz '2026-10-01' + (i * interval '2.592 seconds'),
    'ended_at', timestamptz '2026-10-01' + (i * interval '2.592 seconds') + interval '300 ms',
    'budget_periods', jsonb_build_array(jsonb_build_array('customer', 'customer-' || (i % 1000), '1970-01-01T00:00:00+00:00'))
), '{}'
from generate_series($1::bigint, $2::bigint) as i
"""


async def generate(url: str, events: int) -> float:
    conn = await asyncpg.connect(url)
    started = time.perf_counter()
    for lo in range(1, events + 1, 100_000):
        await conn.execute(GENERATE, lo, min(lo + 99_999, events))
    await conn.execute("vacuum analyze events")
    await conn.close()
    return time.perf_counter() - started


def line(name: str, report: Report) -> str:
    check = "equal" if report.equal else f"DIFFERENT: {', '.join(report.differences)}"
    return (
        f"| {name} | {report.events:,} | {report.seconds:.1f} | {report.events_per_second:,.0f} | {check} |"
    )


async def main(args: argparse.Namespace) -> None:
    temp = None
    if args.database_url:
        name = f"sl_bench_{uuid.uuid4().hex[:8]}"
        admin = await asyncpg.connect(args.database_url)
        await admin.execute(f"create database {name}")
        url = urlunsplit(urlsplit(args.database_url)._replace(path=f"/{name}"))
    else:
        temp = Path(tempfile.mkdtemp(prefix="sl-bench-pg-"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            embedded = EmbeddedDatabase(temp)
        url = embedded.url
    try:
        await asyncio.to_thread(run_migrations, url)
        generated = await generate(url, args.events)
        first = await rebuild(url)  # builds the live projections from the generated log
        verify = await rebuild(url, verify_only=True)
        swap = await rebuild(url)
        conn = await asyncpg.connect(url)
        exports = []
        for by, period in (("customer", "day"), ("customer", "month"), ("team", "month")):
            started = time.perf_counter()
            export = await reconciliation_rows(conn, by, period)
            csv = csv_bytes(export)
            exports.append(
                f"| {by} per {period} | {len(export.rows):,} | {time.perf_counter() - started:.1f} | "
                f"{len(csv) / 1e6:.1f} MB |"
            )
        pg_version = await conn.fetchval("show server_version")
        total = await conn.fetchval("select sum(spend) from spend_totals where scope = 'customer'")
        logged = await conn.fetchval(
            "select sum((data->>'cost')::numeric) from events where type = 'UsageRecorded'"
        )
        await conn.close()
        rows = "\n".join(
            [
                line("first build (replay + compare + swap)", first),
                line("verify only (replay + compare)", verify),
                line("rebuild and swap", swap),
            ]
        )
        body = (
            f"{args.events:,} usage events generated in {generated:.1f} s (a month, 1,000 customers, 50 teams).\n\n"
            "| run | events | seconds | events/s | live vs rebuilt |\n|---|---|---|---|---|\n"
            f"{rows}\n\nCustomer spend total after the swap equals the log's: {total == logged} ({total}).\n\n"
            "Reconciliation export of the same month (rows, totals checked against the ledger, CSV):\n\n"
            "| export | rows | seconds | CSV |\n|---|---|---|---|\n" + "\n".join(exports) + "\n"
        )
        print(body)
        command = f".venv/bin/python scripts/bench/rebuild.py --events {args.events}"
        write_section("Rebuild (issue 5)", command, body, pg_version)
    finally:
        if args.database_url:
            await admin.execute(f"drop database {name} with (force)")
            await admin.close()
        else:
            embedded.stop()
            shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--database-url")
    asyncio.run(main(parser.parse_args()))
