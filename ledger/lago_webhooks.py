"""Lago's webhooks, as Lago signs them, and its `events.errors` recorded in the log.

Lago accepts a usage event (2xx: the outbox marks it delivered) and may fail to bill it later, in
post-processing: an unknown billable metric code, a missing aggregation property, a filter value it
does not know. It says so with an `events.errors` webhook listing the transaction ids (our call
ids) under each error. Each becomes a `LagoEventRejected` event, so the rejection is in the log —
the audit API, `/outbox/status`, the reconciliation export and `spendledger reconcile` show it.

The signature is checked as Lago signs (its "Format & Signature" page): `X-Lago-Signature-Algorithm`
`hmac` — `X-Lago-Signature` is the base64 HMAC-SHA256 of the body under the organization's HMAC
signature token (LAGO_WEBHOOK_HMAC_KEY) — or `jwt` — an RS256 JWT whose `data` claim is the body,
verified with the public key Lago serves at `GET /api/v1/webhooks/json_public_key`. `X-Lago-Unique-Key`
names the webhook: Lago sends a webhook again until it is answered 2xx, and the second copy finds
its events already appended (their stream is the webhook's).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any, Final

import asyncpg
import jwt
import msgspec
import structlog
from cryptography.hazmat.primitives import serialization

from spendledger.ledger.connections import Connection
from spendledger.ledger.events import LagoEventRejected
from spendledger.ledger.identifiers import is_identifier
from spendledger.ledger.store import ConcurrencyError, append

log = structlog.get_logger(__name__)

ERRORS: Final = ("invalid_code", "missing_aggregation_property", "invalid_filter_values", "missing_group_key")
REFETCH_AFTER_S: Final = 60.0
MAX_REJECTIONS: Final = 10_000  # transaction ids in one webhook: more is not Lago's shape
_decoder: Final = msgspec.json.Decoder()

PublicKey = Callable[[], Awaitable[bytes]]  # Lago's webhook public key (PEM)


class WebhookRefused(Exception):
    """A webhook that is not Lago's, or not in its shape: `status` is what to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def verify(headers: Mapping[str, str], body: bytes, hmac_key: str | None, public_key: PublicKey) -> str:
    """The webhook's unique key, once its signature is Lago's; WebhookRefused otherwise."""
    algorithm = headers.get("x-lago-signature-algorithm", "")
    signature = headers.get("x-lago-signature", "")
    unique_key = headers.get("x-lago-unique-key", "")
    if not signature:
        raise WebhookRefused(401, "X-Lago-Signature is missing")
    if not is_identifier(unique_key):
        raise WebhookRefused(400, "X-Lago-Unique-Key must name the webhook (an id of 1-255 printable characters)")
    if algorithm == "hmac":
        if hmac_key is None:
            raise WebhookRefused(401, "an hmac-signed Lago webhook needs LAGO_WEBHOOK_HMAC_KEY (Lago's HMAC signature token)")
        expected = base64.b64encode(hmac.new(hmac_key.encode(), body, hashlib.sha256).digest()).decode()
        if not hmac.compare_digest(expected, signature):
            raise WebhookRefused(401, "the webhook's HMAC signature is not Lago's")
        return unique_key
    if algorithm == "jwt":
        try:
            claims = jwt.decode(signature, await public_key(), algorithms=["RS256"])
        except jwt.InvalidTokenError:
            raise WebhookRefused(401, "the webhook's JWT signature is not Lago's") from None
        if not isinstance(claims.get("data"), str) or claims["data"].encode() != body:
            raise WebhookRefused(401, "the webhook's JWT does not sign this body")
        return unique_key
    raise WebhookRefused(400, "X-Lago-Signature-Algorithm must be 'hmac' or 'jwt'")


