"""OpenAI chat requests → Anthropic Messages requests (api/anthropic/request.py, messages.py);
each translated request is also checked against the fake's copy of Anthropic's rules."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from spendledger.api.anthropic.request import to_messages_request
from spendledger.api.anthropic.wire import DEFAULT_MAX_TOKENS, messages_url, request_headers
from spendledger.api.errors import ApiError
from tests.fakes.anthropic_rules import check_request

MODEL = "claude-sonnet-4-5"
PIXEL = "iVBORw0KGgo="
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def translate(**request: Any) -> dict[str, Any]:
    request.setdefault("model", "claude-group")
    body = msgspec.json.decode(to_messages_request(msgspec.json.encode(request), MODEL))
    check_request(body)  # what Anthropic would take
    assert isinstance(body, dict)
    return body


def refused(**request: Any) -> ApiError:
    request.setdefault("model", "claude-group")
    request.setdefault("messages", [{"role": "user", "content": "hi"}])
    with pytest.raises(ApiError) as caught:
        to_messages_request(msgspec.json.encode(request), MODEL)
    assert caught.value.status == 400
    assert caught.value.type == "invalid_request_error"
    return caught.value


def test_plain_chat_gets_the_default_max_tokens_and_the_upstream_model() -> None:
    body = translate(messages=[{"role": "user", "content": "Hello"}])
    assert body == {
        "model": MODEL,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
        "max_tokens": DEFAULT_MAX_TOKENS,
    }
    assert DEFAULT_MAX_TOKENS == 4096  # LiteLLM's DEFAULT_ANTHROPIC_CHAT_MAX_TOKENS


def test_max_completion_tokens_wins_over_max_tokens_and_a_default_can_be_given() -> None:
    messages = [{"role": "user", "content": "Hello"}]
    assert translate(messages=messages, max_tokens=50)["max_tokens"] == 50
    assert translate(messages=messages, max_tokens=50, max_completion_tokens=70)["max_tokens"] == 70
    raw = to_messages_request(msgspec.json.encode({"model": "m", "messages": messages}), MODEL, default_max_tokens=1000)
    assert msgspec.json.decode(raw)["max_tokens"] == 1000


def test_system_and_developer_messages_become_the_system_prompt_wherever_they_stand() -> None:
    body = translate(messages=[
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
        {"role": "assistant", "content": "Salut"},
        {"role": "user", "content": "Encore"},
    ])  # fmt: skip
    assert body["system"] == [{"type": "text", "text": "You are terse."}, {"type": "text", "text": "Answer in French."}]
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]


def test_consecutive_messages_of_one_role_are_merged_and_empty_ones_dropped() -> None:
    body = translate(messages=[
        {"role": "user", "content": "one"},
        {"role": "user", "content": ""},
        {"role": "user", "content": [{"type": "text", "text": "two"}]},
        {"role": "assistant", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "three"},
    ])  # fmt: skip
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "user", "content": [{"type": "text", "text": "three"}]},
    ]


def test_images_by_data_url_and_by_http_url() -> None:
    content = [
        {"type": "text", "text": "What is in these?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}", "detail": "high"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]
    body = translate(messages=[{"role": "user", "content": content}])
    assert body["messages"][0]["content"][1:] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXEL}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


def test_a_pdf_file_part_becomes_a_document() -> None:
    part = {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"}}
    body = translate(messages=[{"role": "user", "content": [part, {"type": "text", "text": "Summarise"}]}])
    assert body["messages"][0]["content"][0] == {
        "type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="},
    }  # fmt: skip


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": "data:image/tiff;base64,AAAA"}},
        {"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "file", "file": {"file_id": "file-abc"}},
    ],
)
def test_parts_anthropic_cannot_take_are_refused(part: dict[str, Any]) -> None:
    error = refused(messages=[{"role": "user", "content": [part]}])
    assert error.param == "messages" and "messages[0]" in error.message


def test_tools_tool_calls_and_tool_results() -> None:
    body = translate(
        messages=[
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
                {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}},
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "rainy"}]},
            {"role": "user", "content": "Thanks"},
        ],
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
    )  # fmt: skip
    assert body["tools"] == [{
        "name": "get_weather", "description": "The weather in a city",
        "input_schema": WEATHER_TOOL["function"]["parameters"],  # type: ignore[index]
    }]  # fmt: skip
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert body["messages"][1]["content"] == [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Rome"}},
    ]
    assert body["messages"][2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "call_1", "content": [{"type": "text", "text": "sunny"}]},
        {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "rainy"}]},
        {"type": "text", "text": "Thanks"},
    ]}  # fmt: skip


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"type": "auto"}),
        ("none", {"type": "none"}),
        ({"type": "function", "function": {"name": "get_weather"}}, {"type": "tool", "name": "get_weather"}),
    ],
)
def test_tool_choice(choice: Any, expected: dict[str, Any]) -> None:
    body = translate(messages=[{"role": "user", "content": "hi"}], tools=[WEATHER_TOOL], tool_choice=choice)
    assert body["tool_choice"] == expected


def test_a_tool_without_parameters_gets_an_empty_object_schema() -> None:
    body = translate(messages=[{"role": "user", "content": "hi"}], tools=[{"type": "function", "function": {"name": "now"}}])
    assert body["tools"] == [{"name": "now", "input_schema": {"type": "object", "properties": {}}}]


def test_tool_calls_without_tools_are_refused_as_litellm_refuses_them() -> None:
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "ok"},
    ]
    assert refused(messages=messages).param == "tools"


def test_parameters_stop_temperature_top_p_user_stream() -> None:
    body = translate(
        messages=[{"role": "user", "content": "hi"}], stop="END", temperature=0.5, top_p=0.9, top_k=5,
        user="customer-7", stream=True, stream_options={"include_usage": True}, n=1, store=False,
        metadata={"tag": "x"},
    )  # fmt: skip
    assert body["stop_sequences"] == ["END"]
    assert (body["temperature"], body["top_p"], body["top_k"]) == (0.5, 0.9, 5)
    assert body["metadata"] == {"user_id": "customer-7"}
    assert body["stream"] is True
    assert "stream_options" not in body and "n" not in body and "store" not in body


def test_an_email_as_user_is_not_sent_as_the_user_id() -> None:
    assert "metadata" not in translate(messages=[{"role": "user", "content": "hi"}], user="a@b.example")


def test_reasoning_effort_becomes_a_thinking_budget() -> None:
    body = translate(messages=[{"role": "user", "content": "hi"}], reasoning_effort="low", max_tokens=2000)
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 1024}


def test_cache_control_markers_pass_through() -> None:
    marker = {"type": "ephemeral"}
    body = translate(messages=[
        {"role": "system", "content": [{"type": "text", "text": "Long manual", "cache_control": marker}]},
        {"role": "user", "content": "Question", "cache_control": marker},
    ])  # fmt: skip
    assert body["system"] == [{"type": "text", "text": "Long manual", "cache_control": marker}]
    assert body["messages"][0]["content"] == [{"type": "text", "text": "Question", "cache_control": marker}]


def test_a_final_assistant_prefill_loses_its_trailing_whitespace() -> None:
    body = translate(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure: "}])
    assert body["messages"][-1] == {"role": "assistant", "content": [{"type": "text", "text": "Sure:"}]}


@pytest.mark.parametrize(
    ("request_fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"logprobs": True}, "logprobs"),
        ({"seed": 1}, "seed"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"stop": ["\n"]}, "stop"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"some_unknown_field": 1}, "some_unknown_field"),
        ({"tool_choice": "sometimes", "tools": [WEATHER_TOOL]}, "tool_choice"),
    ],
)
def test_what_cannot_be_translated_is_a_400_naming_it(request_fields: dict[str, Any], param: str) -> None:
    error = refused(**request_fields)
    assert error.param == param
    assert param in error.message


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "only a system prompt"}],
        [{"role": "assistant", "content": "I speak first"}, {"role": "user", "content": "hi"}],
        [{"role": "user", "content": "hi"}, {"role": "function", "name": "f", "content": "x"}],
        [{"role": "user", "content": "hi"}, {"role": "tool", "content": "no id"}],
        [{"role": "user", "content": "hi"},
         {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}],
    ],
)  # fmt: skip
def test_conversations_anthropic_cannot_take_are_refused(messages: list[dict[str, Any]]) -> None:
    assert refused(messages=messages, tools=[WEATHER_TOOL]).param in ("messages", "tools")


def test_neutral_values_of_refused_parameters_are_accepted() -> None:
    body = translate(
        messages=[{"role": "user", "content": "hi"}], n=1, frequency_penalty=0, presence_penalty=0.0,
        logprobs=False, response_format={"type": "text"},
    )  # fmt: skip
    assert set(body) == {"model", "messages", "max_tokens"}


def test_malformed_bodies_are_400s() -> None:
    with pytest.raises(ApiError) as caught:
        to_messages_request(b"{not json", MODEL)
    assert caught.value.status == 400
    with pytest.raises(ApiError) as caught:
        to_messages_request(b'{"model": "m", "messages": "hi"}', MODEL)
    assert caught.value.param == "messages"


@pytest.mark.parametrize(
    ("base", "url"),
    [
        ("https://api.anthropic.com", "https://api.anthropic.com/v1/messages"),
        ("https://api.anthropic.com/", "https://api.anthropic.com/v1/messages"),
        ("https://gw.example/anthropic/v1", "https://gw.example/anthropic/v1/messages"),
        ("https://gw.example/v1/messages", "https://gw.example/v1/messages"),
    ],
)
def test_messages_url(base: str, url: str) -> None:
    assert messages_url(base) == url


def test_request_headers_carry_the_key_as_x_api_key_and_the_version() -> None:
    headers = request_headers("sk-ant-secret")
    assert headers["x-api-key"] == "sk-ant-secret"
    assert headers["anthropic-version"] == "2023-06-01"
    assert headers["content-type"] == "application/json"
    assert "authorization" not in headers


def test_tool_call_ids_anthropic_would_refuse_are_rewritten_alike_in_call_and_result() -> None:
    call = {"id": "call:1.a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}
    body = translate(
        messages=[
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call:1.a", "content": "snow"},
        ],
        tools=[WEATHER_TOOL],
    )
    assert body["messages"][1]["content"][0]["id"] == "call_1_a"
    assert body["messages"][2]["content"][0]["tool_use_id"] == "call_1_a"
