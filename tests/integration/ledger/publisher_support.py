"""Helpers for the publisher tests: receivers in process (an httpx transport: the outside world, faked),
the real sinks over them, rows enqueued with SQL, and a publisher running in the background."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx

from spendledger.ledger.config import LagoSettings, WebhookSettings
from spendledger.ledger.outbox import CHANNEL, Publisher
from spendledger.ledger.sinks.lago import LagoSink
from spendledger.ledger.sinks.webhook import WebhookSink

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # a Standard Webhooks test secret


@dataclass
class Sent:
    """One request as the receiver saw it."""

    headers: dict[str, str]
    body: bytes

    @property
    def webhook_id(self) -> str | None:
        return self.headers.get("webhook-id")

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver(httpx.AsyncBaseTransport):
    """A receiver as the HTTP client reaches it. `refuse`: requests whose body holds one of these
    strings raise ValueError in the client, as aiohttp does for a header it will not send; `down`:
    connections are refused; `gate`: when set to an Event, each request waits for it (the receiver
    is slow) after `entered` is set; `status`: the answer."""

    status: int = 200
    down: bool = False
    refuse: set[str] = field(default_factory=set)
    gate: asyncio.Event | None = None
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    sent: list[Sent] = field(default_factory=list)
    answered: list[Sent] = field(default_factory=list)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = request.content
        if any(marker.encode() in body for marker in self.refuse):
            raise ValueError("the client refuses this request")
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        sent = Sent({k.lower(): v for k, v in request.headers.items()}, body)
        self.sent.append(sent)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        self.answered.append(sent)
        return httpx.Response(self.status, json={}, request=request)

    def ids(self) -> list[str | None]:
        return [s.webhook_id for s in self.answered]


def webhook_sink(receiver: Receiver, secret: str | None = SECRET) -> WebhookSink:
    client = httpx.AsyncClient(transport=receiver)
    return WebhookSink(WebhookSettings(url="http://receiver.test/hook", secret=secret), client)


def lago_sink(receiver: Receiver) -> LagoSink:
    settings = LagoSettings(
        api_base="http://lago.test", api_key="lago-key", event_code="tokens", charge_by="end_user_id"
    )
    return LagoSink(settings, httpx.AsyncClient(transport=receiver))


async def enqueue(pool: asyncpg.Pool, sink: str, *keys: str, notify: bool = True) -> None:
    """Rows due now, in this order of id, with a small payload naming their key; then a NOTIFY."""
    for key in keys:
        payload = {"transaction_id": key, "event_id": key} if sink == "lago" else {"event_id": key}
        await pool.execute(
            "insert into outbox (sink, dedupe_key, payload) values ($1, $2, $3::jsonb)",
            sink,
            key,
            json.dumps(payload),
        )
    if notify:
        await pool.execute("select pg_notify($1, '')", CHANNEL)


async def state(pool: asyncpg.Pool, key: str) -> str | None:
    found: str | None = await pool.fetchval("select state from outbox where dedupe_key = $1", key)
    return found


async def states(pool: asyncpg.Pool) -> dict[str, dict[str, Any]]:
    rows = await pool.fetch("select dedupe_key, state, attempts, own_failures, last_error from outbox")
    return {r["dedupe_key"]: dict(r) for r in rows}


async def make_due(pool: asyncpg.Pool) -> None:
    """Time passing: every pending row's backoff is over (leases are `end_leases`)."""
    await pool.execute("update outbox set next_attempt_at = now() where state = 'pending'")


async def end_leases(pool: asyncpg.Pool) -> None:
    """Time passing: every claim's lease is over (its publisher is taken for dead)."""
    await pool.execute("update outbox_claims set lease_until = now()")


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 20.0) -> bool:
    """Whether `check` came true within the timeout (polled: the publisher runs in the background)."""
    for _ in range(int(timeout_s / 0.02)):
        if await check():
            return True
        await asyncio.sleep(0.02)
    return await check()


@contextlib.asynccontextmanager
async def running(publisher: Publisher) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(publisher.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
