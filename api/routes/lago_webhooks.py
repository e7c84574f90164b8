"""`POST /lago/webhooks`: Lago's webhooks, signed as Lago signs them (no API key: Lago sends none).

Point a Lago webhook endpoint at `https://<gateway>/lago/webhooks` (either signature). Its
`events.errors` are recorded as `LagoEventRejected` events (ledger/lago_webhooks.py); any other
webhook type is acknowledged and ignored, so that Lago does not send it again.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec
from litestar import Request, Response, post

from spendledger.api.errors import ApiError
from spendledger.api.jsonio import json_response
from spendledger.api.schemas import documented
from spendledger.api.services import services_of
from spendledger.ledger.lago_webhooks import WebhookRefused
from spendledger.ledger.sinks.lago_reader import LagoReadError


class WebhookReceived(msgspec.Struct, kw_only=True):
    received: bool
    rejections_recorded: int  # 0 for another webhook type, or a webhook recorded before


@post(
    "/lago/webhooks",
    status_code=200,
    tags=["lago"],
    summary="Lago's webhooks: events.errors recorded as LagoEventRejected (signature checked)",
    # No key (Lago sends none): its signature instead (401), its shape (400), its size (413), and
    # Lago's public key or the database out of reach (503: Lago sends it again).
    **documented(400, 401, 404, 413, 503, keyless=True),
)
async def lago_webhook(request: Request[Any, Any, Any]) -> Response[WebhookReceived]:
    receiver = services_of(request).lago_webhooks
    if receiver is None:
        raise ApiError(404, "Lago is not configured on this gateway", "invalid_request_error", "not_found")
    body = await request.body()
    headers = {name.lower(): value for name, value in request.headers.items()}
    try:
        recorded = await receiver.receive(headers, body, datetime.now(UTC))
    except WebhookRefused as refused:
        kind = "authentication_error" if refused.status == 401 else "invalid_request_error"
        raise ApiError(refused.status, refused.message, kind, "invalid_lago_webhook") from None
    except (LagoReadError, httpx.HTTPError):
        # Lago sends the webhook again on a non-2xx: nothing is lost while its key cannot be read.
        raise ApiError(503, "Lago's webhook public key cannot be read now", "api_error", "lago_unreachable") from None
    return json_response({"received": True, "rejections_recorded": recorded})


route_handlers = [lago_webhook]
