"""Checks that the fake upstream speaks OpenAI's wire format and counts tokens predictably."""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import pytest

from tests.fakes.upstream import (
    REPLY_WORDS,
    FakeUpstream,
    RunningUpstream,
    count_tokens,
    embedding_for,
    prompt_tokens_for_messages,
    reply_for,
    run_fake_upstream,
)

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": [{"type": "text", "text": "Say hello to"}, {"type": "text", "text": "me"}]},
]


@pytest.fixture(scope="module")
def upstream() -> Iterator[RunningUpstream]:
    with run_fake_upstream() as running:
        yield running


@pytest.fixture
def client(upstream: RunningUpstream) -> Iterator[httpx.Client]:
    upstream.app.reset()
    with httpx.Client(base_url=upstream.base_url, timeout=5) as c:
        yield c


def _sse_events(text: str) -> list[str]:
    assert text.endswith("\n\n")
    frames = text.split("\n\n")[:-1]
    assert all(f.startswith("data: ") for f in frames)
    return [f.removeprefix("data: ") for f in frames]


def test_token_helpers() -> None:
    assert count_tokens("") == 0
    assert count_tokens("   ") == 1
    assert count_tokens("a  b\nc") == 3
    assert prompt_tokens_for_messages(MESSAGES) == (3 + 3) + (4 + 3) + 3
    assert reply_for(MESSAGES, None) == "This is a fake reply from the test upstream word word word"
    assert reply_for(MESSAGES, 4) == "This is a fake"
    assert reply_for(MESSAGES, 50) == reply_for(MESSAGES, None)


def test_chat_non_streaming_usage(client: httpx.Client) -> None:
    resp = client.post("/chat/completions", json={"model": "gpt-4o-mini", "messages": MESSAGES})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "gpt-4o-mini"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == reply_for(MESSAGES, None)
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["prompt_tokens"] == prompt_tokens_for_messages(MESSAGES) == 16
    assert usage["completion_tokens"] == REPLY_WORDS
    assert usage["total_tokens"] == 16 + REPLY_WORDS


def test_unprefixed_path_and_max_tokens_truncation(upstream: RunningUpstream, client: httpx.Client) -> None:
    for limit_key in ("max_tokens", "max_completion_tokens"):
        resp = httpx.post(
            f"{upstream.root_url}/chat/completions", json={"model": "m", "messages": MESSAGES, limit_key: 5}
        )
        body = resp.json()
        assert body["choices"][0]["message"]["content"] == "This is a fake reply"
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 5


def _stream(client: httpx.Client, **extra: Any) -> tuple[httpx.Response, list[str]]:
    payload = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True, **extra}
    with client.stream("POST", "/chat/completions", json=payload) as resp:
        text = resp.read().decode()
    return resp, _sse_events(text)


def test_streaming_without_usage(client: httpx.Client) -> None:
    resp, events = _stream(client)
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    chunks = [msgspec.json.decode(e) for e in events[:-1]]
    assert len(chunks) == REPLY_WORDS + 1
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == reply_for(MESSAGES, None)
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}


def test_streaming_with_include_usage(client: httpx.Client) -> None:
    _, events = _stream(client, stream_options={"include_usage": True}, max_tokens=3)
    assert events[-1] == "[DONE]"
    chunks = [msgspec.json.decode(e) for e in events[:-1]]
    *content, final, usage_chunk = chunks
    assert len(content) == 3
    assert all(c["usage"] is None for c in [*content, final])
    assert final["choices"][0]["finish_reason"] == "length"
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["prompt_tokens"] == prompt_tokens_for_messages(MESSAGES)
    assert usage_chunk["usage"]["completion_tokens"] == 3
    assert usage_chunk["usage"]["total_tokens"] == prompt_tokens_for_messages(MESSAGES) + 3


