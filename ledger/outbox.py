"""The transactional outbox: rows enqueued with the usage that causes them, and the publisher that
delivers them at least once with stable ids — exactly once at receivers that dedupe (Lago does, by
transaction_id; webhook receivers by `webhook-id`).

No transaction is open while a row is on the network. A publisher claims due rows of one sink in
one short statement (`sl_outbox_claim`, migration 0014: `FOR UPDATE SKIP LOCKED` in due order, and
the rows leased as one row of `outbox_claims`, which takes them out of the due set until the lease
ends), sends them with no transaction open, and marks each row's outcome and drops the claim in
another short statement (`sl_outbox_mark`). A publisher that dies between claim and mark (even
SIGKILLed) leaves its claim behind: when the lease ends its rows are due again and are re-sent with
the same ids, for the receiver to drop. An open transaction across a send would hold back the
snapshot horizon below which every follower of the log reads (`/audit/events`, the webhook
follower) for as long as the receiver takes to answer.

Each sink is delivered on its own loop (its own task and wake-up), so a slow receiver delays only
its own rows. A row is judged on its own: an exception while building or sending one row fails
that row alone; it backs off, and is dead-lettered after `MAX_OWN_FAILURES` such failures, while a
receiver that is down or answers non-2xx is retried with backoff until it takes the row.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol

import asyncpg
import httpx
import msgspec
import structlog

from spendledger.ledger.publisher_health import HealthReporter, SinkHealth, SinkState
from spendledger.ledger.waits import wait_until_set

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
# How long a claim keeps its rows out of the due set. A publisher gives one batch's send half of
# it (the sinks' own HTTP timeouts are 10 s a request), so a claimed row comes back before its
# mark only when its publisher died or stalled: then it is re-sent with the same id.
CLAIM_LEASE_S: Final = 60.0
# A row that fails on its own — an exception while building or sending it, such as a header value
# the HTTP client refuses — backs off (1, 2, 4, 8 s, with jitter) and becomes a dead letter at its
# fifth such failure: retrying it forever would only spend attempts. A receiver that is down, times
# out or answers non-2xx is not the row's fault: retried until it takes the row.
MAX_OWN_FAILURES: Final = 5

Feeder = Callable[[], Awaitable[bool]]  # writes rows into the outbox; True: more may be waiting


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
    own_failures: int = 0  # failures of the row's own so far (not the receiver's)
    claim: int | None = None  # the claim (outbox_claims) that leased it: the mark's fence
    lease_until: datetime | None = None  # when that lease ends


@dataclass
class Delivery:
    """What a sink made of a batch: every claimed id ends in exactly one of `delivered`, `dead`,
    `retry` — or, from a sink, `failed`: the row failed on its own (the value is the exception's
    type name); the publisher then files it under `retry`, or under `dead` at its
    `MAX_OWN_FAILURES`-th, and keeps it in `failed` too, which says why."""

    delivered: list[int] = field(default_factory=list)
    dead: dict[int, str] = field(default_factory=dict)
    retry: dict[int, str] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    unauthorized: bool = False
    retry_after_s: float | None = None

    def merge(self, part: Delivery) -> None:
        """Take in the outcome of part of the batch (delivered separately)."""
        self.delivered += part.delivered
        self.dead |= part.dead
        self.retry |= part.retry
        self.failed |= part.failed
        self.unauthorized |= part.unauthorized
        self.retry_after_s = part.retry_after_s or self.retry_after_s


class Sink(Protocol):
    name: str
    batch_size: int

    async def deliver(self, rows: Sequence[Claimed]) -> Delivery: ...


def backoff(attempts: int, retry_after_s: float | None = None) -> timedelta:
    """Exponential with full jitter between half and one and a half of the step, capped."""
    step = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** max(0, attempts - 1))
    delay = max(step * random.uniform(0.5, 1.5), retry_after_s or 0.0)
    return timedelta(seconds=delay)


def receiver_error(exc: BaseException) -> bool:
    """Whether an exception out of a send is the receiver's (or the network's) doing rather than the
    row's: the HTTP client's errors, and OS-level ones it did not translate."""
    return isinstance(exc, httpx.HTTPError | OSError)


# One short transaction each, with no flush wait (migration 0014 says why); neither is open during a send.
_RELEASE: Final = "delete from outbox_claims where id = $1"
_CLAIM: Final = (
    "select claim, id, dedupe_key, payload, attempts, own_failures, created_at, lease_until "
    "from sl_outbox_claim($1, $2, make_interval(secs => $3))"
)
_MARK: Final = "select sl_outbox_mark($1, $2, $3, $4, $5, $6, $7)"


class Publisher:
    def __init__(
        self,
        pool: asyncpg.Pool,
        database_url: str,
        sinks: Sequence[Sink],
        idle_wait_s: float = 1.0,
        linger_s: float = DEFAULT_LINGER_S,
        feeders: Mapping[str, Sequence[Feeder]] | None = None,
        lease_s: float = CLAIM_LEASE_S,
        reporter: str = "spendledger",
    ):
        self._pool = pool
        # By sink name: run on that sink's loop before it claims (the webhook follower writes the
        # rows the webhook sink sends), so a slow feeder delays only that sink.
        self._feeders = {name: list(found) for name, found in (feeders or {}).items()}
        self._database_url = database_url
        self._sinks = list(sinks)
        self._idle_wait_s = idle_wait_s
        self._linger_s = linger_s
        self._lease_s = lease_s
        self._wakes = {sink.name: asyncio.Event() for sink in sinks}
        self.health: dict[str, SinkHealth] = {sink.name: SinkHealth() for sink in sinks}
        # Written to the database (ledger/publisher_health.py): readiness is asked of any process.
        self.health_reporter = HealthReporter(pool, self.health, reporter)
        self.on_delivered: list[Any] = []  # callbacks(sink_name, rows, delivery) for metrics

    async def run(self) -> None:
        """Publish until cancelled: one loop per sink, all woken by one LISTEN."""
        listener = await self._listen()
        try:
            async with asyncio.TaskGroup() as loops:
                for sink in self._sinks:
                    loops.create_task(self._run_sink(sink), name=f"outbox-{sink.name}")
                loops.create_task(self.health_reporter.run(), name="outbox-health")
        finally:
            if listener is not None and not listener.is_closed():
                await listener.close()

    async def _run_sink(self, sink: Sink) -> None:
        """One sink's loop: follow (its feeders), claim, send, mark; then wait for a wakeup."""
        wake = self._wakes[sink.name]
        while True:
            wake.clear()  # before the sweep: a NOTIFY during it must wake the next wait
            # Only a full batch says more is waiting. After a partial one the loop waits for the
            # next NOTIFY and lingers: going again at once would send a trickle row by row, one
            # claim, mark and follow transaction each, on the cores the requests need.
            more = await self._feed(sink.name)
            try:
                more |= await self.publish_once(sink) >= sink.batch_size
            except (asyncpg.PostgresConnectionError, OSError):
                pass  # the database is away: the rows wait, we poll again
            except Exception as exc:  # a bug must not stop delivery for good
                self._set_state(sink, "failing", f"publisher error: {type(exc).__name__}")
                log.exception("outbox_publisher_error", sink=sink.name)
                await asyncio.sleep(self._idle_wait_s)
            if not more:
                await wait_until_set(wake, self._idle_wait_s)
                if wake.is_set() and self._linger_s > 0:
                    await asyncio.sleep(self._linger_s)  # woken by a NOTIFY: let its neighbours in

    async def _feed(self, sink: str) -> bool:
        """Run this sink's feeders before it claims; whether any may have more to do."""
        more = False
        for feeder in self._feeders.get(sink, ()):
            try:
                more |= await feeder()
            except (asyncpg.PostgresConnectionError, OSError):
                pass  # the database is away: the log waits, we poll again
            except Exception:  # a bug must not stop delivery of what is already queued
                log.exception("outbox_feeder_error", sink=sink)
        return more

    def _wake_all(self, *_: object) -> None:
        for wake in self._wakes.values():
            wake.set()

    async def _listen(self) -> asyncpg.Connection | None:
        try:
            listener = await asyncpg.connect(self._database_url)
            await listener.add_listener(CHANNEL, self._wake_all)
        except (OSError, asyncpg.PostgresError):
            log.warning("outbox_listen_failed: polling only")
            return None
        return listener

    async def publish_once(self, sink: Sink) -> int:
        """Claim one batch of due rows, deliver it, and mark each row; returns the batch size.
        Claim and mark are a short transaction each: none is open while the rows are sent."""
        # Shielded: a stop (SIGTERM cancels us) can land while the claim's transaction commits, and
        # then its rows must still be given back, not left leased until the lease ends.
        claiming = asyncio.ensure_future(self.claim(sink))
        try:
            rows = await asyncio.shield(claiming)
        except asyncio.CancelledError:
            await self._release_when_claimed(claiming)
            raise
        if not rows:
            return 0
        try:
            delivery = await self._deliver(sink, rows)
            self._settle_failures(sink, rows, delivery)
            async with self._pool.acquire() as conn:
                await self._mark(conn, sink, rows, delivery)
        except asyncio.CancelledError:
            # Stopping (SIGTERM): give the rows back now instead of leaving them leased until the
            # lease ends; a receiver that already has some drops the resend (Lago's transaction_id,
            # the webhook-id). A mark that committed already deleted the claim: then this is a no-op.
            await self._pool.execute(_RELEASE, rows[0].claim)
            raise
        for callback in self.on_delivered:
            callback(sink.name, rows, delivery)
        return len(rows)

    async def _release_when_claimed(self, claiming: asyncio.Future[list[Claimed]]) -> None:
        """Stopping mid-claim: let the claim finish, and give back what it took."""
        with contextlib.suppress(Exception):
            rows = await claiming
            if rows:
                await self._pool.execute(_RELEASE, rows[0].claim)

    async def claim(self, sink: Sink) -> list[Claimed]:
        """Lease up to a batch of the sink's due rows (committed at once), in due order."""
        records = await self._pool.fetch(_CLAIM, sink.name, sink.batch_size, self._lease_s)
        rows = [
            Claimed(
                id=r["id"],
                dedupe_key=r["dedupe_key"],
                payload=r["payload"].encode(),
                attempts=r["attempts"],
                created_at=r["created_at"],
                own_failures=r["own_failures"],
                claim=r["claim"],
                lease_until=r["lease_until"],
            )
            for r in records
        ]
        rows.sort(key=lambda row: row.id)  # a join's output has no order of its own
        return rows

    async def _deliver(self, sink: Sink, rows: Sequence[Claimed]) -> Delivery:
        """The sink's outcome for each row, within half the lease (past it, another publisher may
        take the rows: those not answered by then are retried)."""
        try:
            async with asyncio.timeout(self._lease_s / 2):
                delivery = await self._deliver_isolating(sink, rows)
        except TimeoutError:
            error = f"{sink.name} send took longer than {self._lease_s / 2:g} s"
            return Delivery(retry={row.id: error for row in rows})
        decided = {*delivery.delivered, *delivery.dead, *delivery.retry, *delivery.failed}
        for row in rows:
            if row.id not in decided:  # a sink that forgot a row: try it again later
                delivery.retry[row.id] = f"{sink.name} gave no outcome"
        return delivery

    async def _deliver_isolating(self, sink: Sink, rows: Sequence[Claimed]) -> Delivery:
        """`sink.deliver`, and when it raises, each row alone: the exception fails only the row that
        causes it, never its batch (which would leave the row at the head of the claim order)."""
        try:
            return await sink.deliver(rows)
        except Exception as exc:
            if len(rows) > 1:
                delivery = Delivery()
                for row in rows:
                    delivery.merge(await self._deliver_isolating(sink, [row]))
                return delivery
            if receiver_error(exc):
                return Delivery(retry={rows[0].id: f"{sink.name} unreachable: {type(exc).__name__}"})
            return Delivery(failed={rows[0].id: type(exc).__name__})

    def _settle_failures(self, sink: Sink, rows: Sequence[Claimed], delivery: Delivery) -> None:
        """File each row that failed on its own under `retry`, or `dead` once out of attempts."""
        own = {row.id: row.own_failures + 1 for row in rows}
        for row_id, error_type in delivery.failed.items():
            count = own[row_id]
            log.warning(
                "outbox_row_failed", sink=sink.name, outbox_id=row_id, error_type=error_type, failures=count
            )
            error = f"{sink.name} row failed on its own: {error_type} ({count} of {MAX_OWN_FAILURES})"
            if count >= MAX_OWN_FAILURES:
                delivery.dead[row_id] = error
            else:
                delivery.retry[row_id] = error

    def _waits(self, rows: Sequence[Claimed], delivery: Delivery) -> dict[int, float]:
        """How long each row to retry waits before it is due again: a row that failed on its own
        backs off by its own failures (so it reaches its dead letter in about 15 s, whatever its
        history), any other by its attempts."""
        by_id = {row.id: row for row in rows}
        waits = {}
        for row_id in delivery.retry:
            row = by_id[row_id]
            if row_id in delivery.failed:
                waits[row_id] = backoff(row.own_failures + 1).total_seconds()
            elif delivery.unauthorized:
                waits[row_id] = UNAUTHORIZED_RETRY_S
            else:
                waits[row_id] = backoff(row.attempts + 1, delivery.retry_after_s).total_seconds()
        return waits

    async def _mark(
        self,
        conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy[Any],
        sink: Sink,
        rows: Sequence[Claimed],
        delivery: Delivery,
    ) -> None:
        waits = self._waits(rows, delivery)
        errors = delivery.dead | delivery.retry  # the rows not delivered, each with why
        ids = list(errors)
        outcome = ["dead" if i in delivery.dead else "retry" for i in ids]
        await conn.fetchval(
            _MARK,
            rows[0].claim if rows else None,
            delivery.delivered,
            ids,
            outcome,
            [errors[i] for i in ids],
            [waits.get(i, 0.0) for i in ids],
            [i in delivery.failed for i in ids],
        )
        self._note_health(sink, delivery)

    def _note_health(self, sink: Sink, delivery: Delivery) -> None:
        """The sink's state: a row's own failure says nothing about the receiver, so only the
        receiver's answers (or silence) move it."""
        health = self.health[sink.name]
        if delivery.delivered:
            if health.last_delivery_at is None:
                self.health_reporter.changed()  # the first delivery: said at once, later ones on the beat
            health.delivered += len(delivery.delivered)
            health.last_delivery_at = datetime.now(UTC)
        for row_id, error in delivery.dead.items():
            health.dead += 1
            log.error("outbox_dead_letter", sink=sink.name, outbox_id=row_id, error=error)
        receiver_retries = [
            error for row_id, error in delivery.retry.items() if row_id not in delivery.failed
        ]
        if delivery.unauthorized:
            if health.state != "unauthorized":
                log.error(
                    "outbox_sink_unauthorized",
                    sink=sink.name,
                    detail="the sink refuses our API key; deliveries wait until it is fixed",
                )
            self._set_state(sink, "unauthorized", next(iter(receiver_retries), None))
        elif receiver_retries:
            self._set_state(sink, "failing", receiver_retries[0])
            log.warning(
                "outbox_delivery_failed", sink=sink.name, rows=len(receiver_retries), error=health.last_error
            )
        elif delivery.delivered:
            self._set_state(sink, "ok", None)

    def _set_state(self, sink: Sink, state: SinkState, last_error: str | None) -> None:
        health = self.health[sink.name]
        if (health.state, health.last_error) != (state, last_error):
            health.state, health.last_error = state, last_error
            self.health_reporter.changed()


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
    """Put dead letters back in the queue (all, or those named); returns how many. Each starts again
    with its full `MAX_OWN_FAILURES`."""
    result = await conn.execute(
        "update outbox set state = 'pending', next_attempt_at = now(), last_error = null, own_failures = 0 "
        "where state = 'dead' and ($1::bigint[] is null or id = any($1::bigint[])) "
        "and ($2::text is null or sink = $2)",
        list(ids) if ids is not None else None,
        sink,
    )
    await conn.execute("select pg_notify($1, '')", CHANNEL)
    return int(result.split()[-1])
