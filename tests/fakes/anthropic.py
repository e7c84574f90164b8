"""A fake Anthropic Messages API (`POST /v1/messages`) for tests of the Anthropic translation.

It checks requests as the real API does (anthropic_rules.py: headers, `max_tokens`, alternating
roles, tool blocks, cache breakpoints), answers in the real shapes (a `message` object; or the SSE
events `message_start`, `content_block_start`, `ping`, `content_block_delta` with `text_delta` or
`input_json_delta`, `content_block_stop`, `message_delta`, `message_stop`), with the real headers
(`request-id`, `anthropic-ratelimit-*`), and reports prompt caching as Anthropic does
(`cache_creation_input_tokens` the first time a marked prefix is seen, `cache_read_input_tokens`
after). Its reply is the OpenAI fake's (tests/fakes/upstream.py), so expected usage is computable.

It fails on demand: `fail_status` (with Anthropic's error type for it, `retry-after` on 429 and
529 when `retry_after_s` is set) for the next `fail_times` requests or all; a stream that sends an
`error` event (`stream_error_after` deltas) or stops without `message_stop` (`cut_stream_after`).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

from tests.fakes.anthropic_rules import (
    AnthropicError,
    check_headers,
    check_request,
    invalid,
    prompt_tokens,
)
from tests.fakes.serving import Served, serve_in_thread
from tests.fakes.upstream import REPLY_WORDS, Receive, RecordedRequest, Scope, Send, count_tokens, reply_for

MESSAGES_PATH = "/v1/messages"
ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
    529: "overloaded_error",
}  # fmt: skip
ERROR_MESSAGES = {429: "Number of request tokens has exceeded your per-minute rate limit", 529: "Overloaded"}
DEFAULT_MIN_CACHE_TOKENS = 1024  # the shortest prefix Claude Sonnet caches


@dataclass(eq=False)
class FakeAnthropic:
    """Raw ASGI app; tests flip the plain control attributes between requests."""

    required_api_key: str | None = None
    reply_words: int = REPLY_WORDS
    use_tools: bool = False  # with tool_choice auto, call the first tool (any/tool always call one)
    tool_input: dict[str, Any] | None = None  # the input of a tool call (else made from its schema)
    min_cache_tokens: int = DEFAULT_MIN_CACHE_TOKENS
    fail_status: int | None = None
    fail_times: int | None = None  # fail this many requests, then answer again (None: all)
    retry_after_s: int | None = None
    stream_error_after: int | None = None  # deltas sent before an `error` event ends the stream
    stream_error_type: str = "overloaded_error"
    cut_stream_after: int | None = None  # deltas sent before the body ends without message_stop
    delay_s: float = 0.0
    chunk_delay_s: float = 0.0
    cached_prefixes: set[bytes] = field(default_factory=set)
    requests: list[RecordedRequest] = field(default_factory=list)

    def reset(self) -> None:
        """Clear all controls, the cache and the recorded requests (the list object is kept)."""
        requests = self.requests
        self.__dict__.update(FakeAnthropic().__dict__)
        requests.clear()
        self.requests = requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
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
        method, path = scope["method"], scope["path"]
        query = scope.get("query_string", b"").decode()
        self.requests.append(RecordedRequest(method, path, query, headers, raw, parsed))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        try:
            await self._dispatch(method, path, headers, parsed, send)
        except AnthropicError as exc:
            extra = {}
            if exc.status in (429, 529) and self.retry_after_s is not None:
                extra["retry-after"] = str(self.retry_after_s)
            await _send_json(send, exc.status, error_body(exc.type, exc.message), extra)

    async def _dispatch(self, method: str, path: str, headers: dict[str, str], body: Any, send: Send) -> None:
        if method != "POST" or path != MESSAGES_PATH:
            raise AnthropicError(404, "not_found_error", f"Not Found: {method} {path}")
        if self.fail_status is not None and self.fail_times != 0:
            if self.fail_times is not None:
                self.fail_times -= 1
            status = self.fail_status
            raise AnthropicError(status, ERROR_TYPES.get(status, "api_error"), ERROR_MESSAGES.get(status, "Internal server error"))
        check_headers(headers, self.required_api_key)
        if body is None:
            raise invalid("There was an error parsing the body of your request")
        check_request(body)
        content, stop_reason, stop_sequence = self._reply(body)
        usage = self._usage(body, content)
        message_id = f"msg_{uuid.uuid4().hex[:24]}"
        if body.get("stream"):
            await self._stream(send, message_id, body["model"], content, stop_reason, stop_sequence, usage)
            return
        answer = {
            "id": message_id, "type": "message", "role": "assistant", "model": body["model"],
            "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": usage,
        }  # fmt: skip
        await _send_json(send, 200, answer)

    def _reply(self, body: dict[str, Any]) -> tuple[list[dict[str, Any]], str, str | None]:
        """The answer's content blocks, stop reason and the stop sequence met, if any."""
        tool = self._tool_to_call(body)
        choice = (body.get("tool_choice") or {}).get("type", "auto")
        if tool is not None:
            call = {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": tool["name"],
                    "input": self.tool_input if self.tool_input is not None else _input_for(tool["input_schema"])}  # fmt: skip
            preamble = [] if choice in ("any", "tool") else [{"type": "text", "text": f"I will call {tool['name']}."}]
            return [*preamble, call], "tool_use", None
        text = reply_for(None, body["max_tokens"], self.reply_words)
        stop_reason: str = "max_tokens" if body["max_tokens"] < self.reply_words else "end_turn"
        for sequence in body.get("stop_sequences") or ():
            at = text.find(sequence)
            if at >= 0:
                return [{"type": "text", "text": text[:at]}], "stop_sequence", sequence
        return [{"type": "text", "text": text}], stop_reason, None

    def _tool_to_call(self, body: dict[str, Any]) -> dict[str, Any] | None:
        tools = body.get("tools") or []
        last = body["messages"][-1].get("content")
        answered = isinstance(last, list) and any(b.get("type") == "tool_result" for b in last)
        choice = body.get("tool_choice") or {"type": "auto"}
        if not tools or answered or choice["type"] == "none" or (choice["type"] == "auto" and not self.use_tools):
            return None
        if choice["type"] == "tool":
            return next(t for t in tools if t["name"] == choice["name"])
        return dict(tools[0])

    def _usage(self, body: dict[str, Any], content: list[dict[str, Any]]) -> dict[str, Any]:
        total, breakpoints = prompt_tokens(body)
        cacheable = [(tokens, digest) for tokens, digest in breakpoints if tokens >= self.min_cache_tokens]
        read = max((tokens for tokens, digest in cacheable if digest in self.cached_prefixes), default=0)
        written = max((tokens for tokens, _ in cacheable), default=0)
        written = written - read if written > read else 0
        self.cached_prefixes.update(digest for _, digest in cacheable)
        output = sum(_output_tokens(block) for block in content)
        return {
            "input_tokens": total - read - written,
            "cache_creation_input_tokens": written,
            "cache_read_input_tokens": read,
            "cache_creation": {"ephemeral_5m_input_tokens": written, "ephemeral_1h_input_tokens": 0},
            "output_tokens": output,
            "service_tier": "standard",
        }

    async def _stream(
        self, send: Send, message_id: str, model: str, content: list[dict[str, Any]], stop_reason: str,
        stop_sequence: str | None, usage: dict[str, Any],
    ) -> None:  # fmt: skip
        await send({"type": "http.response.start", "status": 200, "headers": _headers({
            "content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"})})  # fmt: skip
        start_usage = {**usage, "output_tokens": 1}
        message = {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
                   "stop_reason": None, "stop_sequence": None, "usage": start_usage}  # fmt: skip
        events: list[tuple[str, dict[str, Any]]] = [("message_start", {"message": message})]
        for index, block in enumerate(content):
            events += _block_events(index, block)
            if index == 0:
                events.insert(2, ("ping", {}))
        events.append(("message_delta", {"delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                         "usage": {"output_tokens": usage["output_tokens"]}}))  # fmt: skip
        events.append(("message_stop", {}))
        deltas = 0
        for name, data in events:
            if name == "content_block_delta":
                if deltas == self.stream_error_after:
                    error = {"type": self.stream_error_type, "message": ERROR_MESSAGES.get(529, "error")}
                    await _send_event(send, "error", {"error": error}, more=False)
                    return
                if deltas == self.cut_stream_after:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return
                deltas += 1
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
            await _send_event(send, name, data, more=name != "message_stop")


def _block_events(index: int, block: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    if block["type"] == "text":
        start = {"type": "text", "text": ""}
        words = block["text"].split(" ")
        deltas = [{"type": "text_delta", "text": w if i == 0 else f" {w}"} for i, w in enumerate(words) if w or i == 0]
    else:  # tool_use: the input streamed as JSON text, beginning (as Anthropic's does) with ""
        start = {**block, "input": {}}
        text = msgspec.json.encode(block["input"]).decode()
        half = len(text) // 2
        deltas = [{"type": "input_json_delta", "partial_json": part} for part in ("", text[:half], text[half:])]
    return [
        ("content_block_start", {"index": index, "content_block": start}),
        *(("content_block_delta", {"index": index, "delta": delta}) for delta in deltas),
        ("content_block_stop", {"index": index}),
    ]


def _output_tokens(block: dict[str, Any]) -> int:
    if block["type"] == "text":
        return count_tokens(block["text"])
    return count_tokens(block["name"]) + count_tokens(msgspec.json.encode(block["input"]).decode())


def _input_for(schema: dict[str, Any]) -> dict[str, Any]:
    """A tool input that satisfies the schema's required properties, by their types."""
    samples = {"string": "Paris", "integer": 1, "number": 1.5, "boolean": True, "array": [], "object": {}}
    properties = schema.get("properties") or {}
    return {name: samples.get(properties.get(name, {}).get("type", "string"), "x") for name in schema.get("required", [])}


def error_body(type_: str, message: str) -> dict[str, Any]:
    """Anthropic's error envelope."""
    return {"type": "error", "error": {"type": type_, "message": message}, "request_id": f"req_{uuid.uuid4().hex[:24]}"}


def _headers(extra: dict[str, str]) -> list[tuple[bytes, bytes]]:
    headers = {
        "request-id": f"req_{uuid.uuid4().hex[:24]}",
        "anthropic-organization-id": "00000000-0000-4000-8000-000000000000",
        "anthropic-ratelimit-requests-limit": "4000",
        "anthropic-ratelimit-requests-remaining": "3999",
        "anthropic-ratelimit-tokens-limit": "400000",
        "anthropic-ratelimit-tokens-remaining": "399000",
        **extra,
    }
    return [(k.encode(), v.encode()) for k, v in headers.items()]


async def _send_json(send: Send, status: int, payload: dict[str, Any], extra: dict[str, str] | None = None) -> None:
    data = msgspec.json.encode(payload)
    headers = {"content-type": "application/json", "content-length": str(len(data)), **(extra or {})}
    await send({"type": "http.response.start", "status": status, "headers": _headers(headers)})
    await send({"type": "http.response.body", "body": data})


async def _send_event(send: Send, name: str, data: dict[str, Any], *, more: bool) -> None:
    frame = b"event: %b\ndata: %b\n\n" % (name.encode(), msgspec.json.encode({"type": name, **data}))
    await send({"type": "http.response.body", "body": frame, "more_body": more})


@dataclass
class RunningAnthropic(Served[FakeAnthropic]):
    """Handle on a served FakeAnthropic: its `base_url` is what a deployment's api_base is."""

    @property
    def base_url(self) -> str:
        return self.root_url


@contextlib.contextmanager
def run_fake_anthropic(app: FakeAnthropic | None = None, startup_timeout_s: float = 10.0) -> Iterator[RunningAnthropic]:
    """Serve `app` with uvicorn in a background thread on a free port; stop it on exit."""
    app = app or FakeAnthropic()
    with serve_in_thread(app, "fake-anthropic", startup_timeout_s, what="fake anthropic") as served:
        yield RunningAnthropic(app, served.port, served.server, served.thread)
