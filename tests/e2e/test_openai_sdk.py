"""The official `openai` SDK against a real `spendledger serve`: what a LiteLLM user's code sees."""

from __future__ import annotations

import asyncio
import json
import uuid
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import INPUT_PRICE, MASTER_KEY, OUTPUT_PRICE
from tests.fakes.upstream import (
    REPLY_WORDS,
    RunningUpstream,
    count_tokens,
    embedding_for,
    prompt_tokens_for_messages,
    reply_for,
)
from tests.support import RunningServer

AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
UPSTREAM_KEY = "upstream-secret-key"
# genai-prices: openai text-embedding-3-small is $0.02 per million input tokens.
EMBEDDING_PRICE = Decimal("0.00000002")


def customer() -> str:
    return f"sdk-{uuid.uuid4().hex[:10]}"


def cost(input_tokens: int, output_tokens: int) -> Decimal:
    return input_tokens * Decimal(INPUT_PRICE) + output_tokens * Decimal(OUTPUT_PRICE)


def spend_of(server: RunningServer, end_user_id: str) -> Decimal:
    info = httpx.get(f"{server.base_url}/customer/info", params={"end_user_id": end_user_id}, headers=AUTH)
    assert info.status_code == 200, info.text
    spend = json.loads(info.text, parse_float=Decimal)["spend"]
    return Decimal(spend)


