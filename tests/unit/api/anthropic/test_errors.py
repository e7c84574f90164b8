"""Anthropic errors → the OpenAI envelope with LiteLLM's statuses (api/anthropic/errors.py)."""

from __future__ import annotations

import msgspec
import pytest

from spendledger.api.anthropic.errors import from_stream_event, to_openai_error


def anthropic_error(type_: str, message: str) -> bytes:
    return msgspec.json.encode({"type": "error", "error": {"type": type_, "message": message}, "request_id": "req_1"})


@pytest.mark.parametrize(
    ("status", "type_", "message", "openai_status", "code", "retryable"),
    [
        (400, "invalid_request_error", "max_tokens: Field required", 400, "400", False),
        (401, "authentication_error", "invalid x-api-key", 401, "401", False),
        (403, "permission_error", "Your API key does not have permission", 403, "403", False),
        (404, "not_found_error", "model: claude-9", 404, "404", False),
        (413, "request_too_large", "Request exceeds the maximum allowed number of bytes", 400, "400", False),
        (429, "rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit", 429, "429", True),
        (500, "api_error", "Internal server error", 500, "500", True),
        (529, "overloaded_error", "Overloaded", 500, "500", True),
        (400, "invalid_request_error", "prompt is too long: 215000 tokens > 200000 maximum", 400,
         "context_length_exceeded", False),
        (400, "invalid_request_error", "Output blocked by content filtering policy", 400, "content_policy_violation", False),
    ],
)  # fmt: skip
def test_statuses_and_types_as_litellm_maps_them(
    status: int, type_: str, message: str, openai_status: int, code: str, retryable: bool
) -> None:
    error = to_openai_error(status, anthropic_error(type_, message))
    assert error.status == openai_status
    assert error.retryable is retryable
    assert (error.upstream_status, error.upstream_type) == (status, type_)
    assert msgspec.json.decode(error.envelope()) == {
        "error": {"message": f"AnthropicException - {message}", "type": type_, "param": None, "code": code}
    }


def test_a_body_that_is_not_anthropics_envelope_keeps_its_text_and_the_status_type() -> None:
    error = to_openai_error(502, b"<html>Bad Gateway</html>")
    assert (error.status, error.type, error.code) == (502, "api_error", "502")
    assert error.message == "AnthropicException - <html>Bad Gateway</html>"
    assert error.retryable
    empty = to_openai_error(503, b"")
    assert empty.message == "AnthropicException - Anthropic answered 503"


def test_the_key_is_blanked_and_the_message_bounded() -> None:
    body = anthropic_error("authentication_error", "invalid x-api-key sk-ant-secret " + "x" * 2000)
    error = to_openai_error(401, body, secret="sk-ant-secret")
    assert "sk-ant-secret" not in error.envelope().decode()
    assert "[redacted]" in error.message
    assert len(error.message) < 600


def test_a_streams_error_event_takes_its_types_status() -> None:
    assert from_stream_event("rate_limit_error", "slow down").status == 429
    assert from_stream_event("overloaded_error", "Overloaded").upstream_status == 529
    assert from_stream_event("something_new", "?").status == 500
