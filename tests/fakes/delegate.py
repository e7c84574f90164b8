"""What the providers' fakes share: reading a request, answering an error, and handing a request on
to the OpenAI fake (tests/fakes/upstream.py) at its own path, with the provider's touches added to
its answer (Azure's filter results, Gemini's usage placement) by a `Reshape`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from tests.fakes.upstream import FakeUpstream, RecordedRequest

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Reshape:
    """How a provider's answers differ from OpenAI's: override the hooks."""

    def json(self, payload: dict[str, Any]) -> dict[str, Any]:
        """A whole 200 JSON answer."""
        return payload

    def events(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """All of a stream's chunks (JSON), before `[DONE]`."""
        return events

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Headers the provider adds to every answer."""
        return []


async def read_request(scope: Scope, receive: Receive) -> RecordedRequest:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    raw = b"".join(chunks)
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    try:
        parsed: Any = msgspec.json.decode(raw) if raw else None
    except msgspec.DecodeError:
        parsed = None
    query = scope.get("query_string", b"").decode()
    return RecordedRequest(scope["method"], scope["path"], query, headers, raw, parsed)


async def send_error(
    send: Send, status: int, payload: Any, extra_headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    data = msgspec.json.encode(payload)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": data})


async def delegate(
    inner: FakeUpstream, scope: Scope, request: RecordedRequest, route: str, body: Any, reshape: Reshape, send: Send
) -> None:
    """Serve `request` as the OpenAI fake serves `POST /v1{route}` with `body`, reshaped."""
    raw = msgspec.json.encode(body)
    inner_scope = {**scope, "path": f"/v1{route}", "raw_path": f"/v1{route}".encode(), "query_string": b""}
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    started: dict[str, Any] = {}
    buffered: list[bytes] = []

    async def reshaping_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            started.update(message)
            return
        buffered.append(message.get("body", b""))
        if message.get("more_body"):
            return  # the fake's streams are short: reshape them whole
        await _send_reshaped(send, started, b"".join(buffered), reshape)

    await inner(inner_scope, receive, reshaping_send)


async def _send_reshaped(send: Send, start: dict[str, Any], data: bytes, reshape: Reshape) -> None:
    headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"] + reshape.headers()
    streaming = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)
    if start["status"] != 200:
        body = data
    elif streaming:
        events = [msgspec.json.decode(frame[6:]) for frame in data.split(b"\n\n") if frame.startswith(b"data: {")]
        frames = [b"data: " + msgspec.json.encode(event) + b"\n\n" for event in reshape.events(events)]
        body = b"".join(frames) + b"data: [DONE]\n\n"
    else:
        body = msgspec.json.encode(reshape.json(msgspec.json.decode(data)))
    if not streaming:
        headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": start["status"], "headers": headers})
    await send({"type": "http.response.body", "body": body})
