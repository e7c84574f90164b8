"""A lone settle in PostgreSQL: this checkout's `sl_record_usage` against a base revision's, in one run.

A settle at one connection is a batch of one (`sl_record_usage`). To see what a change to it costs
without the HTTP path's noise, one embedded database is migrated with this checkout, the base
revision's `sl_record_usage` is installed beside it as `sl_record_usage_base` (its text read from
that revision's ledger/sql/settle.sql), and requests are admitted (`sl_admit`) and settled one at a
time, alternating the two functions; only the settle's round trip is timed. The base's function
must run on this checkout's schema (true while the tables it writes keep their columns). Prints
the median and mean of each (the first tenth of each left out: plans being made); writes nothing.

    .venv/bin/python scripts/bench/settle.py --base 06b8701 [--requests 6000]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from spendledger.ledger.admission import Admission, Admitted, admit_request
from spendledger.ledger.db import EmbeddedDatabase, create_pool, run_migrations
from spendledger.ledger.directory import create_customer
from spendledger.ledger.events import CustomerCreated, UsageRecorded, encode_event
from spendledger.ledger.scopes import Scopes

PROJECT_ROOT = Path(__file__).resolve().parents[2]

KEY = "k" * 64
CUSTOMERS = 10
_FUNCTION = re.compile(r"create or replace function sl_record_usage\(.*?\nend \$\$;", re.S)


def base_function(revision: str) -> str:
    """The base revision's sl_record_usage, renamed sl_record_usage_base."""
    text = subprocess.run(
        ["git", "show", f"{revision}:ledger/sql/settle.sql"], cwd=PROJECT_ROOT, capture_output=True, text=True,
        check=True,
    ).stdout  # fmt: skip
    found = _FUNCTION.search(text)
    if found is None:
        raise SystemExit(f"{revision}: no sl_record_usage in ledger/sql/settle.sql")
    return found.group(0).replace("function sl_record_usage(", "function sl_record_usage_base(", 1)


def usage(call_id: str, customer: str, admitted: Admitted, hold: Decimal) -> str:
    now = datetime.now(UTC)
    event = UsageRecorded(
        call_id=call_id, route="chat.completions", model_group="m", deployment_id="d", provider="openai",
        upstream_model="m", key_hash=KEY, customer_id=customer, status="success", http_status=200,
        input_tokens=10, output_tokens=5, total_tokens=15, cost=Decimal("0.001"), priced=True,
        started_at=now, ended_at=now, budget_periods=admitted.budget_periods, hold=hold,
    )  # fmt: skip
    return encode_event(event).decode()


async def bench(url: str, base_sql: str, requests: int) -> dict[str, list[float]]:
    pool = await create_pool(url)
    await pool.execute(base_sql)
    async with pool.acquire() as conn, conn.transaction():
        for c in range(CUSTOMERS):
            limits = {"max_budget": Decimal(10**9), "budget_duration": "30d"}
            await create_customer(conn, CustomerCreated(user_id=f"c{c}"), limits, "bench", datetime.now(UTC))
    times: dict[str, list[float]] = {"base": [], "this": []}
    hold = Decimal("0.01")
    async with pool.acquire() as conn:
        for i in range(requests):
            customer, call_id = f"c{i % CUSTOMERS}", uuid.uuid4().hex
            now = datetime.now(UTC)
            admission = Admission(
                call_id=call_id, route="chat.completions", model="m", scopes=Scopes(KEY, customer_id=customer),
                hold=hold, expires_at=now + timedelta(hours=1), refused_at=now,
            )  # fmt: skip
            admitted = await admit_request(conn, admission)
            if not isinstance(admitted, Admitted):
                raise SystemExit(f"refused: {admitted}")
            side = "this" if i % 2 else "base"
            function = "sl_record_usage" if side == "this" else "sl_record_usage_base"
            started = time.perf_counter()
            await conn.fetchval(
                f"select {function}($1::jsonb, '{{}}'::jsonb, '{{}}'::jsonb, '[]'::jsonb)",
                usage(call_id, customer, admitted, hold),
            )
            times[side].append(time.perf_counter() - started)
    await pool.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the revision to compare with")
    parser.add_argument("--requests", type=int, default=6000)
    args = parser.parse_args()
    base_sql = base_function(args.base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = EmbeddedDatabase(Path(tempfile.mkdtemp(prefix="sl-bench-settle-")))
    try:
        run_migrations(server.url)
        times = asyncio.run(bench(server.url, base_sql, args.requests))
    finally:
        server.stop()
    print(f"lone settle, {args.requests // 2} each, one at a time, alternating (ms):")
    for side, values in times.items():
        kept = values[len(values) // 10 :]
        print(f"  {side:5} median {statistics.median(kept) * 1e3:.3f}  mean {statistics.mean(kept) * 1e3:.3f}")


if __name__ == "__main__":
    main()
