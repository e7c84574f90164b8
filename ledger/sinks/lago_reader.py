"""What Lago holds, read back: one event by transaction id, a customer's events, the current usage,
and the public key its webhooks are signed with (Lago's API: ../shared/lago-openapi/openapi.yaml).

Read by `spendledger reconcile --against-lago` (projections/lago_against.py) and by the webhook
receiver (ledger/lago_webhooks.py). The sink that sends is ledger/sinks/lago.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any, Final
from urllib.parse import quote

import httpx
import msgspec

from spendledger.ledger.config import LagoSettings
from spendledger.ledger.lago_webhooks import public_key_of

PER_PAGE: Final = 100  # Lago's largest page
_decoder: Final = msgspec.json.Decoder(float_hook=Decimal)  # amounts compare exactly


class LagoReadError(Exception):
    """Lago answered a read with something other than the document or a 404."""


class LagoReader:
    def __init__(self, settings: LagoSettings, client: httpx.AsyncClient) -> None:
        self._base = settings.api_base.rstrip("/") + "/api/v1"
        self._headers = {"Authorization": f"Bearer {settings.api_key}", "Accept": "application/json"}
        self._client = client

    async def event(self, transaction_id: str) -> dict[str, Any] | None:
        """`GET /events/{transaction_id}`: the event Lago stored, or None (404)."""
        found = await self._get(f"/events/{quote(transaction_id, safe='')}")
        return None if found is None else _object(found, "event")

    async def events_of(self, subscription_id: str, code: str) -> AsyncIterator[dict[str, Any]]:
        """`GET /events` of one subscription and billable metric code, every page."""
        page: int | None = 1
        while page is not None:
            params = {"external_subscription_id": subscription_id, "code": code, "page": page, "per_page": PER_PAGE}
            found = await self._get("/events", params)
            if found is None:
                return
            events = found.get("events")
            if not isinstance(events, list):
                raise LagoReadError("Lago's event list has no 'events'")
            for event in events:
                yield event
            next_page = (found.get("meta") or {}).get("next_page")
            page = next_page if isinstance(next_page, int) and next_page > page else None

    async def current_usage(self, customer_id: str, subscription_id: str) -> dict[str, Any] | None:
        """`GET /customers/{id}/current_usage`: the subscription's current period, or None (404:
        no such customer or no active subscription)."""
        found = await self._get(
            f"/customers/{quote(customer_id, safe='')}/current_usage",
            {"external_subscription_id": subscription_id, "apply_taxes": "false"},
        )
        return None if found is None else _object(found, "customer_usage")

    async def webhook_public_key(self) -> bytes:
        """`GET /webhooks/json_public_key`: the PEM that verifies Lago's jwt-signed webhooks."""
        found = await self._get("/webhooks/json_public_key")
        if found is None:
            raise LagoReadError("Lago has no webhook public key (404)")
        try:
            return public_key_of(_object(found, "webhook").get("public_key"))
        except ValueError as exc:
            raise LagoReadError(str(exc)) from None

    async def _get(self, path: str, params: dict[str, Any] | None = None) -> dict[str, Any] | None:
        response = await self._client.get(self._base + path, params=params, headers=self._headers)
        if response.status_code == 404:
            return None
        if response.status_code in (401, 403):
            raise LagoReadError(f"Lago refused our API key ({response.status_code}): check LAGO_API_KEY")
        if response.status_code != 200:
            raise LagoReadError(f"Lago answered {response.status_code} for GET {path.split('?')[0]}")
        try:
            document = _decoder.decode(response.content)
        except msgspec.DecodeError:
            raise LagoReadError(f"Lago's answer to GET {path} is not JSON") from None
        if not isinstance(document, dict):
            raise LagoReadError(f"Lago's answer to GET {path} is not an object")
        return document


def _object(document: dict[str, Any], name: str) -> dict[str, Any]:
    found = document.get(name)
    if not isinstance(found, dict):
        raise LagoReadError(f"Lago's answer has no '{name}' object")
    return found
