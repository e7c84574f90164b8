"""Forwarding one OpenAI-style request and accounting for it (streams: api/streaming.py).

The path of a request: decode and validate the fields we need (api/request_body.py), pick a
deployment, hold the worst case (api/enforcement.py: the ledger's `Ticket`), forward the body (only
`model`, and for streams `stream_options`, are rewritten), read the usage, settle the ticket with
`UsageRecorded`, and only then release the response: no request is ever served unbilled.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

import httpx
import msgspec
import structlog
from litestar import Response

from spendledger.api.auth import Caller
from spendledger.api.errors import ApiError
from spendledger.api.jsonio import json_response
from spendledger.api.metrics import observe_usage
from spendledger.api.request_body import RequestHead
from spendledger.api.services import Services
from spendledger.api.upstream import UpstreamFailure
from spendledger.api.usage_block import CompletionDetails, PromptDetails, Usage, estimate_tokens
from spendledger.ledger.config import Deployment
from spendledger.ledger.connections import DATABASE_ERRORS
from spendledger.ledger.events import Route, UsageRecorded, UsageStatus
from spendledger.ledger.money import format_money
from spendledger.ledger.pricing import Price, charge
from spendledger.ledger.scopes import Scopes
from spendledger.ledger.tickets import Ticket
from spendledger.ledger.tokens import TokenUsage

# Re-exported: the usage block lives in api/usage_block.py (api/anthropic/ reads it without importing
# this module, which imports the upstream); importers of these names from here keep working.
__all__ = ["CompletionDetails", "PromptDetails", "Usage", "estimate_tokens"]

log = structlog.get_logger(__name__)

UPSTREAM_PATHS: Final[dict[Route, str]] = {
    "chat.completions": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
}


class _UsageOnly(msgspec.Struct):
    usage: Usage | None = None


_usage_decoder: Final = msgspec.json.Decoder(_UsageOnly)


_warned_unpriced: set[tuple[str, str]] = set()


def _warn_unpriced_once(deployment_id: str, model: str, kind: str) -> None:
    """A kind of token used with no price of its own: one warning per deployment and kind (each
    request is counted by `spendledger_unpriced_token_kinds_total`, and named in its event)."""
    if (deployment_id, kind) not in _warned_unpriced:
        _warned_unpriced.add((deployment_id, kind))
        log.warning(
            "token_kind_unpriced", deployment_id=deployment_id, model=model, kind=kind,
            detail="billed at the plain token's price: set its price in model_info",
        )  # fmt: skip


class Exchange:
    """One proxied request: who asked, what for, where it goes, and how to bill it. What admission
    took for it is its `Ticket` (ledger/tickets.py), which the functions below are handed."""

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
        # Every line logged while this request is served names it (api/logging.py).
        structlog.contextvars.bind_contextvars(call_id=self.call_id)
        self.route: Route = route
        self.caller = caller
        self.head = head
        self.deployment = deployment
        self.price = price
        self.scopes = Scopes(caller.key_hash, caller.user_id, caller.team_id, customer_id)
        self.started_at = datetime.now(UTC)
        self._started = time.perf_counter()
        self._upstream_began: float | None = None
        self._upstream_s: float | None = None

    def upstream_began(self) -> None:
        self._upstream_began = time.perf_counter()

    def upstream_ended(self) -> None:
        """The provider is done (its answer read, or its stream's last byte)."""
        if self._upstream_began is not None and self._upstream_s is None:
            self._upstream_s = time.perf_counter() - self._upstream_began

    def timings(self) -> tuple[float, float]:
        """(the request's time so far, the provider's part of it), seconds."""
        self.upstream_ended()
        return time.perf_counter() - self._started, self._upstream_s or 0.0

    def usage_event(
        self,
        ticket: Ticket,
        *,
        status: UsageStatus,
        http_status: int,
        usage: Usage | None = None,
        estimated: bool = False,
        error_type: str | None = None,
    ) -> UsageRecorded:
        tokens = usage.tokens() if usage else TokenUsage()
        cost = charge(self.price, tokens)
        for kind in cost.unpriced_kinds:
            _warn_unpriced_once(self.deployment.deployment_id, self.head.model, kind)
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
            **tokens.counts(),
            usage_estimated=estimated,
            input_cost_per_token=cost.input_cost_per_token,
            output_cost_per_token=cost.output_cost_per_token,
            unit_prices=cost.unit_prices,
            costs=cost.costs,
            unpriced_kinds=cost.unpriced_kinds,
            cost=cost.total,
            priced=cost.priced,
            started_at=self.started_at,
            ended_at=datetime.now(UTC),
            budget_periods=ticket.budget_periods,
            hold=ticket.hold,
        )

    def headers(
        self, ticket: Ticket, event: UsageRecorded | None = None, key_spend: Decimal | None = None
    ) -> dict[str, str]:
        headers = {
            "x-litellm-call-id": self.call_id,
            "x-litellm-model-id": self.deployment.deployment_id,
            "x-litellm-model-group": self.head.model,
        }
        admitted = ticket.admitted  # the rate limits' room (leases are granted only without them)
        if admitted.remaining_requests is not None:
            headers["x-ratelimit-remaining-requests"] = str(admitted.remaining_requests)
        if admitted.remaining_tokens is not None:
            headers["x-ratelimit-remaining-tokens"] = str(max(0, admitted.remaining_tokens))
        if event is not None:
            headers["x-litellm-response-cost"] = format_money(event.cost)
        if key_spend is not None:
            headers["x-litellm-key-spend"] = format_money(key_spend)
        return headers


