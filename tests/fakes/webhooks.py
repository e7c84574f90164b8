"""A fake webhook receiver for the spend webhooks (Standard Webhooks headers), for end-to-end tests.

Every POST (any path) is recorded with lower-cased headers, the raw body bytes and the body parsed as
JSON with `parse_float=Decimal` (so money keeps its exact decimal digits). Tests make it fail
(`fail_status`, `fail_next`) or answer late (`delay_s`), then check signatures with `verify(secret)`
and exactly-once delivery with `unique_ids()` / `delivered_payloads()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import decimal
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.fakes.serving import Served, serve_in_thread

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON constant {name}")


def parse_json(raw: bytes) -> Any:
    """JSON with decimals kept exact (`Decimal`); None when the body is empty or not JSON."""
    if not raw:
        return None
    try:
        return json.loads(raw, parse_float=decimal.Decimal, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError):
        return None


@dataclass
class RecordedDelivery:
    """One POST as the receiver saw it; `status` is what it answered (set before any `delay_s`)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any
    status: int | None = None
    received_at: float = 0.0

    @property
    def webhook_id(self) -> str | None:
        return self.headers.get("webhook-id")

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass(eq=False)
class FakeWebhookReceiver:
    """Raw ASGI app. `fail_status` answers every POST with that status; otherwise `fail_next` > 0 answers
    500 and counts down; otherwise `success_status`. `delay_s` delays every answer (after recording)."""

    fail_status: int | None = None
    fail_next: int = 0
    delay_s: float = 0.0
    success_status: int = 200
    deliveries: list[RecordedDelivery] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.RLock()
        self._stopping = False

    def reset(self) -> None:
        """Default controls, no deliveries (the list object is kept)."""
        with self._lock:
            self.fail_status, self.fail_next, self.delay_s, self.success_status = None, 0, 0.0, 200
            self.deliveries.clear()

    # helpers for assertions

    def successful(self) -> list[RecordedDelivery]:
        """Deliveries answered with a 2xx, in arrival order."""
        with self._lock:
            return [d for d in self.deliveries if d.ok]

    def unique_ids(self) -> list[str]:
        """Distinct `webhook-id` values of 2xx-answered deliveries, in first-seen order."""
        ids = [d.webhook_id for d in self.successful() if d.webhook_id is not None]
        return list(dict.fromkeys(ids))

    def delivered_payloads(self, event: str | None = None) -> list[Any]:
        """JSON body of the first 2xx delivery of each webhook-id (optionally only `payload["event"] == event`)."""
        seen: set[str | None] = set()
        payloads = []
        for d in self.successful():
            if d.webhook_id in seen:
                continue
            seen.add(d.webhook_id)
            if event is None or (isinstance(d.json, dict) and d.json.get("event") == event):
                payloads.append(d.json)
        return payloads

    def verify(self, secret: str, deliveries: list[RecordedDelivery] | None = None) -> list[Any]:
        """Check the Standard Webhooks signature of every recorded delivery (or of `deliveries`).

        Returns their parsed bodies (Decimal numbers); raises `WebhookVerificationError` naming the
        first delivery whose `webhook-id`/`webhook-timestamp`/`webhook-signature` do not verify
        (missing headers, a timestamp more than 5 minutes off, or no matching `v1,` signature).
        """
        if deliveries is None:
            with self._lock:
                deliveries = list(self.deliveries)
        webhook = Webhook(secret)
        parsed = []
        for index, delivery in enumerate(deliveries):
            try:
                webhook.verify(delivery.body, delivery.headers, json_parse=False)
            except WebhookVerificationError as exc:
                raise WebhookVerificationError(
                    f"delivery {index} (webhook-id {delivery.webhook_id!r}): {exc}"
                ) from exc
            parsed.append(delivery.json)
        return parsed

    # ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        if scope["method"] != "POST":
            await _send(send, 405, b'{"error": "method not allowed"}', [(b"allow", b"POST")])
            return
        raw = b"".join(chunks)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        record = RecordedDelivery(
            "POST", scope["path"], headers, raw, parse_json(raw), received_at=time.time()
        )
        with self._lock:
            if self.fail_status is not None:
                status = self.fail_status
            elif self.fail_next > 0:
                self.fail_next -= 1
                status = 500
            else:
                status = self.success_status
            record.status = status
            self.deliveries.append(record)
        await self._sleep(self.delay_s)
        body = b'{"received": true}' if 200 <= status < 300 else b'{"error": "fake receiver failure"}'
        await _send(send, status, body)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but give up early when the server is shutting down."""
        deadline = time.monotonic() + seconds
        for _ in range(int(seconds / 0.05) + 2):
            left = deadline - time.monotonic()
            if self._stopping or left <= 0:
                return
            await asyncio.sleep(min(left, 0.05))


async def _send(send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    if status in (204, 304) or status < 200:
        body = b""  # no content allowed
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(extra or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# --- runner ---


@dataclass
class RunningWebhookReceiver(Served[FakeWebhookReceiver]):
    """Handle on a served FakeWebhookReceiver: set `WEBHOOK_URL` to `url` (any path is accepted)."""

    @property
    def base_url(self) -> str:
        return self.root_url

    @property
    def url(self) -> str:
        return f"{self.base_url}/webhook"


@contextlib.contextmanager
def run_fake_webhook_receiver(
    app: FakeWebhookReceiver | None = None, startup_timeout_s: float = 10.0
) -> Iterator[RunningWebhookReceiver]:
    """Serve `app` with uvicorn in a background thread on a free 127.0.0.1 port; stop it on exit."""
    fake = app or FakeWebhookReceiver()
    fake._stopping = False

    def stopping() -> None:  # delayed answers give up at once, so shutdown need not wait for them
        fake._stopping = True

    with serve_in_thread(
        fake, "fake-webhooks", startup_timeout_s, what="fake webhook receiver", on_stop=stopping
    ) as served:
        yield RunningWebhookReceiver(fake, served.port, served.server, served.thread)
