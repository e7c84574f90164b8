"""A non-streaming request through the router (api/attempts.py), billed and answered (streams:
api/streaming.py); and the answer when no call succeeded, which both share: the gateway's own
failure, or the provider's error (its 4xx passed on in a cleaned envelope)."""

from __future__ import annotations

from typing import Any, Final

import msgspec
from litestar import Response

from spendledger.api.attempts import BodyFor, Failed, Router
from spendledger.api.jsonio import json_response
from spendledger.api.proxy import (
    Exchange,
    Usage,
    answer_usage,
    estimate_tokens,
    record,
    record_failure,
)
from spendledger.api.services import Services
from spendledger.api.upstream import UpstreamFailure
from spendledger.ledger.config import Deployment
from spendledger.ledger.tickets import Ticket


async def failed_response(exchange: Exchange, ticket: Ticket, failed: Failed) -> Response[Any]:
    """Record the request as failed (at the cost of what the providers billed, 0 as a rule) and
    answer the last call's error; raises the gateway's own failures as ApiError."""
    if failed.failure is not None:
        error = await record_failure(exchange, ticket, failed.failure)
        if failed.retry_after is not None:
            error.headers["retry-after"] = str(failed.retry_after)
        raise error
    return await upstream_error_response(exchange, ticket, failed.status, failed.body)


async def forward(services: Services, exchange: Exchange, ticket: Ticket, body_for: BodyFor) -> Response[Any]:
    outcome = await Router(services, exchange, body_for, stream=False).call()
    if isinstance(outcome, Failed):
        return await failed_response(exchange, ticket, outcome)
    exchange.upstream_ended()
    content = outcome.response.content
    try:
        usage = answer_usage(content)
    except msgspec.DecodeError:
        message = f"{exchange.deployment.model_name}: upstream answered with invalid JSON"
        raise await record_failure(exchange, ticket, UpstreamFailure(502, "upstream_error", message)) from None
    estimated = usage is None
    if usage is None:
        usage = Usage(prompt_tokens=estimate_tokens(len(body_for(outcome.deployment))), completion_tokens=estimate_tokens(len(content)))
    event = exchange.usage_event(ticket, status="success", http_status=200, usage=usage, estimated=estimated)
    key_spend = await record(exchange, ticket, event)
    return Response(
        content=content,
        status_code=200,
        media_type="application/json",
        headers=exchange.headers(ticket, event, key_spend),
    )


async def upstream_error_response(exchange: Exchange, ticket: Ticket, status: int, body: bytes) -> Response[Any]:
    """A provider's own error: 4xx pass through (the caller's request was at fault), else 502."""
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
