"""The outbox, seen from outside: what is pending, delivered, dead or unbillable, and a retry."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
from litestar import Request, Response, get, post

from spendledger.api.auth import requires
from spendledger.api.jsonio import json_response
from spendledger.api.metrics import observe_status
from spendledger.api.roles import Permission
from spendledger.api.schemas import BODY, GUARDED, documented
from spendledger.api.services import services_of
from spendledger.ledger.lago_webhooks import rejections_status
from spendledger.ledger.outbox import outbox_status, retry_dead_letters
from spendledger.ledger.publisher_health import SinkReport
from spendledger.ledger.webhook_rows import webhook_follower_lag


class RetryRequest(msgspec.Struct, kw_only=True):
    ids: list[int] | None = None  # none named: every dead letter (of `sink`, if given)
    sink: str | None = None


class SinkCounts(msgspec.Struct, kw_only=True):
    """A sink's rows by state (`delivered` only where counted), and its oldest pending row's age."""

    pending: int | msgspec.UnsetType = msgspec.UNSET
    delivered: int | msgspec.UnsetType = msgspec.UNSET
    dead: int | msgspec.UnsetType = msgspec.UNSET
    unbillable: int | msgspec.UnsetType = msgspec.UNSET
    oldest_pending_age_s: float | msgspec.UnsetType = msgspec.UNSET


class DeadLetter(msgspec.Struct, kw_only=True):
    id: int
    sink: str
    dedupe_key: str
    attempts: int
    last_error: str | None
    created_at: datetime
    call_id: str | None


class FollowerLag(msgspec.Struct, kw_only=True):
    events_behind: int
    followed_at: datetime | None


class LagoRejection(msgspec.Struct, kw_only=True):
    transaction_id: str  # the call id
    error: str  # invalid_code, missing_aggregation_property, invalid_filter_values, missing_group_key
    webhook_id: str
    received_at: str


class LagoRejections(msgspec.Struct, kw_only=True):
    """Usage events Lago accepted and then could not bill (its `events.errors` webhook)."""

    count: int
    latest: list[LagoRejection]  # the last 100, newest first


class OutboxStatus(msgspec.Struct, kw_only=True):
    sinks: dict[str, SinkCounts]
    dead_letters: list[DeadLetter]  # the first 100
    webhook_follower: FollowerLag | msgspec.UnsetType = msgspec.UNSET  # when webhooks are on
    publisher: dict[str, SinkReport]  # each sink as its publisher reports it (not_running: none does)
    lago_rejections: LagoRejections | msgspec.UnsetType = msgspec.UNSET  # when Lago is on


class Requeued(msgspec.Struct, kw_only=True):
    requeued: int


@get(
    "/outbox/status",
    guards=[requires(Permission.READ_ALL)],
    tags=["outbox"],
    summary="Outbox rows by sink and state, the oldest pending age, and the dead letters",
    **documented(*GUARDED),
)
async def get_outbox_status(request: Request[Any, Any, Any]) -> Response[OutboxStatus]:
    services = services_of(request)
    status = await outbox_status(services.pool)
    observe_status(status)
    if services.settings.webhook is not None:  # its rows are written by the follower, after the log
        status["webhook_follower"] = await webhook_follower_lag(services.pool)
    if services.settings.lago is not None:
        status["lago_rejections"] = await rejections_status(services.pool)
    return json_response({**status, "publisher": await services.publisher.health()})


@post(
    "/outbox/retry",
    guards=[requires(Permission.MANAGE)],
    tags=["outbox"],
    status_code=200,
    summary="Send dead letters again (all, or those named)",
    **documented(*BODY),
)
async def post_outbox_retry(request: Request[Any, Any, Any], data: RetryRequest) -> Response[Requeued]:
    services = services_of(request)
    count = await retry_dead_letters(services.pool, data.ids, data.sink)
    return json_response({"requeued": count})


route_handlers = [get_outbox_status, post_outbox_retry]
