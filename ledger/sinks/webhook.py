"""Webhooks: one POST per outbox row to WEBHOOK_URL, signed per the Standard Webhooks spec.

`webhook-id` is the row's dedupe key, so it is the same on every retry and the receiver can drop
repeats; `webhook-timestamp` is the time of this attempt; `webhook-signature` is present when
WEBHOOK_SECRET (`whsec_…`) is set. Anything but a 2xx is retried with backoff until it succeeds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final

import httpx
from standardwebhooks.webhooks import Webhook

from ledger.config import WebhookSettings
from ledger.outbox import Claimed, Delivery
from ledger.sinks.http import PostTarget

NAME: Final = "webhook"


class WebhookSink:
    name = NAME
    batch_size = 50

    def __init__(self, settings: WebhookSettings, client: httpx.AsyncClient, timeout_s: float = 10.0) -> None:
        self._signer = Webhook(settings.secret) if settings.secret else None
        self._client = client
        self._target = PostTarget(
            client, settings.url, {"content-type": "application/json"}, httpx.Timeout(timeout_s)
        )

    def headers(self, row: Claimed, now: datetime) -> list[tuple[str, str]]:
        """The headers of this row's POST (content-type and the client's own are the target's)."""
        headers = [("webhook-id", row.dedupe_key), ("webhook-timestamp", str(int(now.timestamp())))]
        if self._signer is not None:
            headers.append(
                ("webhook-signature", self._signer.sign(row.dedupe_key, now, row.payload.decode()))
            )
        return headers

    async def _send(self, row: Claimed) -> str | None:
        """None when the receiver took it; else why not."""
        request = self._target.request(row.payload, self.headers(row, datetime.now(UTC)))
        try:
            response = await self._client.send(request)
        except httpx.HTTPError as exc:
            return f"webhook receiver unreachable: {type(exc).__name__}"
        if 200 <= response.status_code < 300:
            return None
        return f"webhook receiver answered {response.status_code}"

    async def deliver(self, rows: Sequence[Claimed]) -> Delivery:
        delivery = Delivery()
        for row, error in zip(rows, await asyncio.gather(*(self._send(row) for row in rows)), strict=True):
            if error is None:
                delivery.delivered.append(row.id)
            else:
                delivery.retry[row.id] = error
        return delivery
