"""The publisher's health, reported to the database so that whoever asks need not be the publisher.

`spendledger serve` delivers the outbox from a child process (`--no-publisher`: from a `spendledger
publish` elsewhere), so the serving process that answers `/health/readiness` and `/outbox/status`
cannot look at the publisher's memory. Each publisher writes its sinks' state to `publisher_health`
at once when it changes and on a heartbeat; a reader takes a report older than a few heartbeats
(or none) to mean that no publisher is running: delivery has stopped, and readiness says so.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal

import asyncpg
import msgspec
import structlog

from spendledger.ledger.connections import DATABASE_ERRORS
from spendledger.ledger.waits import wait_until_set

log = structlog.get_logger(__name__)

SinkState = Literal["ok", "failing", "unauthorized"]
# What a reader sees: the publisher's own state of the sink, or that none reports on it.
ReportedState = Literal["ok", "failing", "unauthorized", "not_running"]
REPORT_EVERY_S: Final = 5.0
# Several missed heartbeats, so a publisher busy with a slow receiver is not called dead.
STALE_AFTER_S: Final = 30.0


@dataclass
class SinkHealth:
    """One sink's state in the publisher that delivers it (written by ledger/outbox.py's Publisher)."""

    state: SinkState = "ok"
    last_error: str | None = None
    last_delivery_at: datetime | None = None
    delivered: int = 0
    dead: int = 0


class SinkReport(msgspec.Struct, frozen=True, kw_only=True):
    state: ReportedState
    last_error: str | None = None
    last_delivery_at: datetime | None = None


_REPORT: Final = """
insert into publisher_health as h (sink, state, last_error, last_delivery_at, reported_at, reporter)
select sink, state, last_error, last_delivery_at, now(), $5
from unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[])
    as r(sink, state, last_error, last_delivery_at)
on conflict (sink) do update set
    state = excluded.state,
    last_error = excluded.last_error,
    -- Another publisher of the same sink may have delivered later than this one.
    last_delivery_at = greatest(h.last_delivery_at, excluded.last_delivery_at),
    reported_at = excluded.reported_at,
    reporter = excluded.reporter
"""

_READ: Final = """
select sink, state, last_error, last_delivery_at,
       reported_at > now() - make_interval(secs => $2) as fresh
from publisher_health where sink = any($1::text[])
"""


class HealthReporter:
    """Writes a publisher's `SinkHealth` to the database: at once after `changed()`, else every
    `every_s` (the heartbeat that says the publisher is alive)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        health: Mapping[str, SinkHealth],
        reporter: str,
        every_s: float = REPORT_EVERY_S,
    ) -> None:
        self._pool = pool
        self._health = health
        self._reporter = reporter
        self._every_s = every_s
        self._changed = asyncio.Event()

    def changed(self) -> None:
        self._changed.set()

    async def run(self) -> None:
        while True:
            self._changed.clear()
            with contextlib.suppress(*DATABASE_ERRORS):  # the database is away: the next beat tries again
                await self.report()
            await wait_until_set(self._changed, self._every_s)

    async def report(self) -> None:
        names = list(self._health)
        healths = [self._health[name] for name in names]
        await self._pool.execute(
            _REPORT,
            names,
            [h.state for h in healths],
            [h.last_error for h in healths],
            [h.last_delivery_at for h in healths],
            self._reporter,
        )


async def read_health(
    pool: asyncpg.Pool, sinks: Sequence[str], stale_after_s: float = STALE_AFTER_S
) -> dict[str, SinkReport]:
    """Each configured sink's reported state; `not_running` where no publisher has reported on it
    within `stale_after_s` (its last report's error and delivery time kept, for the operator)."""
    rows = {row["sink"]: row for row in await pool.fetch(_READ, list(sinks), stale_after_s)}
    reports: dict[str, SinkReport] = {}
    for sink in sinks:
        row = rows.get(sink)
        if row is None:
            reports[sink] = SinkReport(state="not_running")
            continue
        reports[sink] = SinkReport(
            state=row["state"] if row["fresh"] else "not_running",
            last_error=row["last_error"],
            last_delivery_at=row["last_delivery_at"],
        )
    return reports
