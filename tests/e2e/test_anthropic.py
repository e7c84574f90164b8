"""Anthropic deployments (`anthropic/<model>`) through a real `spendledger serve`, against the fake
Messages API (tests/fakes/anthropic.py): the `openai` SDK and LangChain, streaming and not, a system
prompt, a tool call and its result, an image, prompt caching, the default `max_tokens` and the hold
that covers it; each request translated, sent with the key as `x-api-key`, and billed exactly at
the catalogue's Claude prices, cache reads and writes at theirs (issue 10). Failures:
tests/e2e/test_anthropic_failures.py."""

from __future__ import annotations

import base64
import json
from decimal import Decimal
from typing import Any

import openai
import pytest
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI

from spendledger.api.anthropic.wire import ANTHROPIC_VERSION, DEFAULT_MAX_TOKENS
from tests.e2e import anthropic_support as support
from tests.e2e.anthropic_support import (
    KEY,
    MODEL,
    OUTPUT,
    SMALL_OUTPUT,
    cost,
    customer,
    sent_prompt_tokens,
    usage_event,
)
from tests.e2e.conftest import MASTER_KEY
from tests.e2e.enforcement_support import customer_info
from tests.fakes.anthropic import RunningAnthropic
from tests.fakes.upstream import REPLY_WORDS, count_tokens, reply_for
from tests.support import RunningServer

anthropic, server, client, _reset = support.anthropic, support.server, support.client, support._reset

SYSTEM = "You are a terse bookkeeper."
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "explain double-entry bookkeeping"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The forecast for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}  # fmt: skip
# A 1x1 transparent PNG.
PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d49444154789c6360000002"
    "00000500010d0a2db40000000049454e44ae426082"
)).decode()  # fmt: skip


def test_a_chat_completion_is_translated_sent_with_the_key_and_billed(
    server: RunningServer, anthropic: RunningAnthropic, client: openai.OpenAI
) -> None:
    cust = customer()
    raw = client.chat.completions.with_raw_response.create(model="claude-haiku", messages=MESSAGES, user=cust)
    completion = raw.parse()
    assert completion.choices[0].message.content == reply_for()
    assert completion.choices[0].finish_reason == "stop"
    (sent,) = anthropic.app.requests
    assert sent.path == "/v1/messages"
    assert (sent.headers["x-api-key"], sent.headers["anthropic-version"]) == (KEY, ANTHROPIC_VERSION)
    assert "authorization" not in sent.headers  # the caller's key never goes upstream
    body = sent.json
    assert (body["model"], body["max_tokens"]) == (MODEL, DEFAULT_MAX_TOKENS)  # the client sent none
    assert body["system"] == [{"type": "text", "text": SYSTEM}]
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": MESSAGES[1]["content"]}]}]
    assert body["metadata"] == {"user_id": cust}
    prompt = sent_prompt_tokens(body)
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (prompt, REPLY_WORDS)
    expected = cost(prompt, REPLY_WORDS)
    assert Decimal(raw.headers["x-litellm-response-cost"]) == expected
    assert raw.headers["llm_provider-request-id"].startswith("req_")  # Anthropic's request id, passed on
    assert customer_info(server.base_url, cust)["spend"] == expected
    event = usage_event(server, raw.headers["x-litellm-call-id"])
    assert (event["status"], event["provider"], event["upstream_model"], event["cost"]) == (
        "success", "anthropic", MODEL, expected,
    )  # fmt: skip
    assert event["usage_estimated"] is False and event["priced"] is True
    # The hold covered the most the translation let Anthropic generate.
    assert event["hold"] >= DEFAULT_MAX_TOKENS * OUTPUT


def test_the_default_max_tokens_never_exceeds_the_models_output_limit(
    server: RunningServer, anthropic: RunningAnthropic, client: openai.OpenAI
) -> None:
    raw = client.chat.completions.with_raw_response.create(model="claude-small", messages=MESSAGES, user=customer())
    assert anthropic.app.requests[-1].path == "/v1/messages"  # an api_base ending in /v1
    assert anthropic.app.requests[-1].json["max_tokens"] == SMALL_OUTPUT
    assert usage_event(server, raw.headers["x-litellm-call-id"])["hold"] >= SMALL_OUTPUT * OUTPUT
    client.chat.completions.create(model="claude-haiku", messages=MESSAGES, max_tokens=5)
    assert anthropic.app.requests[-1].json["max_tokens"] == 5


