"""When settles wake the outbox publishers: at most once per linger, never leaving rows unannounced.

A `NOTIFY` costs the settle that sends it a global lock at its commit and wakes every listening
publisher (its backend and its process) — about 0.1 ms of a lone request's latency here. A woken
publisher lingers `DEFAULT_LINGER_S` before it claims every row then due, so while one wakeup is
pending another is wasted. `PublisherWakeups` lets a settle batch notify when none did for that
long; a batch committed without one gets a trailing notification after the window, sent on its
own. Publishers also poll every second, so a lost notification only delays a delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import asyncpg

from spendledger.ledger.connections import DATABASE_ERRORS
from spendledger.ledger.outbox import CHANNEL, DEFAULT_LINGER_S


class PublisherWakeups:
    def __init__(self, pool: asyncpg.Pool, every_s: float = DEFAULT_LINGER_S) -> None:
        self._pool = pool
        self._every_s = every_s
        self._last = float("-inf")
        self._trailing: asyncio.Task[None] | None = None

    def should_notify(self) -> bool:
        """Whether the batch about to be settled should notify (if so, that counts as sent now)."""
        now = time.monotonic()
        if now - self._last < self._every_s:
            return False
        self._last = now
        return True

    def committed_silently(self) -> None:
        """A batch committed without notifying: make sure a notification follows within the window."""
        if self._trailing is None:
            delay = max(0.0, self._last + self._every_s - time.monotonic())
            self._trailing = asyncio.get_running_loop().create_task(self._notify_after(delay))

    async def stop(self) -> None:
        """Send the trailing notification now, if one is due."""
        if self._trailing is not None:
            self._trailing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._trailing
            await self._notify()

    async def _notify_after(self, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
        finally:
            if self._trailing is asyncio.current_task():
                self._trailing = None  # a batch committed from here on schedules the next one
        self._last = time.monotonic()
        await self._notify()

    async def _notify(self) -> None:
        with contextlib.suppress(*DATABASE_ERRORS):
            await self._pool.execute("select pg_notify($1, '')", CHANNEL)
