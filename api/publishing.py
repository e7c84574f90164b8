"""Wiring of the outbox: which sinks the settings turn on, and the publisher every process runs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

import asyncpg
import httpx
import msgspec
import structlog

from spendledger.api.http_client import pooled_client
from spendledger.api.metrics import observe_delivery, observe_sink_reports, observe_status
from spendledger.ledger.config import Settings
from spendledger.ledger.events import UsageRecorded
from spendledger.ledger.outbox import OutboxRow, Publisher, Sink, outbox_status
from spendledger.ledger.publisher_health import SinkReport, read_health
from spendledger.ledger.sinks.lago import LagoSink, lago_row
from spendledger.ledger.sinks.webhook import NAME as WEBHOOK
from spendledger.ledger.sinks.webhook import WebhookSink
from spendledger.ledger.tickets import OutboxRows, no_outbox_rows
from spendledger.ledger.usage import RecordingContext
from spendledger.ledger.webhook_rows import WebhookFollower

log = structlog.get_logger(__name__)
STATUS_INTERVAL_S = 5.0


def build_sinks(settings: Settings, client: httpx.AsyncClient) -> list[Sink]:
    sinks: list[Sink] = []
    if settings.lago is not None:
        sinks.append(LagoSink(settings.lago, client))
    if settings.webhook is not None:
        sinks.append(WebhookSink(settings.webhook, client))
    return sinks


def recording_context(settings: Settings) -> RecordingContext:
    """What settles (and the webhook follower, which writes their webhook rows) take from the config."""
    budgets = msgspec.structs.asdict(settings.budget_settings())
    return RecordingContext(**budgets, webhooks=settings.webhook is not None)


def outbox_rows_builder(settings: Settings) -> OutboxRows:
    """What the application writes to the outbox with each usage event (the settle writes them in
    its transaction): Lago's row, when Lago is configured. Webhook rows follow the log
    (ledger/webhook_rows.py)."""
    lago = settings.lago
    if lago is None:
        return no_outbox_rows

    def lago_rows(event: UsageRecorded) -> list[OutboxRow]:
        return [lago_row(event, lago)]

    return lago_rows


def reporter_name() -> str:
    """Who reports a publisher's health: the host and process, for an operator to find it."""
    return f"{socket.gethostname()}:{os.getpid()}"


class PublisherRunner:
    """Runs a Publisher (unless `deliver` is off: `spendledger serve` delivers from its publisher
    child, or with `--no-publisher` leaves delivery to a `spendledger publish` elsewhere), reads the
    publisher's reported health (whichever process delivers), and keeps the outbox gauges fresh
    (the rows that wait: delivered rows are counted by `spendledger_outbox_delivered_total` in the
    process that delivers them); stopped with the process."""

    def __init__(
        self, pool: asyncpg.Pool, database_url: str, settings: Settings, deliver: bool = True
    ) -> None:
        self._client = pooled_client(100)
        self.sinks = build_sinks(settings, self._client)
        # The webhook rows follow the log: the webhook sink's loop writes them before it claims them
        # (on its own loop: a slow follower or receiver does not hold Lago's rows back).
        feeders = (
            {WEBHOOK: [WebhookFollower(pool, recording_context(settings))]}
            if settings.webhook is not None
            else {}
        )
        self.publisher = Publisher(pool, database_url, self.sinks, feeders=feeders, reporter=reporter_name())
        self.publisher.on_delivered.append(observe_delivery)
        self._pool = pool
        self._deliver = deliver
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        if self.sinks and self._deliver:
            self._tasks.append(asyncio.create_task(self.publisher.run()))
        self._tasks.append(asyncio.create_task(self._refresh_gauges()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._client.aclose()

    async def health(self) -> dict[str, SinkReport]:
        """Each configured sink's state as its publisher last reported it (`not_running`: none has
        reported lately)."""
        reports = await read_health(self._pool, [sink.name for sink in self.sinks])
        observe_sink_reports(reports)
        return reports

    async def _refresh_gauges(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                observe_status(await outbox_status(self._pool, dead_limit=0, delivered=False))
                await self.health()
            await asyncio.sleep(STATUS_INTERVAL_S)
