"""The asynchronous reporting projection: daily spend per customer, user, team, key and model.

It follows the log behind the writers (`sl_follow_daily_spend`: snapshot rule, checkpoint in the
same transaction as the writes), so the request path pays nothing for it. Every server process runs
a follower; the checkpoint row's lock (SKIP LOCKED) lets one of them work at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import date
from typing import Any, Final

import asyncpg
import structlog

from spendledger.ledger.connections import DATABASE_ERRORS

log = structlog.get_logger(__name__)

BATCH: Final = 5000
IDLE_S: Final = 1.0


async def follow_once(conn: asyncpg.Connection | asyncpg.Pool, batch: int = BATCH) -> int:
    """Apply one batch; the number of events read (0: caught up, -1: another process follows)."""
    return int(await conn.fetchval("select sl_follow_daily_spend($1)", batch))


async def catch_up(conn: asyncpg.Connection | asyncpg.Pool, batch: int = BATCH) -> int:
    """Follow until caught up (or another process holds the checkpoint); events read."""
    total = 0
    while (n := await follow_once(conn, batch)) > 0:
        total += n
    return total


async def follow_forever(pool: asyncpg.Pool) -> None:
    while True:
        try:
            if await follow_once(pool) > 0:
                continue
        except DATABASE_ERRORS as exc:
            log.warning("daily_spend_follower_failed", error_type=type(exc).__name__)
        await asyncio.sleep(IDLE_S)


class DailySpendFollower:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(follow_forever(self._pool))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def daily_spend(
    conn: asyncpg.Connection | asyncpg.Pool,
    scope: str,
    start: date | None,
    end: date | None,
    scope_id: str | None = None,
) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "select day, scope_id, requests, input_tokens, output_tokens, trim_scale(spend) as spend "
        "from daily_spend where scope = $1 and ($2::date is null or day >= $2) "
        "and ($3::date is null or day <= $3) and ($4::text is null or scope_id = $4) order by day, scope_id",
        scope,
        start,
        end,
        scope_id,
    )
    return [
        {
            "day": r["day"].isoformat(),
            scope: r["scope_id"],
            "requests": r["requests"],
            "input_tokens": r["input_tokens"],
            "output_tokens": r["output_tokens"],
            "spend": r["spend"],
        }
        for r in rows
    ]


async def checkpoint(conn: asyncpg.Connection | asyncpg.Pool) -> dict[str, Any]:
    row = await conn.fetchrow(
        "select last_txid::text as txid, last_position, updated_at from projection_checkpoints "
        "where name = 'daily_spend'"
    )
    assert row is not None
    return {
        "txid": row["txid"],
        "position": row["last_position"],
        "updated_at": row["updated_at"].isoformat(),
    }