def messages_for(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(api_key=MASTER_KEY, base_url=server.base_url, max_retries=0, timeout=30)


def test_sync_chat_completion_content_usage_and_exact_cost_header(
    server: RunningServer, client: openai.OpenAI
) -> None:
    cust = customer()
    messages = messages_for("this is a test request, write a short poem")
    raw = client.chat.completions.with_raw_response.create(
        model="fake-openai-endpoint", messages=messages, user=cust
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == reply_for(messages)
    assert completion.choices[0].message.role == "assistant"
    assert completion.usage is not None
    prompt_tokens = prompt_tokens_for_messages(messages)
    assert completion.usage.prompt_tokens == prompt_tokens
    assert completion.usage.completion_tokens == REPLY_WORDS
    assert completion.usage.total_tokens == prompt_tokens + REPLY_WORDS

    expected = cost(prompt_tokens, REPLY_WORDS)
    header = raw.headers["x-litellm-response-cost"]
    assert Decimal(header) == expected, header
    assert "e" not in header.lower(), header  # a plain decimal, never scientific or float noise
    assert raw.headers["x-litellm-call-id"]
    assert raw.headers["x-litellm-model-group"] == "fake-openai-endpoint"
    assert spend_of(server, cust) == expected


async def test_async_client_chat_completions(server: RunningServer) -> None:
    cust = customer()
    client = openai.AsyncOpenAI(api_key=MASTER_KEY, base_url=server.base_url, max_retries=0, timeout=30)
    texts = [f"async request number {i} " + "pad " * i for i in range(5)]
    try:
        raws = await asyncio.gather(
            *(
                client.chat.completions.with_raw_response.create(
                    model="fake-openai-endpoint", messages=messages_for(text), user=cust
                )
                for text in texts
            )
        )
    finally:
        await client.close()
    total = Decimal(0)
    for text, raw in zip(texts, raws, strict=True):
        completion = raw.parse()
        prompt_tokens = prompt_tokens_for_messages(messages_for(text))
        assert completion.choices[0].message.content == reply_for()
        assert completion.usage is not None
        assert completion.usage.prompt_tokens == prompt_tokens
        assert completion.usage.completion_tokens == REPLY_WORDS
        assert Decimal(raw.headers["x-litellm-response-cost"]) == cost(prompt_tokens, REPLY_WORDS)
        total += cost(prompt_tokens, REPLY_WORDS)
    assert len({raw.headers["x-litellm-call-id"] for raw in raws}) == len(texts)
    async with httpx.AsyncClient(base_url=server.base_url, headers=AUTH) as http:
        info = await http.get("/customer/info", params={"end_user_id": cust})
    assert info.status_code == 200, info.text
    assert json.loads(info.text, parse_float=Decimal)["spend"] == total


def test_stream_with_include_usage_ends_with_the_usage_chunk(
    server: RunningServer, client: openai.OpenAI, upstream: RunningUpstream
) -> None:
    cust = customer()
    messages = messages_for("stream me a short poem please")
    stream = client.chat.completions.create(
        model="fake-openai-endpoint",
        messages=messages,
        user=cust,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len(chunks) >= 3
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == reply_for(messages)
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    prompt_tokens = prompt_tokens_for_messages(messages)
    assert last.usage.prompt_tokens == prompt_tokens
    assert last.usage.completion_tokens == REPLY_WORDS
    assert all(c.usage is None for c in chunks[:-1])
    assert upstream.app.requests[-1].json["stream_options"] == {"include_usage": True}
    assert spend_of(server, cust) == cost(prompt_tokens, REPLY_WORDS)


def test_stream_without_include_usage_hides_usage_but_bills_it(
    server: RunningServer, client: openai.OpenAI, upstream: RunningUpstream
) -> None:
    cust = customer()
    first = messages_for("hello there")
    client.chat.completions.create(model="fake-openai-endpoint", messages=first, user=cust)
    before = spend_of(server, cust)
    assert before == cost(prompt_tokens_for_messages(first), REPLY_WORDS)

    messages = messages_for("a streamed request that did not ask for usage")
    stream = client.chat.completions.create(
        model="fake-openai-endpoint", messages=messages, user=cust, stream=True
    )
    chunks = list(stream)
    assert chunks, "no chunks streamed"
    assert all(c.usage is None for c in chunks), "the usage chunk leaked to a client that did not ask"
    assert all(c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply_for(messages)

    forwarded = upstream.app.requests[-1]
    assert forwarded.json["stream"] is True
    assert forwarded.json["stream_options"] == {"include_usage": True}
    after = spend_of(server, cust)
    assert after - before == cost(prompt_tokens_for_messages(messages), REPLY_WORDS)


def test_embeddings(server: RunningServer, client: openai.OpenAI, upstream: RunningUpstream) -> None:
    cust = customer()
    inputs = ["hello world", "the quick brown fox jumps"]
    raw = client.embeddings.with_raw_response.create(model="text-embedding-3-small", input=inputs, user=cust)
    result = raw.parse()
    assert [d.index for d in result.data] == [0, 1]
    for text, item in zip(inputs, result.data, strict=True):
        assert item.embedding == pytest.approx(embedding_for(text), abs=1e-6)
    tokens = sum(count_tokens(t) for t in inputs)
    assert result.usage.prompt_tokens == tokens
    assert upstream.app.requests[-1].path == "/v1/embeddings"
    assert upstream.app.requests[-1].json["input"] == inputs
    # An embedding model has an input price only; it must still be billed, not recorded as unpriced.
    expected = tokens * EMBEDDING_PRICE
    assert Decimal(raw.headers["x-litellm-response-cost"]) == expected
    assert spend_of(server, cust) == expected


def test_legacy_completions(server: RunningServer, client: openai.OpenAI, upstream: RunningUpstream) -> None:
    cust = customer()
    prompt = "Say this is a test"
    raw = client.completions.with_raw_response.create(
        model="fake-openai-endpoint", prompt=prompt, max_tokens=5, user=cust
    )
    completion = raw.parse()
    assert completion.choices[0].text == reply_for(None, 5)
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == count_tokens(prompt)
    assert completion.usage.completion_tokens == 5
    forwarded = upstream.app.requests[-1]
    assert forwarded.path == "/v1/completions"
    assert forwarded.json["model"] == "fake"
    assert forwarded.json["max_tokens"] == 5
    expected = cost(count_tokens(prompt), 5)
    assert Decimal(raw.headers["x-litellm-response-cost"]) == expected
    assert spend_of(server, cust) == expected


def test_models_list_shows_the_config_model_groups(server: RunningServer, client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]
    assert ids == ["fake-openai-endpoint", "gpt-3.5-turbo", "text-embedding-3-small", "mock-model"]

    generated = httpx.post(
        f"{server.base_url}/key/generate", headers=AUTH, json={"models": ["gpt-3.5-turbo"]}
    )
    assert generated.status_code == 200, generated.text
    limited = openai.OpenAI(api_key=generated.json()["key"], base_url=server.base_url, max_retries=0)
    assert [model.id for model in limited.models.list()] == ["gpt-3.5-turbo"]


def test_upstream_gets_the_deployment_key_and_model_never_the_callers(
    server: RunningServer, upstream: RunningUpstream
) -> None:
    generated = httpx.post(f"{server.base_url}/key/generate", headers=AUTH, json={"key_alias": "sdk-caller"})
    assert generated.status_code == 200, generated.text
    caller_key = generated.json()["key"]
    upstream.app.required_api_key = UPSTREAM_KEY  # the fake answers 401 to any other key
    caller = openai.OpenAI(api_key=caller_key, base_url=server.base_url, max_retries=0)
    cust = customer()
    messages = messages_for("who am I talking to")
    completion = caller.chat.completions.create(
        model="fake-openai-endpoint", messages=messages, user=cust, temperature=0.25
    )
    assert completion.choices[0].message.content == reply_for(messages)

    forwarded = upstream.app.requests[-1]
    assert forwarded.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert forwarded.json["model"] == "fake"  # openai/fake → "fake"
    assert forwarded.json["temperature"] == 0.25 and forwarded.json["user"] == cust
    assert forwarded.json["messages"] == messages
    for secret in (caller_key, MASTER_KEY):
        assert all(secret not in value for value in forwarded.headers.values())
        assert secret.encode() not in forwarded.body

    caller.chat.completions.create(model="gpt-3.5-turbo", messages=messages, user=cust)
    forwarded = upstream.app.requests[-1]
    assert forwarded.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert forwarded.json["model"] == "gpt-3.5-turbo"
