"""Fast fakes for scripts/bench/proxy.py: raw ASGI apps with no dependency beyond the standard library
(so granian or uvicorn from any virtualenv can serve them).

* `upstream`: an OpenAI-compatible provider that answers every `POST …/chat/completions` at once with
  one fixed completion and its usage (10 prompt, 5 completion tokens). It counts the requests by the
  bearer token they carry, so the benchmark knows how many requests each proxy forwarded.
* `sinks`: Lago (`POST /api/v1/events/batch`, its events counted by `transaction_id`) and a webhook
  receiver (any other POST, counted): both answer 200 at once.

Both answer `GET /bench/stats` with their counters as JSON and `POST /bench/reset` by zeroing them.

    granian --interface asgi --working-dir scripts/bench fake_upstream:upstream
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "fake",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "It is benchmark time."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    },
    separators=(",", ":"),
).encode()
_JSON = [(b"content-type", b"application/json")]


async def _body(receive: Receive) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


async def _answer(send: Send, status: int, body: bytes) -> None:
    headers = [*_JSON, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _bench_route(path: str, method: str, counts: Counter[str]) -> bytes | None:
    if path == "/bench/stats":
        return json.dumps(dict(counts)).encode()
    if path == "/bench/reset" and method == "POST":
        counts.clear()
        return b"{}"
    return None


_upstream_counts: Counter[str] = Counter()


async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        return await _lifespan(receive, send)
    path, method = scope["path"], scope["method"]
    await _body(receive)
    if method == "POST" and path.endswith("/chat/completions"):
        token = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                token = value.partition(b" ")[2]
                break
        _upstream_counts[token.decode() or "-"] += 1
        return await _answer(send, 200, COMPLETION)
    reply = _bench_route(path, method, _upstream_counts)
    if reply is None:
        return await _answer(send, 404, b'{"error":{"message":"not found","type":"not_found"}}')
    return await _answer(send, 200, reply)


_sink_counts: Counter[str] = Counter()


async def sinks(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        return await _lifespan(receive, send)
    path, method = scope["path"], scope["method"]
    body = await _body(receive)
    reply = _bench_route(path, method, _sink_counts)
    if reply is not None:
        return await _answer(send, 200, reply)
    if method == "POST" and path == "/api/v1/events/batch":
        _sink_counts["lago_posts"] += 1
        _sink_counts["lago_events"] += body.count(b'"transaction_id"')
        return await _answer(send, 200, b'{"events":[]}')
    if method == "POST":
        _sink_counts["webhooks"] += 1
        return await _answer(send, 200, b"")
    return await _answer(send, 404, b"{}")
