"""Giving back holds that no request will settle.

A hold is given back by its request's settle. Two kinds are left behind:
- holds of requests whose process went away without settling: they expire (`expires_at`: the
  upstream timeout plus a grace, at least ten minutes for a stream);
- holds and leases of a serving process that was killed or crashed: their owner is known (each
  serving process names its connections, and `holds.owner` takes that name, migration 0013), and
  every serving process beats in `process_heartbeats`. A process that has not beaten for
  `stale_after` is gone, and its holds go back at once, long before they would expire.

Every serving process sweeps (SKIP LOCKED keeps them out of each other's way). A process releases
others' holds only once it has itself beaten without a gap for `stale_after`: after the database
was unreachable (for everyone), the other live processes get that long to beat again first.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from datetime import timedelta
from typing import Final

import asyncpg
import structlog

from spendledger.ledger.admission import expire_holds
from spendledger.ledger.connections import DATABASE_ERRORS

log = structlog.get_logger(__name__)

STALE_AFTER: Final = timedelta(seconds=20)
SWEEP_INTERVAL_S: Final = 2.0


def process_name() -> str:
    """A serving process's name for its connections (PostgreSQL keeps 63 bytes of it)."""
    return f"spendledger:{uuid.uuid4().hex}"


class HoldSweeper:
    def __init__(
        self,
        pool: asyncpg.Pool,
        owner: str,
        stale_after: timedelta = STALE_AFTER,
        interval_s: float = SWEEP_INTERVAL_S,
    ) -> None:
        self._pool = pool
        self.owner = owner
        self._stale_after = stale_after
        self._interval_s = interval_s
        self._beating_since: float | None = None  # monotonic start of the current run of beats
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Beat once (before this process takes any hold), then sweep in the background."""
        await self.sweep()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(*DATABASE_ERRORS):
            await self._pool.execute("delete from process_heartbeats where owner = $1", self.owner)

    async def sweep(self) -> int:
        """Beat, and give back expired holds and (when trusted to) those of processes gone."""
        now = time.monotonic()
        release = self._beating_since is not None and now - self._beating_since >= self._stale_after.total_seconds()
        try:
            orphaned = int(
                await self._pool.fetchval(
                    "select sl_release_orphaned_holds($1, $2, $3)", self.owner, self._stale_after, release
                )
            )
            expired = await expire_holds(self._pool)
        except DATABASE_ERRORS as exc:
            self._beating_since = None  # a gap: others may have missed their beats too
            log.warning("hold_sweep_failed", error_type=type(exc).__name__)
            return 0
        if self._beating_since is None:
            self._beating_since = now
        if orphaned:
            log.warning("orphaned_holds_released", count=orphaned)
        if expired:
            log.warning("expired_holds_released", count=expired)
        return orphaned + expired

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.sweep()
