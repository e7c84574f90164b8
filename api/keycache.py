"""In-memory key directory for the hot path, invalidated by NOTIFY.

Every key event's transaction sends `NOTIFY sl_key_changed, <hash>` (see `ledger.keys`), so every
process drops its copy as soon as the change commits. If the LISTEN connection drops, the whole cache
is cleared and rebuilt on demand: a stale key is never trusted for longer than the reconnect.

The same connection hears `sl_scope_changed` (any change to keys, users, teams, customers or
budgets: migration 0011's triggers; the payload is the table) and passes it, key changes and a lost
connection to `on_scope_change` — the budget leases retire on it. A change to `users` also drops
every cached key that has a user: a key carries its user's role (api/roles.py), and a demoted user's
keys must not keep the old role.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Final

import asyncpg
import structlog

from spendledger.ledger.keys import KeyRecord, get_key

log = structlog.get_logger(__name__)

CHANNEL: Final = "sl_key_changed"
SCOPE_CHANNEL: Final = "sl_scope_changed"
# A backstop only: NOTIFY does the real work.
MAX_AGE_S: Final = 300.0


class KeyCache:
    def __init__(
        self, pool: asyncpg.Pool, database_url: str, on_scope_change: Callable[[], None] = lambda: None
    ) -> None:
        self._pool = pool
        self._database_url = database_url
        self._on_scope_change = on_scope_change
        self._entries: dict[str, tuple[float, KeyRecord]] = {}
        # Bumped by every invalidation: a read that began before one is not cached (it may predate
        # the change that the invalidation announced).
        self._generation = 0
        self._listener: asyncpg.Connection | None = None
        self._watchdog: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._listen()
        self._watchdog = asyncio.create_task(self._keep_listening())

    async def stop(self) -> None:
        if self._watchdog:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        if self._listener is not None and not self._listener.is_closed():
            await self._listener.close()

    async def get(self, key_hash: str) -> KeyRecord | None:
        entry = self._entries.get(key_hash)
        now = time.monotonic()
        if entry is not None and now - entry[0] < MAX_AGE_S:
            return entry[1]
        generation = self._generation
        record = await get_key(self._pool, key_hash)
        if record is not None and generation == self._generation:
            self._entries[key_hash] = (now, record)
        return record

    def invalidate(self, key_hash: str | None = None) -> None:
        self._generation += 1
        if key_hash is None:
            self._entries.clear()
        else:
            self._entries.pop(key_hash, None)

    def invalidate_users(self) -> None:
        """Drop every key that has a user (its role is its user's)."""
        self._generation += 1
        for key_hash in [h for h, (_, record) in self._entries.items() if record.user_id is not None]:
            del self._entries[key_hash]

    @property
    def listening(self) -> bool:
        """Whether changes are heard right now."""
        return self._listener is not None and not self._listener.is_closed()

    # asyncpg's listener signature: the payload is the NOTIFY's text (typed `object` by its stubs).
    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        self.invalidate(str(payload) or None)  # an empty payload (a rebuild's swap): every key
        self._on_scope_change()

    def _on_scope_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        if payload == "users":
            self.invalidate_users()
        self._on_scope_change()

    async def _listen(self) -> None:
        self._listener = await asyncpg.connect(self._database_url)
        await self._listener.add_listener(CHANNEL, self._on_notify)
        await self._listener.add_listener(SCOPE_CHANNEL, self._on_scope_notify)
        self.invalidate()  # anything cached before we listened may have missed a NOTIFY
        self._on_scope_change()

    async def _keep_listening(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self._listener is None or self._listener.is_closed():
                self.invalidate()
                self._on_scope_change()
                try:
                    await self._listen()
                except (OSError, asyncpg.PostgresError) as exc:
                    log.warning("key_cache_listen_failed", error=type(exc).__name__)
