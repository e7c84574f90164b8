"""Rebuild every projection from the event log, prove it equal to the live one, and swap it in.

1. In one REPEATABLE READ transaction (one snapshot S): replay every event visible in S into
   fresh tables in the schema `sl_rebuild` — management events one by one through the live
   projectors, usage events chunk by chunk through the settle's projection (`sl_project_usage`),
   both with `search_path` pointing at the new tables — and compare them row by row with the live tables as S sees them. Projections are
   written in the same transactions as their events, so the live tables in S are exactly what the
   events in S imply: any difference is a real one.
2. Swap (unless verify-only): lock the live projection tables and the log (writers wait a moment),
   replay the events committed since S, carry over the live transient state (held amounts, the
   zero rows admissions create), and move the new tables into `public` — one transaction.

Holds, rate counters and in-flight counts are transient state, not projections: they are not
rebuilt. The asynchronous daily spend is reset with its checkpoint and follows the log again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import asyncpg
import msgspec

from spendledger.ledger.directory import apply_directory_event
from spendledger.ledger.events import decode_event
from spendledger.ledger.keys import apply_key_event

SCHEMA: Final = "sl_rebuild"
OLD_SCHEMA: Final = "sl_replaced"
DIRECTORY_TABLES: Final = ("keys", "customers", "budgets", "teams", "users")
USAGE_TABLES: Final = ("spend_totals", "budget_usage")  # spend_logs is a view of the log
TABLES: Final = DIRECTORY_TABLES + USAGE_TABLES
# What is compared: budget_usage rows with no spend are placeholders admissions create, and `held`
# is the live amount in flight, so both are left out; everything else, every column.
COMPARED: Final = {"budget_usage": ("scope, scope_id, period_start, spent", "spent <> 0")}
CHUNK: Final = 20_000  # usage events handed to sl_project_usage at once
SWAP_ATTEMPTS: Final = 10
EXAMPLES: Final = 5

Progress = Callable[[int, int], None]  # (log positions replayed, last position)


@dataclass
class Report:
    events: int = 0
    seconds: float = 0.0
    differences: dict[str, dict[str, Any]] = field(default_factory=dict)
    swapped: bool = False

    @property
    def equal(self) -> bool:
        return not self.differences

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


async def _prepare(conn: asyncpg.Connection) -> None:
    await conn.execute(f"drop schema if exists {SCHEMA} cascade; create schema {SCHEMA}")
    for table in TABLES:
        await conn.execute(f"create table {SCHEMA}.{table} (like public.{table} including all)")


# Which events a pass replays: all it can see ($3 null), or those a snapshot could not see.
_UNSEEN: Final = "($3::text is null or not pg_visible_in_snapshot(e.txid, $3::text::pg_snapshot))"

_DIRECTORY_EVENTS: Final = f"""
select e.data::text as data, e.metadata->>'at' as at, e.recorded_at from events e
where e.type not in ('UsageRecorded', 'HoldExceeded', 'RequestRefused', 'LagoEventRejected') and e.position > $1 and e.position <= $2 and {_UNSEEN}
order by e.position  -- insertion order: within a stream, version order
"""


@contextlib.asynccontextmanager
async def _new_tables_first(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """The live projectors and sl_project_usage write to unqualified tables: while this lasts, those
    are the new tables in SCHEMA (until the transaction ends, at the latest)."""
    await conn.execute(f"set local search_path = {SCHEMA}, public")
    try:
        yield
    finally:
        await conn.execute("set local search_path = public")


async def _replay_directory(conn: asyncpg.Connection, last_position: int, unseen_by: str | None) -> int:
    """Management events in log order, through the live projectors, into the new tables."""
    rows = await conn.fetch(_DIRECTORY_EVENTS, 0, last_position, unseen_by)
    async with _new_tables_first(conn):
        for row in rows:
            event = decode_event(row["data"])
            at = datetime.fromisoformat(row["at"]) if row["at"] else row["recorded_at"]
            if not await apply_directory_event(conn, event, at):
                await apply_key_event(conn, event, at)
    return len(rows)


_WHERE: Final = f"e.type = 'UsageRecorded' and e.position > $1 and e.position <= $2 and {_UNSEEN}"
# The usage projection is the settle's (sl_project_usage, ledger/sql/settle.sql), run over a chunk
# of events at a time with the new tables first on the search_path; nothing is released (holds,
# rate windows and in-flight counts are live state, not rebuilt).
_USAGE: Final = f"""select sl_project_usage(coalesce(array_agg(e.data order by e.position), '{{}}'), '{{}}')
from events e where {_WHERE}"""


async def _replay_usage(
    conn: asyncpg.Connection, last_position: int, unseen_by: str | None, progress: Progress | None = None
) -> None:
    """Usage events chunk by chunk of positions through sl_project_usage (the progress bar moves per
    chunk)."""
    async with _new_tables_first(conn):
        for lo in range(0, last_position, CHUNK):
            hi = min(lo + CHUNK, last_position)
            await conn.execute(_USAGE, lo, hi, unseen_by)
            if progress:
                progress(hi, last_position)


async def _compare(conn: asyncpg.Connection) -> dict[str, dict[str, Any]]:
    differences: dict[str, dict[str, Any]] = {}
    for table in TABLES:
        columns, condition = COMPARED.get(table, ("*", "true"))
        live = f"select {columns} from public.{table} where {condition}"
        rebuilt = f"select {columns} from {SCHEMA}.{table} where {condition}"
        missing = await conn.fetch(f"({live}) except all ({rebuilt}) limit {EXAMPLES}")
        extra = await conn.fetch(f"({rebuilt}) except all ({live}) limit {EXAMPLES}")
        if missing or extra:
            count = await conn.fetchval(
                f"select (select count(*) from (({live}) except all ({rebuilt})) a) + "
                f"(select count(*) from (({rebuilt}) except all ({live})) b)"
            )
            differences[table] = {
                "rows": count,
                "only_live": [_plain(r) for r in missing],
                "only_rebuilt": [_plain(r) for r in extra],
            }
    return differences


def _plain(row: asyncpg.Record) -> dict[str, Any]:
    return {
        k: (str(v) if not isinstance(v, str | int | bool | type(None)) else v) for k, v in dict(row).items()
    }


async def _swap(conn: asyncpg.Connection, snapshot: str) -> int:
    """Catch up on events committed since `snapshot`, carry over transient state, move tables in."""
    # Writers wait behind our locks for at most lock_timeout; if a writer and we wait on each other,
    # we want to be the one the deadlock detector aborts (we retry; a writer would fail a request):
    # a short deadlock_timeout makes us the first to look. Setting it needs superuser rights.
    await conn.execute("set local lock_timeout = '5s'")
    with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
        async with conn.transaction():
            await conn.execute("set local deadlock_timeout = '20ms'")
    await conn.execute(
        "lock table " + ", ".join(f"public.{t}" for t in TABLES) + ", events, projection_checkpoints "
        "in access exclusive mode"
    )
    last_position = int(await conn.fetchval("select coalesce(max(position), 0) from events"))
    caught_up = int(
        await conn.fetchval(
            "select count(*) from events e where not pg_visible_in_snapshot(e.txid, $1::text::pg_snapshot)",
            snapshot,
        )
    )
    await _replay_directory(conn, last_position, snapshot)
    await _replay_usage(conn, last_position, snapshot)
    # Held amounts and the zero rows admissions created are live state: keep them as they are.
    await conn.execute(
        f"""insert into {SCHEMA}.budget_usage as b (scope, scope_id, period_start, spent, held)
        select scope, scope_id, period_start, 0, held from public.budget_usage
        on conflict (scope, scope_id, period_start) do update set held = excluded.held"""
    )
    await conn.execute(f"drop schema if exists {OLD_SCHEMA} cascade; create schema {OLD_SCHEMA}")
    # Triggers go with the old tables (`like … including all` copies none): the NOTIFY of changes
    # to scopes (0011: leases retire, cached keys drop their users' roles) and the directory's
    # history (0012). Their definitions name `public.<table>`: re-created on the new tables.
    triggers = await conn.fetch(
        "select pg_get_triggerdef(oid) as definition from pg_trigger "
        "where tgrelid = any(array(select to_regclass(t) from unnest($1::text[]) t)) and not tgisinternal",
        [f"public.{table}" for table in TABLES],
    )
    for table in TABLES:
        await conn.execute(f"alter table public.{table} set schema {OLD_SCHEMA}")
        await conn.execute(f"alter table {SCHEMA}.{table} set schema public")
    await conn.execute(f"drop schema {OLD_SCHEMA} cascade; drop schema {SCHEMA} cascade")
    for trigger in triggers:
        await conn.execute(trigger["definition"])
    # The asynchronous projection starts over and follows the whole log again.
    await conn.execute("truncate daily_spend")
    await conn.execute(
        "update projection_checkpoints set last_txid = '0', last_position = 0, updated_at = now() "
        "where name = 'daily_spend'"
    )
    await conn.execute("select pg_notify('sl_key_changed', '')")  # every process drops its key cache
    return caught_up


async def rebuild(database_url: str, verify_only: bool = False, progress: Progress | None = None) -> Report:
    report = Report()
    started = time.perf_counter()
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction(isolation="repeatable_read"):
            snapshot = await conn.fetchval("select pg_current_snapshot()::text")
            report.events = int(await conn.fetchval("select count(*) from events"))
            last_position = int(await conn.fetchval("select coalesce(max(position), 0) from events"))
            await conn.execute("set local work_mem = '256MB'")  # hash aggregates and set operations in memory
            await _prepare(conn)
            await _replay_directory(conn, last_position, None)
            await _replay_usage(conn, last_position, None, progress)
            report.differences = await _compare(conn)
            if verify_only:
                await conn.execute(f"drop schema {SCHEMA} cascade")
        if not verify_only:
            for attempt in range(1, SWAP_ATTEMPTS + 1):
                try:
                    async with conn.transaction():
                        await _swap(conn, snapshot)
                    break
                except (asyncpg.DeadlockDetectedError, asyncpg.LockNotAvailableError):
                    if attempt == SWAP_ATTEMPTS:
                        raise
                    await asyncio.sleep(0.2 * attempt)
            report.swapped = True
    finally:
        await conn.close()
    report.seconds = time.perf_counter() - started
    return report


def render(report: Report) -> str:
    lines = [f"{report.events:,} events in {report.seconds:.1f} s ({report.events_per_second:,.0f} events/s)"]
    if report.equal:
        lines.append("rebuilt projections equal the live ones, row for row")
    for table, diff in report.differences.items():
        lines.append(f"DIFFERENT {table}: {diff['rows']} rows")
        lines += [f"  only live:    {msgspec.json.encode(r).decode()}" for r in diff["only_live"]]
        lines += [f"  only rebuilt: {msgspec.json.encode(r).decode()}" for r in diff["only_rebuilt"]]
    lines.append("swapped in" if report.swapped else "not swapped (verify only)")
    return "\n".join(lines)