def rejections(body: bytes, webhook_id: str, received_at: datetime) -> list[LagoEventRejected]:
    """The rejections an `events.errors` webhook reports (none for any other webhook type)."""
    try:
        document = _decoder.decode(body)
    except msgspec.DecodeError:
        raise WebhookRefused(400, "the webhook's body is not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("webhook_type"), str):
        raise WebhookRefused(400, "the webhook's body has no webhook_type")
    if document["webhook_type"] != "events.errors":
        return []
    errors = document.get("events_errors")
    if not isinstance(errors, dict):
        raise WebhookRefused(400, "an events.errors webhook needs an events_errors object")
    found: list[LagoEventRejected] = []
    for error in ERRORS:
        ids = errors.get(error) or []
        if not isinstance(ids, list) or not all(isinstance(i, str) and is_identifier(i) for i in ids):
            raise WebhookRefused(400, f"events_errors.{error} must be a list of transaction ids")
        found += [
            LagoEventRejected(transaction_id=i, error=error, webhook_id=webhook_id, received_at=received_at)
            for i in dict.fromkeys(ids)
        ]
    if len(found) > MAX_REJECTIONS:
        raise WebhookRefused(413, f"more than {MAX_REJECTIONS} rejections in one webhook")
    return found


async def record_rejections(conn: Connection, webhook_id: str, found: list[LagoEventRejected]) -> bool:
    """Append the webhook's rejections on its own stream; False when it was recorded before."""
    if not found:
        return False
    try:
        await append(conn, f"lago-webhook:{webhook_id}", 0, found)
    except ConcurrencyError:
        return False
    return True


def public_key_of(encoded: Any) -> bytes:
    """The PEM of the public key Lago serves base64-encoded (of its PEM, wrapped at 60 columns as
    Ruby's encode64 writes it; a bare DER key is taken too)."""
    if not isinstance(encoded, str):
        raise ValueError("Lago's webhook public key is not a string")
    try:
        decoded = base64.b64decode("".join(encoded.split()), validate=True)
    except ValueError:
        raise ValueError("Lago's webhook public key is not base64") from None
    try:
        key = (
            serialization.load_pem_public_key(decoded)
            if decoded.lstrip().startswith(b"-----BEGIN")
            else serialization.load_der_public_key(decoded)
        )
    except ValueError:
        raise ValueError("Lago's webhook public key is not a public key") from None
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


class LagoWebhookReceiver:
    """Verifies Lago's webhooks and records their rejections. Lago's public key is fetched once, and
    again when a jwt does not verify with it (Lago may have rotated it) — at most once a minute,
    so that forged webhooks cannot make us hammer Lago."""

    def __init__(self, pool: asyncpg.Pool, hmac_key: str | None, fetch_public_key: PublicKey) -> None:
        self._pool = pool
        self._hmac_key = hmac_key
        self._fetch = fetch_public_key
        self._key: bytes | None = None
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    async def receive(self, headers: Mapping[str, str], body: bytes, now: datetime) -> int:
        """How many rejections the webhook recorded (0 for another webhook type, or a copy)."""
        try:
            webhook_id = await verify(headers, body, self._hmac_key, self._public_key)
        except WebhookRefused:
            stale = time.monotonic() - self._fetched_at > REFETCH_AFTER_S
            if headers.get("x-lago-signature-algorithm") != "jwt" or self._key is None or not stale:
                raise
            self._key = None  # perhaps rotated: once more with the key Lago serves now
            webhook_id = await verify(headers, body, self._hmac_key, self._public_key)
        found = rejections(body, webhook_id, now)
        async with self._pool.acquire() as conn, conn.transaction():
            recorded = await record_rejections(conn, webhook_id, found)
        if recorded:
            log.warning("lago_events_rejected", webhook_id=webhook_id, rejections=len(found))
        return len(found) if recorded else 0

    async def _public_key(self) -> bytes:
        async with self._lock:
            if self._key is None:
                self._key = await self._fetch()
                self._fetched_at = time.monotonic()
            return self._key


_STATUS: Final = """
select count(*) over () as total, data->>'transaction_id' as transaction_id, data->>'error' as error,
       data->>'webhook_id' as webhook_id, data->>'received_at' as received_at
from events where type = 'LagoEventRejected' order by recorded_at desc, position desc limit $1
"""


async def rejections_status(conn: asyncpg.Pool | Connection, limit: int = 100) -> dict[str, Any]:
    """What `/outbox/status` shows of Lago's rejections: how many, and the latest `limit`."""
    rows = await conn.fetch(_STATUS, limit)
    return {
        "count": rows[0]["total"] if rows else 0,
        "latest": [
            {name: row[name] for name in ("transaction_id", "error", "webhook_id", "received_at")} for row in rows
        ],
    }
