"""Anthropic Messages answers → OpenAI chat.completion (api/anthropic/response.py), and the usage
they bill: cache reads and writes priced apart, as issue 10 defines."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import msgspec
import pytest

from spendledger.api.anthropic.response import to_openai_response
from spendledger.ledger.pricing import Price, charge
from spendledger.ledger.tokens import TokenUsage


def answer(content: list[dict[str, Any]], stop_reason: str = "end_turn", **usage: int) -> bytes:
    return msgspec.json.encode({
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant",
        "model": "claude-sonnet-4-5-20250929", "content": content, "stop_reason": stop_reason,
        "stop_sequence": None, "usage": usage or {"input_tokens": 12, "output_tokens": 6},
    })  # fmt: skip


def translate(body: bytes, model: str | None = None) -> dict[str, Any]:
    out, _ = to_openai_response(body, model)
    decoded = msgspec.json.decode(out)
    assert isinstance(decoded, dict)
    return decoded


def test_text_answer() -> None:
    body = translate(answer([{"type": "text", "text": "Hello!"}]))
    assert body["id"] == "msg_01XFDUDYJgAACzvnptvVoYEL"
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "claude-sonnet-4-5-20250929"
    assert body["choices"] == [{
        "index": 0, "message": {"role": "assistant", "content": "Hello!", "refusal": None},
        "logprobs": None, "finish_reason": "stop",
    }]  # fmt: skip
    assert body["usage"]["prompt_tokens"] == 12
    assert body["usage"]["completion_tokens"] == 6
    assert body["usage"]["total_tokens"] == 18


def test_the_model_named_can_be_the_callers() -> None:
    assert translate(answer([{"type": "text", "text": "x"}]), "my-claude")["model"] == "my-claude"


def test_tool_use_becomes_tool_calls() -> None:
    content = [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "Paris", "days": 2}},
        {"type": "tool_use", "id": "toolu_01B", "name": "now", "input": {}},
    ]
    message = translate(answer(content, "tool_use"))["choices"][0]
    assert message["finish_reason"] == "tool_calls"
    assert message["message"]["content"] == "Let me look."
    calls = message["message"]["tool_calls"]
    assert [(c["id"], c["type"], c["function"]["name"]) for c in calls] == [
        ("toolu_01A", "function", "get_weather"), ("toolu_01B", "function", "now"),
    ]  # fmt: skip
    assert msgspec.json.decode(calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 2}
    assert calls[1]["function"]["arguments"] == "{}"


def test_only_tool_use_leaves_content_null() -> None:
    message = translate(answer([{"type": "tool_use", "id": "t", "name": "f", "input": {}}], "tool_use"))
    assert message["choices"][0]["message"]["content"] is None


def test_thinking_becomes_reasoning_content() -> None:
    content = [{"type": "thinking", "thinking": "Let me think.", "signature": "sig"}, {"type": "text", "text": "42"}]
    message = translate(answer(content))["choices"][0]["message"]
    assert message["reasoning_content"] == "Let me think."
    assert message["content"] == "42"


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
     ("refusal", "content_filter"), ("pause_turn", "stop"), ("something_new", "stop")],
)  # fmt: skip
def test_stop_reasons(stop_reason: str, finish: str) -> None:
    assert translate(answer([{"type": "text", "text": "x"}], stop_reason))["choices"][0]["finish_reason"] == finish


def test_cache_usage_is_openais_shape_with_anthropics_counts_kept() -> None:
    raw = answer([{"type": "text", "text": "x"}], input_tokens=50, cache_read_input_tokens=2000,
                 cache_creation_input_tokens=1000, output_tokens=40)  # fmt: skip
    out, usage = to_openai_response(raw)
    assert msgspec.json.decode(out)["usage"] == {
        "prompt_tokens": 3050, "completion_tokens": 40, "total_tokens": 3090,
        "prompt_tokens_details": {"cached_tokens": 2000, "cache_creation_tokens": 1000},
        "cache_creation_input_tokens": 1000, "cache_read_input_tokens": 2000,
    }  # fmt: skip
    assert usage is not None
    assert usage.tokens() == TokenUsage(
        input_tokens=3050, output_tokens=40, cached_input_tokens=2000, cache_creation_input_tokens=1000
    )


def test_cache_reads_and_writes_are_priced_apart() -> None:
    raw = answer([{"type": "text", "text": "x"}], input_tokens=100, cache_read_input_tokens=1000,
                 cache_creation_input_tokens=200, output_tokens=10)  # fmt: skip
    _, usage = to_openai_response(raw)
    assert usage is not None
    price = Price(
        input_cost_per_token=Decimal("0.000003"), output_cost_per_token=Decimal("0.000015"),
        kinds={"cache_read": Decimal("0.0000003"), "cache_write": Decimal("0.00000375")}, source="config",
    )  # fmt: skip
    cost = charge(price, usage.tokens())
    expected = 100 * Decimal("0.000003") + 1000 * Decimal("0.0000003") + 200 * Decimal("0.00000375") + 10 * Decimal("0.000015")
    assert cost.total == expected


def test_an_answer_without_usage_gives_none_for_the_caller_to_estimate() -> None:
    raw = msgspec.json.encode({"id": "m", "type": "message", "model": "c", "content": [{"type": "text", "text": "x"}],
                               "stop_reason": "end_turn"})  # fmt: skip
    out, usage = to_openai_response(raw)
    assert usage is None
    assert "usage" not in msgspec.json.decode(out)


@pytest.mark.parametrize("body", [b"not json", b'{"content": "text"}', b'{"usage": {"input_tokens": -1}}'])
def test_a_body_that_is_not_a_messages_answer_raises_decode_error(body: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        to_openai_response(body)
