"""The outbox, seen from outside: what is pending, delivered, dead or unbillable, and a retry."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, get, post

from api.auth import requires
from api.jsonio import json_response
from api.metrics import observe_status
from api.roles import Permission
from api.services import Services, services_of
from ledger.outbox import outbox_status, retry_dead_letters
from ledger.webhook_rows import webhook_follower_lag


class RetryRequest(msgspec.Struct, kw_only=True):
    ids: list[int] | None = None  # none named: every dead letter (of `sink`, if given)
    sink: str | None = None


def publisher_health(services: Services) -> dict[str, Any]:
    return {
        name: {
            "state": health.state,
            "last_error": health.last_error,
            "last_delivery_at": health.last_delivery_at.isoformat() if health.last_delivery_at else None,
        }
        for name, health in services.publisher.publisher.health.items()
    }


@get(
    "/outbox/status",
    guards=[requires(Permission.READ_ALL)],
    tags=["outbox"],
    summary="Outbox rows by sink and state, the oldest pending age, and the dead letters",
)
async def get_outbox_status(request: Request[Any, Any, Any]) -> Response[Any]:
    services = services_of(request)
    status = await outbox_status(services.pool)
    observe_status(status)
    if services.settings.webhook is not None:  # its rows are written by the follower, after the log
        status["webhook_follower"] = await webhook_follower_lag(services.pool)
    return json_response({**status, "publisher": publisher_health(services)})


@post(
    "/outbox/retry",
    guards=[requires(Permission.MANAGE)],
    tags=["outbox"],
    status_code=200,
    summary="Send dead letters again (all, or those named)",
)
async def post_outbox_retry(request: Request[Any, Any, Any], data: RetryRequest) -> Response[Any]:
    services = services_of(request)
    count = await retry_dead_letters(services.pool, data.ids, data.sink)
    return json_response({"requeued": count})


route_handlers = [get_outbox_status, post_outbox_retry]
