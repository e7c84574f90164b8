"""Forwarding one OpenAI-style request and accounting for it (streams: api/streaming.py).

The path of a request: decode the few fields we need, pick a deployment, forward the body (only
`model`, and for streams `stream_options`, are rewritten), read the usage, record `UsageRecorded`,
and only then release the response: no request is ever served unbilled.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

import asyncpg
import httpx
import msgspec
import structlog
from litestar import Response

from api.auth import Caller
from api.errors import ApiError, bad_request
from api.metrics import observe_request
from api.publishing import outbox_rows_for
from api.services import Services
from api.upstream import UpstreamFailure
from ledger.config import Deployment
from ledger.events import UsageRecorded
from ledger.money import ZERO, format_money
from ledger.pricing import Price, cost_of_usage
from ledger.usage import Recording

log = structlog.get_logger(__name__)

UPSTREAM_PATHS: Final = {
    "chat.completions": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
}
CUSTOMER_HEADERS: Final = ("x-litellm-customer-id", "x-litellm-end-user-id")
_INCLUDE_USAGE: Final = msgspec.Raw(b'{"include_usage":true}')
_encoder: Final = msgspec.json.Encoder()


class RequestHead(msgspec.Struct, kw_only=True):
    """The only fields the proxy reads; the rest of the body is forwarded untouched."""

    model: str
    stream: bool = False
    user: str | None = None
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None

    def output_cap(self, route: str, deployment: Deployment) -> int | None:
        """The most output tokens this request can cost, if anything bounds it."""
        if route == "embeddings":
            return 0
        requested = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return requested if requested is not None else deployment.max_output_tokens


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class _UsageOnly(msgspec.Struct):
    usage: Usage | None = None


_head_decoder: Final = msgspec.json.Decoder(RequestHead)
_fields_decoder: Final = msgspec.json.Decoder(dict[str, msgspec.Raw])
_usage_decoder: Final = msgspec.json.Decoder(_UsageOnly)


def decode_head(body: bytes) -> RequestHead:
    if not body.strip():
        raise bad_request("The request body is empty: send a JSON object with 'model'")
    try:
        head = _head_decoder.decode(body)
    except msgspec.ValidationError as exc:
        param = str(exc).rpartition("`$.")[2].rstrip("`") if "`$." in str(exc) else None
        if "missing required field `model`" in str(exc):
            raise bad_request("The request body must name a 'model'", param="model") from None
        raise bad_request(f"Invalid request body: {exc}", param=param) from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}") from None
    if not head.model:
        raise bad_request("The request body must name a 'model'", param="model")
    if head.user is not None and "\x00" in head.user:
        # PostgreSQL text cannot hold NUL: refuse now, not after the upstream has been paid for it.
        raise bad_request("'user' must not contain NUL characters", param="user")
    return head


def customer_of(head: RequestHead, headers: Mapping[str, str]) -> str | None:
    if head.user:
        return head.user
    for name in CUSTOMER_HEADERS:
        value = headers.get(name)
        if value:
            return value
    return None


def upstream_body(body: bytes, head: RequestHead, deployment: Deployment) -> bytes:
    """The body to send upstream: the deployment's model name, and usage asked for on streams."""
    if deployment.upstream_model == head.model and not (head.stream and not asks_usage(head)):
        return body
    fields = _fields_decoder.decode(body)
    fields["model"] = msgspec.Raw(_encoder.encode(deployment.upstream_model))
    if head.stream and not asks_usage(head):
        options = dict(head.stream_options or {})
        options["include_usage"] = True
        fields["stream_options"] = (
            msgspec.Raw(_encoder.encode(options)) if len(options) > 1 else _INCLUDE_USAGE
        )
    return _encoder.encode(fields)


def asks_usage(head: RequestHead) -> bool:
    return bool(head.stream_options and head.stream_options.get("include_usage"))


def estimate_tokens(data: bytes) -> int:
    """A rough count (4 bytes a token) for when the provider never reported usage."""
    return max(1, len(data) // 4)


class Exchange:
    """One proxied request: who asked, what for, where it goes, and how to bill it."""

    def __init__(
        self,
        route: str,
        caller: Caller,
        head: RequestHead,
        deployment: Deployment,
        price: Price | None,
        customer_id: str | None,
    ) -> None:
        self.call_id = str(uuid.uuid4())
        self.route = route
        self.caller = caller
        self.head = head
        self.deployment = deployment
        self.price = price
        self.customer_id = customer_id
        self.started_at = datetime.now(UTC)
        self.budget_periods: tuple[tuple[str, str, str], ...] = ()
        self.rate_headers: dict[str, str] = {}
        self.lease: str | None = None  # admitted under this budget lease (ledger/leases.py)
        self.hold = ZERO
        self.recorded = False

    def usage_event(
        self,
        *,
        status: str,
        http_status: int,
        usage: Usage | None = None,
        estimated: bool = False,
        error_type: str | None = None,
    ) -> UsageRecorded:
        input_tokens = usage.prompt_tokens if usage else 0
        output_tokens = usage.completion_tokens if usage else 0
        cost = cost_of_usage(self.price, input_tokens, output_tokens)
        return UsageRecorded(
            call_id=self.call_id,
            route=self.route,
            model_group=self.head.model,
            deployment_id=self.deployment.deployment_id,
            provider=self.deployment.provider,
            upstream_model=self.deployment.upstream_model,
            key_hash=self.caller.key_hash,
            key_alias=self.caller.key_alias,
            user_id=self.caller.user_id,
            team_id=self.caller.team_id,
            customer_id=self.customer_id,
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
    try:
        msgspec.json.decode(body, type=dict[str, dict[str, Any]])["error"]
    except (msgspec.DecodeError, KeyError):
        raise ApiError(
            status,
            body.decode(errors="replace")[:500],
            "invalid_request_error",
            headers=exchange.headers(event),
        ) from None
    return Response(
        content=body, status_code=status, media_type="application/json", headers=exchange.headers(event)
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
        usage = Usage(prompt_tokens=estimate_tokens(body), completion_tokens=estimate_tokens(content))
    event = exchange.usage_event(status="success", http_status=200, usage=usage, estimated=estimated)
    key_spend = await record(services, exchange, event)
    return Response(
        content=content,
        status_code=200,
        media_type="application/json",
        headers=exchange.headers(event, key_spend),
    )
