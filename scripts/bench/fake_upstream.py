"""Fast fakes for scripts/bench/proxy.py and scripts/bench/http_client.py: the outside world of the
benchmark, as cheap as an HTTP/1.1 server in Python gets, so the CPU they take from the machine's
two cores goes to what is measured instead.

* `upstream`: an OpenAI-compatible provider that answers every `POST …/chat/completions` at once with
  one fixed completion and its usage (10 prompt, 5 completion tokens). It counts the requests by the
  bearer token they carry, so the benchmark knows how many requests each proxy forwarded.
* `sinks`: Lago (`POST /api/v1/events/batch`, its events counted by `transaction_id`; LiteLLM's
  one-event `POST /api/v1/events` counted apart) and a webhook receiver (LiteLLM's on
  `/litellm-webhook`, any other POST spendledger's), all answering 200 at once.

Both answer `GET /bench/stats` with their counters as JSON and `POST /bench/reset` by zeroing them.

    .venv/bin/python scripts/bench/fake_upstream.py upstream|sinks --port 8001

Each is an asyncio protocol over httptools's request parser (uvicorn's) on uvloop, in one thread:
~6 µs of CPU per request under load where the same app as raw ASGI on granian took ~60 and on
uvicorn more (measured with wrk against each; docs/benchmarks.md). It speaks HTTP/1.1 as the clients
need it: keep-alive and `Connection: close`, Content-Length or chunked request bodies, pipelined
requests answered in order; a request it cannot parse gets 400 and the connection is closed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import Counter
from collections.abc import Callable
from typing import cast

import httptools

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
LITELLM_WEBHOOK_PATH = "/litellm-webhook"
NOT_FOUND = b'{"error":{"message":"not found","type":"not_found"}}'
REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}


class Request:
    """What the fakes look at in a request: method, path, bearer token and body."""

    __slots__ = ("body", "method", "path", "token")

    def __init__(self, method: str, path: str, token: str, body: bytes) -> None:
        self.method, self.path, self.token, self.body = method, path, token, body


Answer = tuple[int, bytes]
App = Callable[[Request], Answer]


def _bench_route(request: Request, counts: Counter[str]) -> Answer | None:
    if request.path == "/bench/stats":
        return 200, json.dumps(dict(counts)).encode()
    if request.path == "/bench/reset" and request.method == "POST":
        counts.clear()
        return 200, b"{}"
    return None


def upstream_app() -> App:
    counts: Counter[str] = Counter()

    def answer(request: Request) -> Answer:
        if request.method == "POST" and request.path.endswith("/chat/completions"):
            counts[request.token or "-"] += 1
            return 200, COMPLETION
        return _bench_route(request, counts) or (404, NOT_FOUND)

    return answer


def sinks_app() -> App:
    counts: Counter[str] = Counter()

    def answer(request: Request) -> Answer:
        reply = _bench_route(request, counts)
        if reply is not None:
            return reply
        if request.method == "POST" and request.path == "/api/v1/events/batch":
            counts["lago_posts"] += 1
            counts["lago_events"] += request.body.count(b'"transaction_id"')
            return 200, b'{"events":[]}'
        if request.method == "POST" and request.path == "/api/v1/events":  # LiteLLM: one event a POST
            counts["litellm_lago_events"] += 1
            return 200, b'{"event":{}}'
        if request.method == "POST" and request.path == LITELLM_WEBHOOK_PATH:
            counts["litellm_webhooks"] += 1
            return 200, b""
        if request.method == "POST":
            counts["webhooks"] += 1
            return 200, b""
        return 404, b"{}"

    return answer


def response(status: int, body: bytes, *, close: bool) -> bytes:
    head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % (
        status, REASONS.get(status, b"Unknown"), len(body))  # fmt: skip
    return head + (b"connection: close\r\n\r\n" if close else b"\r\n") + body


class HttpConnection(asyncio.Protocol):
    """One client connection: httptools calls the on_* methods as it parses what arrives; every
    complete request is answered at once, so pipelined requests are answered in order."""

    def __init__(self, app: App) -> None:
        self._app = app
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._token = b""
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._send(response(400, b'{"error":"bad request"}', close=True), close=True)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url, self._token, self._body = b"", b"", []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"authorization":
            self._token = value.partition(b" ")[2]

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        method = self._parser.get_method().decode()
        path = httptools.parse_url(self._url).path.decode()
        status, body = self._app(Request(method, path, self._token.decode(), b"".join(self._body)))
        close = not self._parser.should_keep_alive()
        self._send(response(status, body, close=close), close=close)

    def _send(self, data: bytes, *, close: bool) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        self._transport.write(data)
        if close:
            self._transport.close()


async def serve(app: App, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: HttpConnection(app), host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description="a fast fake for the benchmarks")
    parser.add_argument("app", choices=("upstream", "sinks"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = upstream_app() if args.app == "upstream" else sinks_app()
    try:
        import uvloop
    except ImportError:  # plain asyncio works, only slower
        asyncio.run(serve(app, args.host, args.port))
    else:
        uvloop.run(serve(app, args.host, args.port))


if __name__ == "__main__":
    main()
