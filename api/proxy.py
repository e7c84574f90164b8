"""Forwarding one OpenAI-style request and accounting for it (streams: api/streaming.py).

The path of a request: decode and validate the fields we need (api/request_body.py), pick a
deployment, hold the worst case, forward the body (only `model`, and for streams `stream_options`,
are rewritten), read the usage, record `UsageRecorded`, and only then release the response: no
request is ever served unbilled.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Final

import asyncpg
import httpx
import msgspec
import structlog
from litestar import Response
from msgspec import Meta

from api.auth import Caller
from api.errors import ApiError
from api.jsonio import json_response
from api.metrics import observe_hold_exceeded, observe_request
from api.publishing import outbox_rows_for
from api.request_body import RequestHead
from api.services import Services
from api.upstream import UpstreamFailure
from ledger import store
from ledger.config import Deployment
from ledger.events import HoldExceeded, Route, UsageRecorded, UsageStatus
from ledger.money import ZERO, format_money
from ledger.pricing import Price, cost_of_usage
from ledger.scopes import Scopes
from ledger.usage import Recording

log = structlog.get_logger(__name__)

UPSTREAM_PATHS: Final[dict[Route, str]] = {
    "chat.completions": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
}


Count = Annotated[int, Meta(ge=0)]  # an upstream reporting negative tokens is answering nonsense


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: Count = 0
    completion_tokens: Count = 0
    total_tokens: Count = 0


class _UsageOnly(msgspec.Struct):
    usage: Usage | None = None


_usage_decoder: Final = msgspec.json.Decoder(_UsageOnly)


def estimate_tokens(size: int) -> int:
    """A rough count (4 bytes a token, OpenAI's rule of thumb) of `size` bytes of text, for when
    the provider never reported usage."""
    return max(1, size // 4)


class Exchange:
    """One proxied request: who asked, what for, where it goes, and how to bill it."""

    def __init__(
        self,
        route: Route,
        caller: Caller,
        head: RequestHead,
        deployment: Deployment,
        price: Price | None,
        customer_id: str | None,
    ) -> None:
        self.call_id = str(uuid.uuid4())
        self.route: Route = route
        self.caller = caller
        self.head = head
        self.deployment = deployment
        self.price = price
        self.scopes = Scopes(caller.key_hash, caller.user_id, caller.team_id, customer_id)
        self.started_at = datetime.now(UTC)
        self.budget_periods: tuple[tuple[str, str, str], ...] = ()
        self.rate_headers: dict[str, str] = {}
        self.lease: str | None = None  # admitted under this budget lease (ledger/leases.py)
        self.hold = ZERO
        self.recorded = False

    def usage_event(
        self,
        *,
        status: UsageStatus,
        http_status: int,
        usage: Usage | None = None,
        estimated: bool = False,
        error_type: str | None = None,
    ) -> UsageRecorded:
        input_tokens = usage.prompt_tokens if usage else 0
        output_tokens = usage.completion_tokens if usage else 0
        cost = cost_of_usage(self.price, input_tokens, output_tokens)
        scopes = self.scopes
        return UsageRecorded(
            call_id=self.call_id,
            route=self.route,
            model_group=self.head.model,
            deployment_id=self.deployment.deployment_id,
            provider=self.deployment.provider,
            upstream_model=self.deployment.upstream_model,
            key_hash=scopes.key_hash,
            key_alias=self.caller.key_alias,
            user_id=scopes.user_id,
            team_id=scopes.team_id,
            customer_id=scopes.customer_id,
            status=status,
            http_status=http_status,
            error_type=error_type,
            stream=self.head.stream,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            total_tokens=input_tokens + output_tokens,
            usage_estimated=estimated,
            input_cost_per_token=self.price.input_cost_per_token if self.price else None,
            output_cost_per_token=self.price.output_cost_per_token if self.price else None,
            cost=cost.total,
            priced=cost.priced,
            started_at=self.started_at,
            ended_at=datetime.now(UTC),
            budget_periods=self.budget_periods,
            hold=self.hold,
        )

    def headers(self, event: UsageRecorded | None = None, key_spend: Decimal | None = None) -> dict[str, str]:
        headers = {
            "x-litellm-call-id": self.call_id,
            "x-litellm-model-id": self.deployment.deployment_id,
            "x-litellm-model-group": self.head.model,
            **self.rate_headers,
        }
        if event is not None:
            headers["x-litellm-response-cost"] = format_money(event.cost)
        if key_spend is not None:
            headers["x-litellm-key-spend"] = format_money(key_spend)
        return headers


async def record(services: Services, exchange: Exchange, event: UsageRecorded) -> Decimal | None:
    """Commit the request's terminal event; if the ledger is unreachable, withhold the response."""
    exchange.recorded = True
    drawn = None  # what the settle drew from the request's lease; None: unknown
    try:
        spend = await services.recorder.record(
            Recording(
                event=event,
                outbox=outbox_rows_for(event, services.settings),
                metadata={"lease": exchange.lease} if exchange.lease else {},
            )
        )
        drawn = event.cost
        observe_request(event.route, event.status, event.model_group, event.priced)
        if event.cost > exchange.hold:
            services.spawn(note_hold_exceeded(services, event, exchange.hold))
        return spend
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        log.error("usage_not_recorded", call_id=exchange.call_id, error_type=type(exc).__name__)
        raise ApiError(
            503,
            "The usage of this request could not be recorded, so its response is withheld",
            "ledger_unavailable",
            headers=exchange.headers(),
        ) from None
    finally:
        if exchange.lease is not None and services.leases is not None:
            services.leases.finished(exchange.lease, exchange.hold, drawn)


async def note_hold_exceeded(services: Services, event: UsageRecorded, hold: Decimal) -> None:
    """Append `HoldExceeded` after a request cost more than its hold (it is billed in full: the
    `UsageRecorded` is committed). Off the response's path; if it cannot be appended, the warning
    and the metric still say so, and the usage event itself carries its hold and its cost."""
    excess = event.cost - hold
    observe_hold_exceeded(event.model_group)
    log.warning("hold_exceeded", call_id=event.call_id, model=event.model_group, hold=str(hold), cost=str(event.cost))
    flag = HoldExceeded(
        call_id=event.call_id,
        route=event.route,
        model_group=event.model_group,
        deployment_id=event.deployment_id,
        key_hash=event.key_hash,
        user_id=event.user_id,
        team_id=event.team_id,
        customer_id=event.customer_id,
        hold=hold,
        cost=event.cost,
        excess=excess,
        input_tokens=event.input_tokens,
        output_tokens=event.output_tokens,
    )
    try:
        async with services.pool.acquire() as conn, conn.transaction():
            await store.append(conn, f"request:{event.call_id}", 1, [flag], {"actor": event.key_hash})
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        log.error("hold_exceeded_not_recorded", call_id=event.call_id, error_type=type(exc).__name__)


async def record_failure(services: Services, exchange: Exchange, failure: UpstreamFailure) -> ApiError:
    event = exchange.usage_event(status="failure", http_status=failure.status, error_type=failure.error_type)
    await record(services, exchange, event)
    return ApiError(failure.status, failure.message, failure.error_type, headers=exchange.headers(event))


async def upstream_error_response(
    services: Services, exchange: Exchange, response: httpx.Response
) -> Response[Any]:
    """A provider's own error: 4xx pass through (the caller's request was at fault), else 502."""
    body = await response.aread()
    status = response.status_code
    if status in (401, 403) or status >= 500:
        message = f"{exchange.deployment.model_name}: upstream answered {status}"
        failure = UpstreamFailure(502, "upstream_error", message)
        raise await record_failure(services, exchange, failure)
    event = exchange.usage_event(status="failure", http_status=status, error_type="upstream_client_error")
    await record(services, exchange, event)
    error = provider_error(body, exchange.deployment)
    return json_response({"error": error}, status, exchange.headers(event))


class _ProviderError(msgspec.Struct):
    message: str = ""
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | int | None = None


class _ProviderErrorBody(msgspec.Struct):
    error: _ProviderError


_provider_error_decoder: Final = msgspec.json.Decoder(_ProviderErrorBody)
_MAX_ERROR_TEXT: Final = 500


class ProviderError(msgspec.Struct, frozen=True):
    """The OpenAI error envelope's four fields, in its order."""

    message: str
    type: str
    param: str | None
    code: str | None


def provider_error(body: bytes, deployment: Deployment) -> ProviderError:
    """A provider's 4xx, rebuilt from its envelope's four fields only (nothing else it sent is
    passed on), each cut to a bounded length, and with the deployment's own API key blanked out:
    a provider that echoes request headers must not show the caller our credentials."""
    try:
        error = _provider_error_decoder.decode(body).error
        message, type_, param = error.message, error.type, error.param
        code = None if error.code is None else str(error.code)
    except msgspec.DecodeError:
        message, type_, param, code = body.decode(errors="replace"), "invalid_request_error", None, None
    secret = deployment.api_key
    cleaned = [
        None if text is None else (text.replace(secret, "[redacted]") if secret else text)[:_MAX_ERROR_TEXT]
        for text in (message, type_, code, param)
    ]
    return ProviderError(
        message=cleaned[0] or "the provider refused the request",
        type=cleaned[1] or "invalid_request_error",
        code=cleaned[2],
        param=cleaned[3],
    )


async def forward(services: Services, exchange: Exchange, body: bytes) -> Response[Any]:
    path = UPSTREAM_PATHS[exchange.route]
    try:
        response = await services.upstream.send(exchange.deployment, path, body, stream=False)
    except UpstreamFailure as failure:
        raise await record_failure(services, exchange, failure) from None
    if response.status_code != 200:
        return await upstream_error_response(services, exchange, response)
    content = response.content
    try:
        usage = _usage_decoder.decode(content).usage
    except msgspec.DecodeError:
        raise await record_failure(
            services,
            exchange,
            UpstreamFailure(
                502,
                "upstream_error",
                f"{exchange.deployment.model_name}: upstream answered with invalid JSON",
            ),
        ) from None
    estimated = usage is None
    if usage is None:
        usage = Usage(prompt_tokens=estimate_tokens(len(body)), completion_tokens=estimate_tokens(len(content)))
    event = exchange.usage_event(status="success", http_status=200, usage=usage, estimated=estimated)
    key_spend = await record(services, exchange, event)
    return Response(
        content=content,
        status_code=200,
        media_type="application/json",
        headers=exchange.headers(event, key_spend),
    )
