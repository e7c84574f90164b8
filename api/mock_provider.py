"""The built-in `mock/<name>` provider: an offline, deterministic OpenAI-compatible upstream.

It is an httpx transport, so mock deployments go through exactly the same forwarding, streaming
and accounting code as real ones. Token counts are real counts of the text it saw and wrote
(whitespace-separated words), so the demo's bills are meaningful.
"""

from __future__ import annotations

import time
import uuid
import zlib
from collections.abc import AsyncIterator
from typing import Any, Final

import httpx
import msgspec

REPLY: Final = "This is a mock response from spendledger. It answered without calling any provider."
_json: Final = msgspec.json.Encoder()


def count_tokens(text: str) -> int:
    return len(text.split())


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _prompt_tokens(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    if isinstance(messages, list):
        return (
            sum(count_tokens(_content_text(m.get("content"))) + 3 for m in messages if isinstance(m, dict))
            + 3
        )
    prompt = body.get("prompt", body.get("input", ""))
    items = prompt if isinstance(prompt, list) else [prompt]
    return sum(_item_tokens(item) for item in items)


def _item_tokens(item: Any) -> int:
    """One prompt or embedding input: a text (its words), a list of token ids (one each), or a
    single token id. Embedding inputs reach the provider unchecked: anything else counts as one."""
    if isinstance(item, str):
        return count_tokens(item)
    if isinstance(item, list):
        return len(item)
    return 1


def _reply(body: dict[str, Any]) -> tuple[list[str], str]:
    words = REPLY.split()
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and 0 < limit < len(words):
        return words[:limit], "length"
    return words, "stop"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chat(body: dict[str, Any], model: str) -> dict[str, Any]:
    words, finish = _reply(body)
    return {
        "id": f"chatcmpl-mock-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": " ".join(words)},
                "finish_reason": finish,
            }
        ],
        "usage": _usage(_prompt_tokens(body), len(words)),
    }


def _completion(body: dict[str, Any], model: str) -> dict[str, Any]:
    words, finish = _reply(body)
    return {
        "id": f"cmpl-mock-{uuid.uuid4().hex[:12]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": " ".join(words), "finish_reason": finish, "logprobs": None}],
        "usage": _usage(_prompt_tokens(body), len(words)),
    }


def _embeddings(body: dict[str, Any], model: str) -> dict[str, Any]:
    raw = body.get("input", "")
    items = raw if isinstance(raw, list) else [raw]
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": [round((zlib.crc32(str(item).encode()) % 1000) / 1000, 3)] * 8,
        }
        for i, item in enumerate(items)
    ]
    tokens = _prompt_tokens(body)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


async def _chat_stream(body: dict[str, Any], model: str) -> AsyncIterator[bytes]:
    words, finish = _reply(body)
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    base = {
        "id": f"chatcmpl-mock-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
    }
    for index, word in enumerate(words):
        delta = {"content": word if index == 0 else " " + word}
        if index == 0:
            delta["role"] = "assistant"
        chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        if include_usage:
            chunk["usage"] = None
        yield b"data: " + _json.encode(chunk) + b"\n\n"
    yield (
        b"data: "
        + _json.encode({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        + b"\n\n"
    )
    if include_usage:
        usage = _usage(_prompt_tokens(body), len(words))
        yield b"data: " + _json.encode({**base, "choices": [], "usage": usage}) + b"\n\n"
    yield b"data: [DONE]\n\n"


class MockTransport(httpx.AsyncBaseTransport):
    """Answers /chat/completions, /completions and /embeddings like an OpenAI-compatible server."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = msgspec.json.decode(await request.aread())
        model = str(body.get("model", "mock"))
        path = request.url.path
        if path.endswith("/chat/completions"):
            if body.get("stream"):
                return httpx.Response(
                    200, headers={"content-type": "text/event-stream"}, content=_chat_stream(body, model)
                )
            payload = _chat(body, model)
        elif path.endswith("/completions"):
            if body.get("stream"):
                return _error(400, "the mock provider streams chat completions only")
            payload = _completion(body, model)
        elif path.endswith("/embeddings"):
            payload = _embeddings(body, model)
        else:
            return _error(404, f"the mock provider has no route {path}")
        return httpx.Response(
            200, content=_json.encode(payload), headers={"content-type": "application/json"}
        )


def _error(status: int, message: str) -> httpx.Response:
    error = {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": str(status)}
    }
    return httpx.Response(status, content=_json.encode(error), headers={"content-type": "application/json"})
