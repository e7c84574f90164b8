"""Checks that the fake Anthropic Messages API speaks Anthropic's wire format (paths, headers,
validation, answers, SSE events, prompt caching, failures on demand), and that what the
translators (api/anthropic/) send it is taken and what it answers translates back."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import pytest

from spendledger.api.anthropic.errors import to_openai_error
from spendledger.api.anthropic.request import to_messages_request
from spendledger.api.anthropic.response import to_openai_response
from spendledger.api.anthropic.stream import StreamTranslator
from spendledger.api.anthropic.wire import messages_url, request_headers
from tests.fakes.anthropic import FakeAnthropic, RunningAnthropic, run_fake_anthropic
from tests.fakes.anthropic_rules import MESSAGE_OVERHEAD
from tests.fakes.upstream import REPLY_WORDS, count_tokens, reply_for

KEY = "sk-ant-test"
WEATHER = {"name": "get_weather", "description": "Weather", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}  # fmt: skip


@pytest.fixture(scope="module")
def anthropic() -> Iterator[RunningAnthropic]:
    with run_fake_anthropic() as running:
        yield running


@pytest.fixture
def client(anthropic: RunningAnthropic) -> Iterator[httpx.Client]:
    anthropic.app.reset()
    with httpx.Client(timeout=5) as c:
        yield c


def post(client: httpx.Client, anthropic: RunningAnthropic, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    url = messages_url(anthropic.base_url)
    return client.post(url, content=msgspec.json.encode(body), headers=request_headers(KEY) if headers is None else headers)


def request(text: str = "Hello there", **fields: Any) -> dict[str, Any]:
    return {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": text}], **fields}


def sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for frame in text.split("\n\n")[:-1]:
        name_line, data_line = frame.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        data = msgspec.json.decode(data_line[6:])
        assert data["type"] == name_line[7:]
        events.append((name_line[7:], data))
    return events


def test_answer_shape_headers_and_usage(client: httpx.Client, anthropic: RunningAnthropic) -> None:
    response = post(client, anthropic, request(system="Be brief."))
    assert response.status_code == 200
    assert response.headers["request-id"].startswith("req_")
    assert "anthropic-ratelimit-requests-remaining" in response.headers
    body = response.json()
    assert body["id"].startswith("msg_") and body["type"] == "message" and body["role"] == "assistant"
    assert body["content"] == [{"type": "text", "text": reply_for(None, 100)}]
    assert (body["stop_reason"], body["stop_sequence"]) == ("end_turn", None)
    usage = body["usage"]
    assert usage["input_tokens"] == count_tokens("Be brief.") + count_tokens("Hello there") + MESSAGE_OVERHEAD
    assert usage["output_tokens"] == REPLY_WORDS
    assert (usage["cache_read_input_tokens"], usage["cache_creation_input_tokens"]) == (0, 0)
    recorded = anthropic.app.requests[-1]
    assert (recorded.path, recorded.headers["x-api-key"], recorded.headers["anthropic-version"]) == (
        "/v1/messages", KEY, "2023-06-01",
    )  # fmt: skip


def test_max_tokens_and_stop_sequences_end_the_reply(client: httpx.Client, anthropic: RunningAnthropic) -> None:
    short = post(client, anthropic, request(max_tokens=3)).json()
    assert (short["content"][0]["text"], short["stop_reason"], short["usage"]["output_tokens"]) == ("This is a", "max_tokens", 3)
    stopped = post(client, anthropic, request(stop_sequences=["fake"])).json()
    assert (stopped["content"][0]["text"], stopped["stop_reason"], stopped["stop_sequence"]) == ("This is a ", "stop_sequence", "fake")


@pytest.mark.parametrize(
    ("headers", "status", "type_"),
    [
        ({"anthropic-version": "2023-06-01", "content-type": "application/json"}, 401, "authentication_error"),
        ({"x-api-key": KEY, "content-type": "application/json"}, 400, "invalid_request_error"),
        ({"x-api-key": KEY, "anthropic-version": "1999-01-01"}, 400, "invalid_request_error"),
        ({"authorization": f"Bearer {KEY}", "anthropic-version": "2023-06-01"}, 401, "authentication_error"),
    ],
)
def test_headers_are_required(
    client: httpx.Client, anthropic: RunningAnthropic, headers: dict[str, str], status: int, type_: str
) -> None:
    response = post(client, anthropic, request(), headers)
    assert response.status_code == status
    assert response.json()["type"] == "error" and response.json()["error"]["type"] == type_


def test_a_wrong_key_is_refused_when_one_is_required(client: httpx.Client, anthropic: RunningAnthropic) -> None:
    anthropic.app.required_api_key = "sk-ant-other"
    assert post(client, anthropic, request()).status_code == 401


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_tokens": None}, "max_tokens: Field required"),
        ({"messages": [{"role": "assistant", "content": "Hi"}]}, 'first message must use the "user" role'),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "roles must alternate"),
        ({"messages": [{"role": "system", "content": "a"}]}, "Input should be 'user' or 'assistant'"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}]}, "must be non-empty"),
        ({"temperature": 1.5}, "temperature"),
        ({"n": 2}, "n: Extra inputs are not permitted"),
        ({"messages": [{"role": "user", "content": "q"},
                       {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}]},
                       {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t2", "content": "x"}]}],
          "tools": [WEATHER]}, "unexpected `tool_use_id`"),
        ({"messages": [{"role": "user", "content": "q"},
                       {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}]},
                       {"role": "user", "content": "never answered"}],
          "tools": [WEATHER]}, "without `tool_result` blocks"),
        ({"messages": [{"role": "user", "content": "q"},
                       {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}]},
                       {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1"}]}]},
         "must define tools"),
    ],
)  # fmt: skip
def test_requests_anthropic_refuses_are_400s(
    client: httpx.Client, anthropic: RunningAnthropic, change: dict[str, Any], message: str
) -> None:
    body = {k: v for k, v in {**request(), **change}.items() if v is not None}
    response = post(client, anthropic, body)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert message in response.json()["error"]["message"]


def test_tool_use_answer_and_its_result(client: httpx.Client, anthropic: RunningAnthropic) -> None:
    forced = post(client, anthropic, request(tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"})).json()
    assert forced["stop_reason"] == "tool_use"
    (call,) = forced["content"]
    assert call["type"] == "tool_use" and call["name"] == "get_weather" and call["input"] == {"city": "Paris"}
    answered = request(tools=[WEATHER])
    answered["messages"] += [
        {"role": "assistant", "content": forced["content"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "sunny"}]},
    ]
    final = post(client, anthropic, answered).json()
    assert final["stop_reason"] == "end_turn" and final["content"][0]["type"] == "text"


def test_prompt_caching_writes_then_reads(client: httpx.Client, anthropic: RunningAnthropic) -> None:
    anthropic.app.min_cache_tokens = 5
    manual = "word " * 20
    body = request(system=[{"type": "text", "text": manual, "cache_control": {"type": "ephemeral"}}])
    first = post(client, anthropic, body).json()["usage"]
    second = post(client, anthropic, body).json()["usage"]
    assert (first["cache_creation_input_tokens"], first["cache_read_input_tokens"]) == (20, 0)
    assert (second["cache_creation_input_tokens"], second["cache_read_input_tokens"]) == (0, 20)
    assert first["input_tokens"] == second["input_tokens"] == count_tokens("Hello there") + MESSAGE_OVERHEAD
    anthropic.app.min_cache_tokens = 1024  # a prefix shorter than the model's minimum is not cached
    anthropic.app.cached_prefixes.clear()
    assert post(client, anthropic, body).json()["usage"]["cache_creation_input_tokens"] == 0


def test_the_stream_sends_anthropics_events(client: httpx.Client, anthropic: RunningAnthropic) -> None:
    response = post(client, anthropic, request(stream=True, tools=[WEATHER], tool_choice={"type": "any"}))
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse(response.text)
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-2:] == ["message_delta", "message_stop"]
    deltas = [data["delta"] for name, data in events if name == "content_block_delta"]
    assert deltas[0] == {"type": "input_json_delta", "partial_json": ""}
    assert msgspec.json.decode("".join(d["partial_json"] for d in deltas)) == {"city": "Paris"}
    assert events[0][1]["message"]["usage"]["output_tokens"] == 1
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_failures_on_demand(client: httpx.Client, anthropic: RunningAnthropic) -> None:
    anthropic.app.fail_status, anthropic.app.fail_times, anthropic.app.retry_after_s = 429, 1, 7
    limited = post(client, anthropic, request())
    assert (limited.status_code, limited.headers["retry-after"]) == (429, "7")
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert post(client, anthropic, request()).status_code == 200  # only the next one failed
    anthropic.app.fail_status, anthropic.app.fail_times = 529, None
    overloaded = post(client, anthropic, request())
    assert (overloaded.status_code, overloaded.json()["error"]["type"]) == (529, "overloaded_error")
    anthropic.app.fail_status = 500
    assert post(client, anthropic, request()).json()["error"]["type"] == "api_error"


def test_a_stream_fails_midway_or_is_cut(client: httpx.Client, anthropic: RunningAnthropic) -> None:
    anthropic.app.stream_error_after = 2
    names = [name for name, _ in sse(post(client, anthropic, request(stream=True)).text)]
    assert names.count("content_block_delta") == 2 and names[-1] == "error"
    anthropic.app.stream_error_after, anthropic.app.cut_stream_after = None, 3
    names = [name for name, _ in sse(post(client, anthropic, request(stream=True)).text)]
    assert names.count("content_block_delta") == 3 and "message_stop" not in names


# --- the translators against the fake ---

OPENAI_CHAT = {
    "model": "claude-group",
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the weather in Paris?"},
    ],
    "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER["input_schema"]}}],
}


def test_a_translated_request_and_its_answer_round_trip(client: httpx.Client, anthropic: RunningAnthropic) -> None:
    anthropic.app.use_tools = True
    translated = to_messages_request(msgspec.json.encode(OPENAI_CHAT), "claude-sonnet-4-5")
    response = client.post(messages_url(anthropic.base_url), content=translated, headers=request_headers(KEY))
    assert response.status_code == 200
    body, usage = to_openai_response(response.content)
    choice = msgspec.json.decode(body)["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    # the assistant's call and the tool's answer go back, and Anthropic takes them
    follow_up = {**OPENAI_CHAT, "messages": [*OPENAI_CHAT["messages"], choice["message"],
                                              {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}]}  # fmt: skip
    again = client.post(messages_url(anthropic.base_url), headers=request_headers(KEY),
                        content=to_messages_request(msgspec.json.encode(follow_up), "claude-sonnet-4-5"))  # fmt: skip
    assert again.status_code == 200, again.text
    assert usage is not None and usage.tokens().input_tokens == response.json()["usage"]["input_tokens"]


def test_a_translated_stream_carries_the_same_usage_as_the_answer(client: httpx.Client, anthropic: RunningAnthropic) -> None:
    plain = to_messages_request(msgspec.json.encode(OPENAI_CHAT), "claude-sonnet-4-5")
    streamed = to_messages_request(msgspec.json.encode({**OPENAI_CHAT, "stream": True}), "claude-sonnet-4-5")
    _, answer_usage = to_openai_response(client.post(messages_url(anthropic.base_url), content=plain, headers=request_headers(KEY)).content)
    translator = StreamTranslator()
    with client.stream("POST", messages_url(anthropic.base_url), content=streamed, headers=request_headers(KEY)) as response:
        out = b"".join(translator.feed(data) for data in response.iter_bytes())
    assert translator.finished and out.endswith(b"data: [DONE]\n\n")
    assert translator.usage == answer_usage
    assert reply_for(None, None).split()[1].encode() in out


def test_a_failure_translates_to_the_openai_envelope(client: httpx.Client, anthropic: RunningAnthropic) -> None:
    anthropic.app.fail_status = 529
    response = post(client, anthropic, request())
    error = to_openai_error(response.status_code, response.content, secret=KEY)
    assert (error.status, error.type, error.retryable) == (500, "overloaded_error", True)


def test_reset_clears_controls_and_cache(anthropic: RunningAnthropic) -> None:
    app = FakeAnthropic(fail_status=500, use_tools=True)
    app.cached_prefixes.add(b"x")
    requests = app.requests
    app.reset()
    assert app.fail_status is None and not app.use_tools and not app.cached_prefixes and app.requests is requests
