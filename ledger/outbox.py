"""The transactional outbox: rows enqueued with the usage that causes them, and the publisher that
delivers them at least once with stable ids — exactly once at receivers that dedupe (Lago does, by
transaction_id; webhook receivers by `webhook-id`).

A publisher claims due rows of one sink with `FOR UPDATE SKIP LOCKED` inside a transaction that
lasts for the send: rows another publisher holds are skipped, and a publisher that dies mid-send
(even SIGKILLed between send and mark) releases its rows with its connection, so they are re-sent
and deduplicated downstream. Any number of publishers may run; LISTEN/NOTIFY wakes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol

import asyncpg
import msgspec
import structlog

log = structlog.get_logger(__name__)

CHANNEL: Final = "sl_outbox"
BACKOFF_BASE_S: Final = 1.0
BACKOFF_CAP_S: Final = 300.0
# How long a publisher woken from idle lets rows gather before it claims: a trickle of requests
# then costs one claim/mark transaction per batch rather than per row, for at most this much more
# delivery lag (none under load: a sweep that found a full batch goes again at once).
DEFAULT_LINGER_S: Final = 0.05
# While the sink refuses our credentials, probe again at this pace: nothing is lost meanwhile.
UNAUTHORIZED_RETRY_S: Final = 30.0


class OutboxRow(msgspec.Struct, frozen=True, kw_only=True):
    """One delivery to enqueue: its sink, its stable id, its frozen payload."""

    sink: str
    dedupe_key: str
    payload: dict[str, Any]
    state: str = "pending"  # or "unbillable": kept and reported, never sent


class Claimed(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    dedupe_key: str
    payload: bytes  # the frozen JSON, sent as stored
    attempts: int
    created_at: datetime


@dataclass
class Delivery:
    """What a sink made of a batch: every claimed id ends in exactly one of these."""

    delivered: list[int] = field(default_factory=list)
    dead: dict[int, str] = field(default_factory=dict)
    retry: dict[int, str] = field(default_factory=dict)
    unauthorized: bool = False
    retry_after_s: float | None = None


class Sink(Protocol):
    name: str
    batch_size: int

    async def deliver(self, rows: Sequence[Claimed]) -> Delivery: ...


def backoff(attempts: int, retry_after_s: float | None = None) -> timedelta:
    """Exponential with full jitter between half and one and a half of the step, capped."""
    step = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** max(0, attempts - 1))
    delay = max(step * random.uniform(0.5, 1.5), retry_after_s or 0.0)
    return timedelta(seconds=delay)


@dataclass
class SinkHealth:
    state: str = "ok"  # ok | failing | unauthorized
    last_error: str | None = None
    last_delivery_at: datetime | None = None
    delivered: int = 0
    dead: int = 0


_CLAIM: Final = """
select id, dedupe_key, payload::text as payload, attempts, created_at from outbox
where sink = $1 and state = 'pending' and next_attempt_at <= now()
order by next_attempt_at, id limit $2  -- the order of outbox_due: only pending rows are read
for update skip locked
"""


class Publisher:
    def __init__(
        self,
        pool: asyncpg.Pool,
        database_url: str,
        sinks: Sequence[Sink],
        idle_wait_s: float = 1.0,
        linger_s: float = DEFAULT_LINGER_S,
        feeders: Sequence[Callable[[], Awaitable[bool]]] = (),
    ):
        self._pool = pool
        self._feeders = list(feeders)  # each writes rows into the outbox; True: more may be waiting
        self._database_url = database_url
        self._sinks = list(sinks)
        self._idle_wait_s = idle_wait_s
        self._linger_s = linger_s
        self._wake = asyncio.Event()
        self.health: dict[str, SinkHealth] = {sink.name: SinkHealth() for sink in sinks}
        self.on_delivered: list[Any] = []  # callbacks(sink_name, rows) for metrics

    async def run(self) -> None:
        """Publish until cancelled."""
        listener = await self._listen()
        try:
            while True:
                self._wake.clear()  # before the sweep: a NOTIFY during it must wake the next wait
                # Only a full batch says more is waiting. After a partial one the publisher waits for
                # the next NOTIFY and lingers: going again at once would send a trickle row by row,
                # one claim, mark and follow transaction each, on the cores the requests need.
                more = await self._feed()
                for sink in self._sinks:
                    try:
                        more |= await self.publish_once(sink) >= sink.batch_size
                    except (asyncpg.PostgresConnectionError, OSError):
                        pass  # the database is away: the rows wait, we poll again
                    except Exception as exc:  # a bug must not stop delivery for good
                        self.health[sink.name].state = "failing"
                        self.health[sink.name].last_error = f"publisher error: {type(exc).__name__}"
                        log.exception("outbox_publisher_error", sink=sink.name)
                        await asyncio.sleep(self._idle_wait_s)
                if not more:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self._idle_wait_s)
                    if self._wake.is_set() and self._linger_s > 0:
                        await asyncio.sleep(self._linger_s)  # woken by a NOTIFY: let its neighbours in
        finally:
            if listener is not None and not listener.is_closed():
                await listener.close()

    async def _feed(self) -> bool:
        """Run the feeders before the sinks claim (the webhook follower writes the rows they send);
        whether any may have more to do."""
        more = False
        for feeder in self._feeders:
            try:
                more |= await feeder()
            except (asyncpg.PostgresConnectionError, OSError):
                pass  # the database is away: the log waits, we poll again
            except Exception:  # a bug must not stop delivery of what is already queued
                log.exception("outbox_feeder_error")
        return more

    async def _listen(self) -> asyncpg.Connection | None:
        try:
            listener = await asyncpg.connect(self._database_url)
            await listener.add_listener(CHANNEL, lambda *_: self._wake.set())
        except (OSError, asyncpg.PostgresError):
            log.warning("outbox_listen_failed: polling only")
            return None
        return listener

    async def publish_once(self, sink: Sink) -> int:
        """Claim one batch of due rows, deliver it, and mark each row; returns the batch size."""
        async with self._pool.acquire() as conn, conn.transaction():
            records = await conn.fetch(_CLAIM, sink.name, sink.batch_size)
            if not records:
                return 0
            # The marks need no flush to disk before we go on: one lost to a database crash leaves
            # its rows pending, so they are sent again with the same ids and the receiver drops the
            # repeat, as after a publisher killed between send and mark. Not waiting for the flush
            # keeps the publisher's fsyncs out of the way of the settles', which must wait for theirs.
            await conn.execute("set local synchronous_commit = off")
            rows = [
                Claimed(
                    id=r["id"],
                    dedupe_key=r["dedupe_key"],
                    payload=r["payload"].encode(),
                    attempts=r["attempts"],
                    created_at=r["created_at"],
                )
                for r in records
            ]
            delivery = await sink.deliver(rows)
            await self._mark(conn, sink, rows, delivery)
        for callback in self.on_delivered:
            callback(sink.name, rows, delivery)
        return len(rows)

    async def _mark(
        self,
        conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy[Any],
        sink: Sink,
        rows: Sequence[Claimed],
        delivery: Delivery,
    ) -> None:
        health = self.health[sink.name]
        now = datetime.now(UTC)
        if delivery.delivered:
            await conn.execute(
                "update outbox set state = 'delivered', delivered_at = clock_timestamp(), attempts = attempts + 1, "
                "last_error = null where id = any($1::bigint[])",
                delivery.delivered,
            )
            health.delivered += len(delivery.delivered)
            health.last_delivery_at = now
        for row_id, error in delivery.dead.items():
            await conn.execute(
                "update outbox set state = 'dead', attempts = attempts + 1, last_error = $2 where id = $1",
                row_id,
                error,
            )
            health.dead += 1
            log.error("outbox_dead_letter", sink=sink.name, outbox_id=row_id, error=error)
        attempts = {row.id: row.attempts for row in rows}
        for row_id, error in delivery.retry.items():
            wait = (
                timedelta(seconds=UNAUTHORIZED_RETRY_S)
                if delivery.unauthorized
                else backoff(attempts[row_id] + 1, delivery.retry_after_s)
            )
            await conn.execute(
                "update outbox set attempts = attempts + 1, last_error = $2, next_attempt_at = now() + $3 "
                "where id = $1",
                row_id,
                error,
                wait,
            )
        if delivery.unauthorized:
            if health.state != "unauthorized":
                log.error(
                    "outbox_sink_unauthorized",
                    sink=sink.name,
                    detail="the sink refuses our API key; deliveries wait until it is fixed",
                )
            health.state, health.last_error = "unauthorized", next(iter(delivery.retry.values()), None)
        elif delivery.retry:
            health.state, health.last_error = "failing", next(iter(delivery.retry.values()))
            log.warning(
                "outbox_delivery_failed", sink=sink.name, rows=len(delivery.retry), error=health.last_error
            )
        elif delivery.delivered:
            health.state, health.last_error = "ok", None


WAITING: Final = ("pending", "dead", "unbillable")  # the states of rows not yet delivered

# Counts by sink and state: of every row, or (from the index `outbox_waiting`) of those that wait.
_COUNTS: Final = "select sink, state, count(*) as n from outbox group by 1, 2 order by 1, 2"
_WAITING_COUNTS: Final = (
    "select sink, state, count(*) as n from outbox where state <> 'delivered' group by 1, 2 order by 1, 2"
)


async def outbox_status(
    conn: asyncpg.Connection | asyncpg.Pool, dead_limit: int = 100, delivered: bool = True
) -> dict[str, Any]:
    """Counts by sink and state, the oldest pending row's age, and the dead letters.

    Without `delivered`, only the rows that wait are counted (no `delivered` count): what a
    periodic refresh can afford, as delivered rows are kept and grow with every request."""
    counts = await conn.fetch(_COUNTS if delivered else _WAITING_COUNTS)
    oldest = await conn.fetch(
        "select sink, extract(epoch from now() - min(created_at)) as age from outbox "
        "where state = 'pending' group by 1"
    )
    dead = await conn.fetch(
        "select id, sink, dedupe_key, attempts, last_error, created_at, call_id from outbox "
        "where state = 'dead' order by id limit $1",
        dead_limit,
    )
    sinks: dict[str, dict[str, Any]] = {}
    zero = dict.fromkeys(("pending", "delivered", "dead", "unbillable") if delivered else WAITING, 0)
    for row in counts:
        sinks.setdefault(row["sink"], dict(zero))[row["state"]] = row["n"]
    for row in oldest:
        sinks.setdefault(row["sink"], {})["oldest_pending_age_s"] = float(row["age"])
    return {
        "sinks": sinks,
        "dead_letters": [
            {
                "id": r["id"],
                "sink": r["sink"],
                "dedupe_key": r["dedupe_key"],
                "attempts": r["attempts"],
                "last_error": r["last_error"],
                "created_at": r["created_at"].isoformat(),
                "call_id": r["call_id"],
            }
            for r in dead
        ],
    }


async def retry_dead_letters(
    conn: asyncpg.Connection | asyncpg.Pool, ids: Sequence[int] | None = None, sink: str | None = None
) -> int:
    """Put dead letters back in the queue (all, or those named); returns how many."""
    result = await conn.execute(
        "update outbox set state = 'pending', next_attempt_at = now(), last_error = null "
        "where state = 'dead' and ($1::bigint[] is null or id = any($1::bigint[])) "
        "and ($2::text is null or sink = $2)",
        list(ids) if ids is not None else None,
        sink,
    )
    await conn.execute("select pg_notify($1, '')", CHANNEL)
    return int(result.split()[-1])
