"""Recording requests: each one's UsageRecorded event, every projection of it, and its outbox rows.

`record_usages` settles a batch in one transaction and one round trip (`sl_record_usages`; a batch
of one by `sl_record_usage`, the same work with plans made for one request);
`GroupRecorder` gathers the settles of concurrent requests into such batches — group commit: while
one batch commits, the next one fills, so a hot budget row is locked once per batch and one WAL
flush serves many requests. Each caller still returns only after its own event is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from decimal import Decimal
from typing import Any, Final

import asyncpg
import msgspec

from spendledger.ledger.connections import Queryable
from spendledger.ledger.events import UsageRecorded, encode_event
from spendledger.ledger.outbox import OutboxRow
from spendledger.ledger.publisher_wakeups import PublisherWakeups
from spendledger.ledger.scopes import BudgetSettings

_json: Final = msgspec.json.Encoder(decimal_format="number")
_SQL: Final = "select idx, key_spend from sl_record_usages($1::jsonb, $2::jsonb, $3::jsonb, $4::jsonb)"
_ONE_SQL: Final = "select sl_record_usage($1::jsonb, $2::jsonb, $3::jsonb, $4::jsonb)"


class RecordingContext(BudgetSettings, frozen=True, kw_only=True):
    """What the database needs besides the event: the budget settings (the default tier, for a
    customer seen first at recording; the global budget), whether webhooks are on (the event is
    marked for the webhook follower, ledger/webhook_rows.py, which writes its rows), and whether to
    wake the outbox publishers (`notify`)."""

    webhooks: bool = False
    notify: bool = True


NO_CONTEXT: Final = RecordingContext()


class Recording(msgspec.Struct, frozen=True, kw_only=True):
    """One request to record: its event, its outbox rows, its metadata."""

    event: UsageRecorded
    outbox: list[OutboxRow] = []
    metadata: dict[str, Any] = {}


def _array(items: Sequence[bytes]) -> str:
    return (b"[" + b",".join(items) + b"]").decode()


async def record_usages(
    conn: Queryable, recordings: Sequence[Recording], context: RecordingContext
) -> list[Decimal | None]:
    """Append, project and enqueue every recording in one transaction; each key's new spend, in order."""
    if len(recordings) == 1:
        (one,) = recordings
        spend: Decimal | None = await conn.fetchval(
            _ONE_SQL,
            encode_event(one.event).decode(),
            _json.encode(one.metadata).decode(),
            _json.encode(context).decode(),
            _json.encode(one.outbox).decode(),
        )
        return [spend]
    rows = await conn.fetch(
        _SQL,
        _array([encode_event(r.event) for r in recordings]),
        _array([_json.encode(r.metadata) for r in recordings]),
        _json.encode(context).decode(),
        _array([_json.encode(r.outbox) for r in recordings]),
    )
    spends: list[Decimal | None] = [None] * len(recordings)
    for row in rows:
        spends[row["idx"]] = row["key_spend"]
    return spends


async def record_usage(
    conn: asyncpg.Connection | asyncpg.Pool,
    event: UsageRecorded,
    context: RecordingContext = NO_CONTEXT,
    outbox: list[OutboxRow] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Decimal | None:
    """Record one request (creating its customer on first sight); returns the key's new lifetime
    spend. Committed when this returns: the caller may then release the response."""
    recording = Recording(event=event, outbox=outbox or [], metadata=metadata or {})
    return (await record_usages(conn, [recording], context))[0]


class GroupRecorder:
    """Batches concurrent recordings into group commits.

    One flush runs at a time; recordings that arrive meanwhile form the next batch (up to
    `max_batch`). If a batch fails as a whole, each of its recordings is retried alone, so one bad
    recording (say, a duplicate call id) fails only its own caller. With `wakeups`, a batch wakes
    the outbox publishers only when they are not already awake (see `PublisherWakeups`).
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        context: RecordingContext,
        max_batch: int = 128,
        wakeups: PublisherWakeups | None = None,
    ) -> None:
        self._pool = pool
        self._context = context
        self._silent = msgspec.structs.replace(context, notify=False)
        self._max_batch = max_batch
        self._wakeups = wakeups
        self._queue: list[tuple[Recording, asyncio.Future[Decimal | None]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Flush what is queued, then stop."""
        while self._queue:
            await self._flush()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._wakeups is not None:
            await self._wakeups.stop()

    async def record(self, recording: Recording) -> Decimal | None:
        if self._task is None or self._task.done():  # not started (or stopped): record alone
            return (await record_usages(self._pool, [recording], self._context))[0]
        future: asyncio.Future[Decimal | None] = asyncio.get_running_loop().create_future()
        self._queue.append((recording, future))
        self._wake.set()
        return await asyncio.shield(future)  # a cancelled caller must not cancel the batch

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                await self._flush()

    async def _flush(self) -> None:
        batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
        notify = self._wakeups is None or self._wakeups.should_notify()
        try:
            spends = await record_usages(
                self._pool, [r for r, _ in batch], self._context if notify else self._silent
            )
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0][1], exc=exc)
                return
            for recording, future in batch:
                try:
                    result = (await record_usages(self._pool, [recording], self._context))[0]
                except Exception as exc:
                    _settle(future, exc=exc)
                else:
                    _settle(future, result)
            return
        if not notify and self._wakeups is not None:
            self._wakeups.committed_silently()
        for (_, future), spend in zip(batch, spends, strict=True):
            _settle(future, spend)


def _settle(
    future: asyncio.Future[Decimal | None], result: Decimal | None = None, exc: BaseException | None = None
) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
