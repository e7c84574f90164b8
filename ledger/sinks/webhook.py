"""Webhooks: one POST per outbox row to WEBHOOK_URL, signed per the Standard Webhooks spec.

`webhook-id` is the row's dedupe key in a header-safe form (`webhook_id`), so it is the same on
every retry and the receiver can drop repeats; `webhook-timestamp` is the time of this attempt;
`webhook-signature` (of that id) is present when WEBHOOK_SECRET (`whsec_…`) is set. Anything but a
2xx is retried with backoff until it succeeds. An exception while building or sending one row
fails that row alone (`Delivery.failed`), never the batch.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import string
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final

import httpx
from standardwebhooks.webhooks import Webhook

from spendledger.ledger.config import WebhookSettings
from spendledger.ledger.outbox import Claimed, Delivery, receiver_error
from spendledger.ledger.sinks.http import PostTarget

NAME: Final = "webhook"
# What a `webhook-id` may hold as it is: letters, digits and `-._:@+=/,`, enough for every key the
# ledger makes (`spend_tracked:<call id>`, `budget_crossed:customer:<id>:<period>:max`). Anything
# else, `%` and `~` included, is percent-encoded (UTF-8), so the encoding is one-to-one.
SAFE_ID_CHARACTERS: Final = string.ascii_letters + string.digits + "-._:@+=/,"
# Longer ids (past the 256-character client ids the API admits, encoded) keep their first part and
# end in `~` and the SHA-256 of the whole key: `~` never survives the encoding, so such an id
# cannot be another key's.
WEBHOOK_ID_MAX_LENGTH: Final = 512
_DIGEST_LENGTH: Final = 64
_SAFE_BYTES: Final = frozenset(SAFE_ID_CHARACTERS.encode())
_ALL_SAFE: Final = re.compile(f"[{re.escape(SAFE_ID_CHARACTERS)}]*")


def _percent_encoded(text: str) -> str:
    if _ALL_SAFE.fullmatch(text):
        return text
    return "".join(chr(byte) if byte in _SAFE_BYTES else f"%{byte:02X}" for byte in text.encode())


def webhook_id(dedupe_key: str) -> str:
    """The `webhook-id` of a row: its dedupe key if that is header-safe and short enough, else a
    deterministic encoding of it (the same on every retry, so receivers still dedupe)."""
    encoded = _percent_encoded(dedupe_key)
    if len(encoded) <= WEBHOOK_ID_MAX_LENGTH:
        return encoded
    digest = hashlib.sha256(dedupe_key.encode()).hexdigest()
    head = encoded[: WEBHOOK_ID_MAX_LENGTH - _DIGEST_LENGTH - 1]
    if (cut := head.find("%", len(head) - 2)) != -1:
        head = head[:cut]  # not half an escape
    return f"{head}~{digest}"


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
        """The headers of this row's POST (content-type and the client's own are the target's); the
        signature covers the id as sent."""
        msg_id = webhook_id(row.dedupe_key)
        headers = [("webhook-id", msg_id), ("webhook-timestamp", str(int(now.timestamp())))]
        if self._signer is not None:
            headers.append(("webhook-signature", self._signer.sign(msg_id, now, row.payload.decode())))
        return headers

    async def _send(self, row: Claimed, delivery: Delivery) -> None:
        """POST one row and file its outcome. Any exception is this row's alone: one out of the HTTP
        client or the network is the receiver's (retried until it answers 2xx); any other (a value
        the client refuses, say) is the row's own failure."""
        try:
            request = self._target.request(row.payload, self.headers(row, datetime.now(UTC)))
            response = await self._client.send(request)
        except Exception as exc:
            if receiver_error(exc):
                delivery.retry[row.id] = f"webhook receiver unreachable: {type(exc).__name__}"
            else:
                delivery.failed[row.id] = type(exc).__name__
            return
        if 200 <= response.status_code < 300:
            delivery.delivered.append(row.id)
        else:
            delivery.retry[row.id] = f"webhook receiver answered {response.status_code}"

    async def deliver(self, rows: Sequence[Claimed]) -> Delivery:
        delivery = Delivery()
        await asyncio.gather(*(self._send(row, delivery) for row in rows))
        return delivery