async def record(exchange: Exchange, ticket: Ticket, event: UsageRecorded) -> Decimal | None:
    """Settle the request with its terminal event (the key's new spend once committed); if the
    ledger cannot commit it, withhold the response."""
    try:
        spend = await ticket.settle(event)
    except DATABASE_ERRORS as exc:
        log.error("usage_not_recorded", call_id=exchange.call_id, error_type=type(exc).__name__)
        raise ApiError(
            503,
            "The usage of this request could not be recorded, so its response is withheld",
            "ledger_unavailable",
            headers=exchange.headers(ticket),
        ) from None
    observe_usage(event, *exchange.timings())
    return spend


async def record_failure(exchange: Exchange, ticket: Ticket, failure: UpstreamFailure) -> ApiError:
    event = exchange.usage_event(
        ticket, status="failure", http_status=failure.status, error_type=failure.error_type
    )
    await record(exchange, ticket, event)
    return ApiError(failure.status, failure.message, failure.error_type, headers=exchange.headers(ticket, event))


async def upstream_error_response(exchange: Exchange, ticket: Ticket, response: httpx.Response) -> Response[Any]:
    """A provider's own error: 4xx pass through (the caller's request was at fault), else 502."""
    body = await response.aread()
    status = response.status_code
    if status in (401, 403) or status >= 500:
        message = f"{exchange.deployment.model_name}: upstream answered {status}"
        failure = UpstreamFailure(502, "upstream_error", message)
        raise await record_failure(exchange, ticket, failure)
    event = exchange.usage_event(ticket, status="failure", http_status=status, error_type="upstream_client_error")
    await record(exchange, ticket, event)
    error = provider_error(body, exchange.deployment)
    return json_response({"error": error}, status, exchange.headers(ticket, event))


class _ProviderError(msgspec.Struct):
    message: str = ""
    type: str | None = "invalid_request_error"  # Azure sends null
    param: str | None = None
    code: str | int | None = None
    # Azure's content filter verdict (`content_filter_result` per category), under either spelling.
    innererror: msgspec.Raw = msgspec.Raw(b"")  # (msgspec takes no `Raw | None`)
    inner_error: msgspec.Raw = msgspec.Raw(b"")


class _ProviderErrorBody(msgspec.Struct):
    error: _ProviderError


# Google's OpenAI-compatible endpoint sends its error envelope inside a one-element list.
_provider_error_decoder: Final = msgspec.json.Decoder(_ProviderErrorBody | list[_ProviderErrorBody])
_MAX_ERROR_TEXT: Final = 500
_MAX_INNER_ERROR: Final = 4096


class ProviderError(msgspec.Struct, frozen=True, omit_defaults=True):
    """The OpenAI error envelope's four fields, in its order; and, as LiteLLM passes an Azure content
    filter refusal on, its `innererror` under `provider_specific_fields`."""

    message: str
    type: str
    param: str | None
    code: str | None
    provider_specific_fields: dict[str, msgspec.Raw] | None = None


def provider_error(body: bytes, deployment: Deployment) -> ProviderError:
    """A provider's 4xx, rebuilt from its envelope's four fields only (nothing else it sent is
    passed on but Azure's content filter verdict), each cut to a bounded length, and with the
    deployment's own credentials blanked out: a provider that echoes request headers must not show
    the caller our key."""
    inner = b""
    try:
        decoded = _provider_error_decoder.decode(body)
        if isinstance(decoded, list) and not decoded:
            raise msgspec.DecodeError("an empty list")
        error = (decoded[0] if isinstance(decoded, list) else decoded).error
        message, type_, param = error.message, error.type, error.param
        code = None if error.code is None else str(error.code)
        inner = bytes(error.innererror) or bytes(error.inner_error)
    except msgspec.DecodeError:
        message, type_, param, code = body.decode(errors="replace"), "invalid_request_error", None, None
    secrets = [s for s in (deployment.api_key, deployment.azure_ad_token) if s]

    def clean(text: str) -> str:
        for secret in secrets:
            text = text.replace(secret, "[redacted]")
        return text

    cleaned = [None if text is None else clean(text)[:_MAX_ERROR_TEXT] for text in (message, type_, code, param)]
    specific = None
    if inner.startswith(b"{") and len(inner) <= _MAX_INNER_ERROR and not any(s.encode() in inner for s in secrets):
        specific = {"innererror": msgspec.Raw(inner)}
    return ProviderError(
        message=cleaned[0] or "the provider refused the request",
        type=cleaned[1] or "invalid_request_error",
        code=cleaned[2],
        param=cleaned[3],
        provider_specific_fields=specific,
    )


async def forward(services: Services, exchange: Exchange, ticket: Ticket, body: bytes) -> Response[Any]:
    path = UPSTREAM_PATHS[exchange.route]
    exchange.upstream_began()
    try:
        response = await services.upstream.send(exchange.deployment, path, body, stream=False)
    except UpstreamFailure as failure:
        raise await record_failure(exchange, ticket, failure) from None
    exchange.upstream_ended()
    if response.status_code != 200:
        return await upstream_error_response(exchange, ticket, response)
    content = response.content
    try:
        usage = _usage_decoder.decode(content).usage
    except msgspec.DecodeError:
        raise await record_failure(
            exchange,
            ticket,
            UpstreamFailure(
                502,
                "upstream_error",
                f"{exchange.deployment.model_name}: upstream answered with invalid JSON",
            ),
        ) from None
    estimated = usage is None
    if usage is None:
        usage = Usage(prompt_tokens=estimate_tokens(len(body)), completion_tokens=estimate_tokens(len(content)))
    event = exchange.usage_event(ticket, status="success", http_status=200, usage=usage, estimated=estimated)
    key_spend = await record(exchange, ticket, event)
    return Response(
        content=content,
        status_code=200,
        media_type="application/json",
        headers=exchange.headers(ticket, event, key_spend),
    )
