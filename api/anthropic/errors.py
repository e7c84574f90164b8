"""Anthropic's errors → the OpenAI envelope, with the status LiteLLM answers with.

Anthropic answers `{"type": "error", "error": {"type": ..., "message": ...}}` with 400, 401, 403,
404, 413, 429, 500 or 529 (overloaded), and sends the same object as an `error` event in the middle
of a stream. LiteLLM (`exception_mapping_utils._map_anthropic_exception`) reads the text first — a
prompt too long is a context-window error, `overloaded_error` an internal server error — then the
status: 413 is a 400, 529 a 500, the rest keep theirs. Here the envelope's `type` is Anthropic's
own error type, its `code` LiteLLM's status (or OpenAI's name for the two errors clients look for:
`context_length_exceeded`, `content_policy_violation`); the message says it came from Anthropic.
"""

from __future__ import annotations

from typing import Final

import msgspec

# Anthropic's error types and the status each comes with (also for a stream's error event).
ERROR_STATUSES: Final = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
_STATUS_TYPES: Final = {status: type_ for type_, status in ERROR_STATUSES.items()}
# What LiteLLM answers for Anthropic's statuses that it does not pass through as they are.
_LITELLM_STATUS: Final = {413: 400, 529: 500}
# Worth another attempt (Anthropic's own SDK retries these): the router's concern, said here.
RETRYABLE_STATUSES: Final = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
_MAX_MESSAGE: Final = 500


class _Detail(msgspec.Struct, frozen=True):
    type: str = "api_error"
    message: str = ""


class _ErrorBody(msgspec.Struct, frozen=True):
    error: _Detail


_decoder: Final = msgspec.json.Decoder(_ErrorBody)
_encoder: Final = msgspec.json.Encoder()


class _Envelope(msgspec.Struct, frozen=True):
    message: str
    type: str
    param: str | None
    code: str


class _EnvelopeBody(msgspec.Struct, frozen=True):
    error: _Envelope


class OpenAIError(msgspec.Struct, frozen=True, kw_only=True):
    """An Anthropic error as the gateway answers it: `status` and the envelope's fields; what
    Anthropic said (`upstream_status`, `upstream_type`) for logs, retries and the usage event."""

    status: int
    message: str
    type: str
    code: str
    param: str | None = None
    upstream_status: int
    upstream_type: str

    @property
    def retryable(self) -> bool:
        return self.upstream_status in RETRYABLE_STATUSES

    def envelope(self) -> bytes:
        return envelope(self.message, self.type, self.code, self.param)


def envelope(message: str, type_: str, code: str, param: str | None = None) -> bytes:
    """`{"error": {message, type, param, code}}`, as every error of the gateway's."""
    return _encoder.encode(_EnvelopeBody(_Envelope(message, type_, param, code)))


def to_openai_error(status: int, body: bytes, *, secret: str | None = None) -> OpenAIError:
    """The OpenAI error for Anthropic's answer `status` with `body`; `secret` (the deployment's
    key) is blanked out of the message, should Anthropic ever quote it."""
    try:
        detail = _decoder.decode(body).error
        type_, message = detail.type, detail.message
    except msgspec.DecodeError:  # not Anthropic's envelope: a proxy's or a load balancer's page
        type_, message = _STATUS_TYPES.get(status, "api_error"), body.decode(errors="replace").strip()
    return _mapped(status, type_, message, secret)


def from_stream_event(type_: str, message: str, *, secret: str | None = None) -> OpenAIError:
    """The OpenAI error for a stream's `error` event (its status is that of its type)."""
    return _mapped(ERROR_STATUSES.get(type_, 500), type_, message, secret)


def _mapped(status: int, type_: str, message: str, secret: str | None) -> OpenAIError:
    if secret:
        message = message.replace(secret, "[redacted]")
    message = message[:_MAX_MESSAGE] or f"Anthropic answered {status}"
    lowered = message.lower()
    mapped, code = _LITELLM_STATUS.get(status, status), None
    if "prompt is too long" in lowered or "prompt: length" in lowered:
        mapped, code = 400, "context_length_exceeded"
    elif type_ == "overloaded_error" or "overloaded" in lowered:
        mapped = 500
    elif "content filtering policy" in lowered:
        mapped, code = 400, "content_policy_violation"
    return OpenAIError(
        status=mapped,
        message=f"AnthropicException - {message}",
        type=type_[:100],
        code=code or str(mapped),
        upstream_status=status,
        upstream_type=type_[:100],
    )