@pytest.mark.parametrize("asks_usage", [True, False], ids=["include_usage", "without"])
def test_a_stream_is_translated_and_billed_exactly(
    server: RunningServer, anthropic: RunningAnthropic, client: openai.OpenAI, asks_usage: bool
) -> None:
    cust = customer()
    options: dict[str, Any] = {"stream_options": {"include_usage": True}} if asks_usage else {}
    with client.chat.completions.with_streaming_response.create(
        model="claude-haiku", messages=MESSAGES, user=cust, stream=True, **options,
    ) as response:  # fmt: skip
        call_id = response.headers["x-litellm-call-id"]
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = list(response.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply_for()
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert anthropic.app.requests[-1].json["stream"] is True
    prompt = sent_prompt_tokens(anthropic.app.requests[-1].json)
    with_usage = [c for c in chunks if c.usage is not None]
    if asks_usage:  # the usage chunk last, with no choices, as OpenAI sends it
        assert with_usage == [chunks[-1]] and not chunks[-1].choices
        assert chunks[-1].usage is not None
        assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (prompt, REPLY_WORDS)
    else:
        assert with_usage == []  # hidden from a client that did not ask
    event = usage_event(server, call_id)
    assert (event["status"], event["stream"], event["usage_estimated"]) == ("success", True, False)
    assert (event["input_tokens"], event["output_tokens"]) == (prompt, REPLY_WORDS)
    assert customer_info(server.base_url, cust)["spend"] == cost(prompt, REPLY_WORDS)


@pytest.mark.parametrize("stream", [False, True], ids=["answer", "stream"])
def test_a_tool_call_and_its_result_round_trip(
    server: RunningServer, anthropic: RunningAnthropic, client: openai.OpenAI, stream: bool
) -> None:
    cust = customer()
    anthropic.app.use_tools = True
    question = [{"role": "user", "content": "what is the weather in Paris?"}]
    if stream:
        chunks = list(client.chat.completions.create(
            model="claude-haiku", messages=question, tools=[WEATHER], user=cust, stream=True,
        ))  # fmt: skip
        deltas = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or ()]
        call_id, name = deltas[0].id, deltas[0].function.name
        arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
        finish = next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
    else:
        first = client.chat.completions.create(model="claude-haiku", messages=question, tools=[WEATHER], user=cust)
        (call,) = first.choices[0].message.tool_calls or []
        call_id, name, arguments = call.id, call.function.name, call.function.arguments
        finish = first.choices[0].finish_reason
    assert (name, json.loads(arguments), finish) == ("get_weather", {"city": "Paris"}, "tool_calls")
    sent_first = anthropic.app.requests[-1].json
    assert sent_first["tools"][0]["name"] == "get_weather"
    assert sent_first["tools"][0]["input_schema"] == WEATHER["function"]["parameters"]
    conversation = [
        *question,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "light rain, 18 degrees"},
    ]  # fmt: skip
    second = client.chat.completions.create(model="claude-haiku", messages=conversation, tools=[WEATHER], user=cust)
    assert second.choices[0].message.content == reply_for()
    sent = anthropic.app.requests[-1].json["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    tool_use = sent[1]["content"][-1]
    assert (tool_use["type"], tool_use["id"], tool_use["input"]) == ("tool_use", call_id, {"city": "Paris"})
    assert sent[2]["content"][0]["type"] == "tool_result" and sent[2]["content"][0]["tool_use_id"] == call_id
    # Both legs billed exactly: the tool call's output is the fake's count of its name, input and text.
    compact_input = json.dumps({"city": "Paris"}, separators=(",", ":"))  # as Anthropic's JSON is counted
    call_output = count_tokens(f"I will call {name}.") + count_tokens(name) + count_tokens(compact_input)
    first_cost = cost(sent_prompt_tokens(sent_first), call_output)
    second_cost = cost(sent_prompt_tokens(anthropic.app.requests[-1].json), REPLY_WORDS)
    assert customer_info(server.base_url, cust)["spend"] == first_cost + second_cost


def test_an_image_part_is_sent_as_an_image_block(
    server: RunningServer, anthropic: RunningAnthropic, client: openai.OpenAI
) -> None:
    cust = customer()
    content = [{"type": "text", "text": "what is in this picture?"},
               {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]  # fmt: skip
    completion = client.chat.completions.create(
        model="claude-haiku", messages=[{"role": "user", "content": content}], user=cust
    )
    assert completion.choices[0].message.content == reply_for()
    sent = anthropic.app.requests[-1].json
    image = sent["messages"][0]["content"][1]
    assert image == {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    assert completion.usage is not None and completion.usage.prompt_tokens == sent_prompt_tokens(sent)
    assert customer_info(server.base_url, cust)["spend"] == cost(sent_prompt_tokens(sent), REPLY_WORDS)


def test_prompt_cache_writes_and_reads_are_priced_as_the_catalogue_prices_them(
    server: RunningServer, anthropic: RunningAnthropic, client: openai.OpenAI
) -> None:
    anthropic.app.min_cache_tokens = 5
    cust = customer()
    manual = "Every debit has a matching credit in another account. " * 4
    messages: list[Any] = [
        {"role": "system", "content": [{"type": "text", "text": manual, "cache_control": {"type": "ephemeral"}}]},
        {"role": "user", "content": "what is a ledger?"},
    ]
    first = client.chat.completions.with_raw_response.create(model="claude-haiku", messages=messages, user=cust)
    prompt = sent_prompt_tokens(anthropic.app.requests[-1].json)
    cached = count_tokens(manual)  # the system prompt, up to its cache breakpoint
    usage = first.parse().usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert (usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens) == (prompt, 0)
    assert usage.model_extra is not None and usage.model_extra["cache_creation_input_tokens"] == cached
    written = usage_event(server, first.headers["x-litellm-call-id"])
    assert (written["cache_creation_input_tokens"], written["cached_input_tokens"]) == (cached, 0)
    assert written["cost"] == cost(prompt, REPLY_WORDS, write=cached)
    assert written["costs"]["cache_write"] == cached * support.CACHE_WRITE
    # Read back, streamed: message_start's cache counts and message_delta's output are merged.
    with client.chat.completions.with_streaming_response.create(
        model="claude-haiku", messages=messages, user=cust, stream=True
    ) as response:
        call_id = response.headers["x-litellm-call-id"]
        list(response.parse())
    read = usage_event(server, call_id)
    assert (read["cache_creation_input_tokens"], read["cached_input_tokens"], read["input_tokens"]) == (0, cached, prompt)
    assert read["cost"] == cost(prompt, REPLY_WORDS, read=cached)
    assert read["costs"]["cache_read"] == cached * support.CACHE_READ
    assert customer_info(server.base_url, cust)["spend"] == written["cost"] + read["cost"]


@pytest.mark.parametrize("streaming", [False, True], ids=["invoke", "stream"])
def test_langchain_chat_openai_on_anthropic_is_billed_exactly(
    server: RunningServer, anthropic: RunningAnthropic, streaming: bool
) -> None:
    cust = customer()
    chat = ChatOpenAI(
        base_url=server.base_url, api_key=MASTER_KEY, model="claude-haiku", extra_body={"user": cust},
        max_retries=0, streaming=streaming, stream_usage=True, temperature=0.2,
    )  # fmt: skip
    answer = chat.invoke([SystemMessage(content=SYSTEM), HumanMessage(content="what is a journal entry?")])
    assert answer.content == reply_for()
    sent = anthropic.app.requests[-1].json
    assert (sent["temperature"], sent["system"][0]["text"]) == (0.2, SYSTEM)
    prompt = sent_prompt_tokens(sent)
    assert answer.usage_metadata is not None
    assert answer.usage_metadata["input_tokens"] == prompt
    assert customer_info(server.base_url, cust)["spend"] == cost(prompt, REPLY_WORDS)