def test_chunk_delay(client: httpx.Client, upstream: RunningUpstream) -> None:
    upstream.app.chunk_delay_s = 0.02
    started = time.monotonic()
    _, events = _stream(client)
    assert time.monotonic() - started >= 0.02 * REPLY_WORDS
    assert events[-1] == "[DONE]"


def test_completions(client: httpx.Client) -> None:
    payload = {"model": "gpt-3.5-turbo-instruct", "prompt": ["one two", "three"]}
    resp = client.post("/completions", json=payload)
    body = resp.json()
    assert body["object"] == "text_completion"
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["text"] == reply_for(None, None)
    assert body["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2 * REPLY_WORDS,
        "total_tokens": 3 + 2 * REPLY_WORDS,
    }


def test_embeddings(client: httpx.Client) -> None:
    resp = client.post("/embeddings", json={"model": "text-embedding-3-small", "input": ["hello world", "x"]})
    body = resp.json()
    assert body["object"] == "list"
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == 8 for d in body["data"])
    assert body["data"][0]["embedding"] == embedding_for("hello world")
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    b64 = client.post("/embeddings", json={"model": "m", "input": "hello world", "encoding_format": "base64"})
    vector = struct.unpack("<8f", base64.b64decode(b64.json()["data"][0]["embedding"]))
    assert vector == pytest.approx(embedding_for("hello world"), abs=1e-6)


def test_models_and_unknown_path(client: httpx.Client) -> None:
    models = client.get("/models").json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
    resp = client.post("/nope", json={})
    assert resp.status_code == 404
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("status", [400, 429, 500])
def test_fail_status(client: httpx.Client, upstream: RunningUpstream, status: int) -> None:
    upstream.app.fail_status = status
    resp = client.post("/chat/completions", json={"model": "m", "messages": MESSAGES})
    assert resp.status_code == status
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == {400: "invalid_request_error", 429: "requests", 500: "server_error"}[status]
    upstream.app.reset()
    assert client.post("/chat/completions", json={"model": "m", "messages": MESSAGES}).status_code == 200


def test_required_api_key(client: httpx.Client, upstream: RunningUpstream) -> None:
    upstream.app.required_api_key = "sk-good"
    payload = {"model": "m", "messages": MESSAGES}
    for headers in ({}, {"Authorization": "Bearer sk-bad"}):
        resp = client.post("/chat/completions", json=payload, headers=headers)
        assert resp.status_code == 401
        assert resp.json()["error"]["type"] == "invalid_request_error"
        assert resp.json()["error"]["code"] == "invalid_api_key"
    ok = client.post("/chat/completions", json=payload, headers={"Authorization": "Bearer sk-good"})
    assert ok.status_code == 200


def test_delay_triggers_client_timeout(client: httpx.Client, upstream: RunningUpstream) -> None:
    upstream.app.delay_s = 0.5
    with pytest.raises(httpx.ReadTimeout):
        client.post("/chat/completions", json={"model": "m", "messages": MESSAGES}, timeout=0.1)


def test_recorded_requests(client: httpx.Client, upstream: RunningUpstream) -> None:
    payload = {"model": "m", "messages": MESSAGES, "user": "u-1"}
    client.post("/chat/completions", json=payload, headers={"Authorization": "Bearer k", "X-Custom": "v"})
    client.post("/embeddings", content=b"not json", headers={"content-type": "application/json"})
    first, second = upstream.app.requests
    assert (first.method, first.path) == ("POST", "/v1/chat/completions")
    assert first.headers["authorization"] == "Bearer k" and first.headers["x-custom"] == "v"
    assert first.json == payload and msgspec.json.decode(first.body) == payload
    assert second.json is None and second.body == b"not json"
    upstream.app.reset()
    assert upstream.app.requests == []


def test_separate_app_instance() -> None:
    app = FakeUpstream()
    with run_fake_upstream(app) as running:
        assert running.app is app
        assert httpx.get(f"{running.base_url}/models").status_code == 200
    assert len(app.requests) == 1
