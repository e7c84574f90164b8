"""A fake OpenAI-compatible provider for end-to-end tests of the proxy.

It mimics the real API's response shapes, SSE framing and error envelopes, but its
token accounting is a simple word count so tests can compute expected usage exactly. It bills
request shapes as OpenAI does: every one of `n` choices (and `best_of` on /completions) and every
prompt of a prompt list is generated and billed, and image, audio and file parts cost a fixed
number of input tokens each (`MEDIA_PART_TOKENS`: a high-detail 512×512 image on gpt-4o).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import hashlib
import struct
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

from tests.fakes.serving import Served, serve_in_thread

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

BASE_REPLY = "This is a fake reply from the test upstream"
REPLY_WORDS = 12
EMBEDDING_DIM = 8
# Input tokens of one image, audio or file part: OpenAI's 85 + 170 per 512-px tile, for one tile.
MEDIA_PART_TOKENS = 255
MODELS = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "gpt-3.5-turbo-instruct")

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "requests",
}
_ERROR_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}


# --- deterministic token accounting (imported by tests to compute expectations) ---


def count_tokens(text: str) -> int:
    """Whitespace word count: trivially predictable, min 1 for non-empty text."""
    if not text:
        return 0
    return max(1, len(text.split()))


def _content_text(content: Any) -> str:
    """Flatten string or `[{"type": "text", "text": ...}]` content; other parts count as nothing."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _media_parts(content: Any) -> int:
    if not isinstance(content, list):
        return 0
    return sum(1 for p in content if isinstance(p, dict) and p.get("type") not in ("text", "refusal"))


def prompt_tokens_for_messages(messages: list[dict[str, Any]]) -> int:
    """Words per message + 3 overhead each, + 3 priming (loosely like tiktoken's chat formula),
    + MEDIA_PART_TOKENS per image, audio or file part."""
    return (
        sum(
            count_tokens(_content_text(m.get("content"))) + MEDIA_PART_TOKENS * _media_parts(m.get("content")) + 3
            for m in messages
        )
        + 3
    )


def byte_tokens(text: str) -> int:
    """The worst tokenizer: a token per UTF-8 byte (a byte-level BPE on text it has no merges for)."""
    return len(text.encode())


def byte_prompt_tokens_for_messages(messages: list[dict[str, Any]]) -> int:
    """OpenAI's chat formula with the worst tokenizer: per message 3, its role's and text's bytes,
    and a name's bytes plus 1; 3 to prime the reply; MEDIA_PART_TOKENS per media part."""
    total = 3
    for m in messages:
        total += 3 + byte_tokens(str(m.get("role", ""))) + byte_tokens(_content_text(m.get("content")))
        total += MEDIA_PART_TOKENS * _media_parts(m.get("content"))
        if isinstance(m.get("name"), str):
            total += 1 + byte_tokens(m["name"])
    return total


def reply_for(messages: Any = None, max_tokens: int | None = None, words: int = REPLY_WORDS) -> str:
    """The reply of `words` words (12 unless a test asks for more), truncated to `max_tokens` words
    when that is smaller."""
    text = (BASE_REPLY.split() + ["word"] * words)[:words]
    if max_tokens is not None and max_tokens < words:
        text = text[: max(max_tokens, 0)]
    return " ".join(text)


def completions_per_prompt(body: dict[str, Any]) -> int:
    """How many completions a request generates (and is billed for) per prompt: `n`, and on
    /completions `best_of` (generated server-side, the best `n` returned)."""
    n = body.get("n") if isinstance(body.get("n"), int) else 1
    best_of = body.get("best_of") if isinstance(body.get("best_of"), int) else 1
    return max(n, best_of)


def embedding_for(text: str) -> list[float]:
    """A stable 8-float vector in [-1, 1] derived from a hash of the input."""
    digest = hashlib.sha256(text.encode()).digest()
    ints = (int.from_bytes(digest[i * 4 : i * 4 + 4], "big") for i in range(EMBEDDING_DIM))
    return [round(n / 2**31 - 1.0, 6) for n in ints]


def _max_tokens(body: dict[str, Any]) -> int | None:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    return value if isinstance(value, int) else None


def _usage(
    prompt: int, completion: int, details: bool = True, cached: int = 0, reasoning: int = 0, audio: int = 0
) -> dict[str, Any]:
    """OpenAI's usage block: cached prompt tokens are part of `prompt_tokens`, reasoning tokens
    part of `completion_tokens`."""
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if details:  # chat responses carry these, like the real API
        usage["prompt_tokens_details"] = {"cached_tokens": min(cached, prompt), "audio_tokens": min(audio, prompt)}
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning, "audio_tokens": 0}
    return usage


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The OpenAI error envelope."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _HttpError(Exception):
    """Raised inside handlers to short-circuit with an OpenAI-style error."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


# OpenAI's rate-limit headers, as it sends them on every answer (static here).
RATE_LIMIT_HEADERS = {
    "x-ratelimit-limit-requests": "10000",
    "x-ratelimit-limit-tokens": "2000000",
    "x-ratelimit-remaining-requests": "9999",
    "x-ratelimit-remaining-tokens": "1999000",
    "x-ratelimit-reset-requests": "6ms",
    "x-ratelimit-reset-tokens": "30ms",
}


@dataclass(frozen=True)
class Failure:
    """One failed answer, on demand (`FakeUpstream.fail_next`, `.fail_always`): an HTTP error in
    OpenAI's envelope (`status`, with its `retry-after` / `retry-after-ms` headers when set, and a
    usage block when `usage`: a provider that bills the failed call), a connection that breaks
    before any byte of the body (`drop`) or, on a stream, after `break_after` chunks, each after
    `delay_s` (longer than the proxy's timeout: a timeout)."""

    status: int | None = None
    retry_after: str | None = None
    retry_after_ms: str | None = None
    usage: bool = False
    drop: bool = False
    break_after: int | None = None
    delay_s: float = 0.0
    context_window: bool = False  # a 400 as OpenAI answers a prompt past the model's context window


# The stream being answered breaks after this many chunks (each request runs in its own context).
_BREAK_AFTER: contextvars.ContextVar[int | None] = contextvars.ContextVar("break_after", default=None)


class _Dropped(Exception):
    """Raised after the response began: uvicorn then closes the connection mid-response."""


@dataclass
class RecordedRequest:
    """One request as the fake saw it, so tests can assert what the proxy forwarded."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    json: Any


@dataclass(eq=False)
class FakeUpstream:
    """Raw ASGI app; tests flip the plain control attributes between requests."""

    fail_status: int | None = None
    delay_s: float = 0.0
    chunk_delay_s: float = 0.0
    required_api_key: str | None = None
    reply_words: int = REPLY_WORDS  # how long a reply is when max_tokens does not cut it
    # The model's limits, enforced as OpenAI does: a longer input or a larger max_tokens is a 400,
    # and a reply never runs past either.
    context_window: int | None = None
    max_output_tokens: int | None = None
    ignores_include_usage: bool = False  # some OpenAI-compatible servers never send a usage chunk
    words_per_chunk: int = 1  # how many words each stream chunk carries
    overbill_tokens: int = 0  # completion tokens reported on top of those generated (a provider's bug)
    echo_headers_in_errors: bool = False  # 400s quote the request's headers (as some proxies do)
    # Chat answers as a provider with prompt caching and a reasoning model answers: this many of
    # the prompt's tokens read from the cache (at most the prompt), and this many reasoning tokens
    # spent (billed as completion tokens, within max_tokens, as o-series models do).
    cached_prompt_tokens: int = 0
    reasoning_tokens: int = 0
    audio_prompt_tokens: int = 0  # of the prompt's tokens, this many were audio (at most the prompt)
    # Prompts counted by the worst tokenizer (a token per byte, OpenAI's chat format in full)
    # instead of by words: what the hold's input bound must still cover.
    bytes_as_tokens: bool = False
    requests: list[RecordedRequest] = field(default_factory=list)
    # Failures on demand, by the model asked for (None: any model): the next ones, then for good.
    scripted: dict[str | None, list[Failure]] = field(default_factory=dict)
    failing: dict[str | None, Failure] = field(default_factory=dict)

    def fail_next(self, *failures: Failure, model: str | None = None) -> None:
        """The next requests for `model` (any, if None) fail so, in order; then they succeed."""
        self.scripted.setdefault(model, []).extend(failures)

    def fail_always(self, failure: Failure, model: str | None = None) -> None:
        self.failing[model] = failure

    def served(self, model: str) -> int:
        """How many requests asked for `model`."""
        return sum(1 for r in self.requests if isinstance(r.json, dict) and r.json.get("model") == model)

    def _failure_for(self, body: Any) -> Failure | None:
        model = body.get("model") if isinstance(body, dict) else None
        for key in (model, None):
            queue = self.scripted.get(key)
            if queue:
                return queue.pop(0)
        return self.failing.get(model) or self.failing.get(None)

    def reset(self) -> None:
        """Clear all controls and recorded requests (the list object is kept)."""
        self.fail_status, self.delay_s, self.chunk_delay_s, self.required_api_key = None, 0.0, 0.0, None
        self.reply_words, self.ignores_include_usage, self.echo_headers_in_errors = REPLY_WORDS, False, False
        self.context_window, self.max_output_tokens = None, None
        self.words_per_chunk, self.overbill_tokens = 1, 0
        self.cached_prompt_tokens, self.reasoning_tokens, self.audio_prompt_tokens = 0, 0, 0
        self.bytes_as_tokens = False
        self.scripted.clear()
        self.failing.clear()
        self.requests.clear()

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
        self.requests.append(
            RecordedRequest(method, path, scope.get("query_string", b"").decode(), headers, raw, parsed)
        )
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        failure = self._failure_for(parsed) if method == "POST" else None
        if failure is not None:
            if failure.delay_s:
                await asyncio.sleep(failure.delay_s)
            if failure.status is not None or failure.drop or failure.context_window:
                await _fail(send, failure, parsed)
                return
        _BREAK_AFTER.set(failure.break_after if failure is not None else None)
        try:
            await self._dispatch(method, path, headers, raw, parsed, send)
        except _HttpError as exc:
            fallback = "server_error" if exc.status >= 500 else "invalid_request_error"
            type_ = _ERROR_TYPES.get(exc.status, fallback)
            code = exc.code or _ERROR_CODES.get(exc.status)
            await _send_json(send, exc.status, error_body(exc.message, type_, exc.param, code))

    async def _dispatch(
        self, method: str, path: str, headers: dict[str, str], raw: bytes, body: Any, send: Send
    ) -> None:
        if self.fail_status is not None:
            message = f"Fake upstream failure (status {self.fail_status})"
            if self.echo_headers_in_errors:
                message += f"; request headers: {headers}"
            raise _HttpError(self.fail_status, message)
        key = self.required_api_key
        if key is not None and headers.get("authorization") != f"Bearer {key}":
            raise _HttpError(401, "Incorrect API key provided.")
        route = path.removeprefix("/v1")
        if method == "GET" and route == "/models":
            await _send_json(send, 200, {"object": "list", "data": [_model(m) for m in MODELS]})
            return
        if method == "GET" and route.startswith("/models/"):
            await _send_json(send, 200, _model(route.removeprefix("/models/")))
            return
        handlers = {
            "/chat/completions": self._chat,
            "/completions": self._completions,
            "/embeddings": self._embeddings,
        }
        if method != "POST" or route not in handlers:
            raise _HttpError(404, f"Invalid URL ({method} {path})")
        if not isinstance(body, dict):
            raise _HttpError(
                400,
                "We could not parse the JSON body of your request."
                if raw
                else "you must provide a model parameter",
            )
        if not isinstance(body.get("model"), str):
            raise _HttpError(400, "you must provide a model parameter", param="model")
        await handlers[route](body, send)

    async def _chat(self, body: dict[str, Any], send: Send) -> None:
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise _HttpError(400, "'messages' is a required property", param="messages")
        if self.bytes_as_tokens:
            prompt_tokens = byte_prompt_tokens_for_messages(messages)
        else:
            prompt_tokens = prompt_tokens_for_messages(messages)
        cap = self._reply_cap(body, prompt_tokens)
        reasoning = self.reasoning_tokens if cap is None else min(self.reasoning_tokens, cap)
        text = reply_for(messages, None if cap is None else cap - reasoning, self.reply_words)
        choices_n = body.get("n") if isinstance(body.get("n"), int) else 1
        completion = (count_tokens(text) + reasoning) * choices_n + self.overbill_tokens
        usage = _usage(
            prompt_tokens, completion, cached=self.cached_prompt_tokens, reasoning=reasoning * choices_n,
            audio=self.audio_prompt_tokens,
        )  # fmt: skip
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "created": int(time.time()),
            "model": body["model"],
            "system_fingerprint": "fp_fake",
        }
        if not body.get("stream"):
            message = {"role": "assistant", "content": text, "refusal": None}
            choices = [
                {"index": i, "message": message, "logprobs": None, "finish_reason": self._finish_reason(text)}
                for i in range(choices_n)
            ]
            payload = {**base, "object": "chat.completion", "choices": choices, "usage": usage}
            await _send_json(send, 200, payload)
            return
        pieces = self._pieces(text) or [""]
        deltas = [{"content": p} for p in pieces]
        deltas[0] = {"role": "assistant", **deltas[0]}
        choices = [{"index": 0, "delta": d, "logprobs": None, "finish_reason": None} for d in deltas]
        choices.append({"index": 0, "delta": {}, "logprobs": None, "finish_reason": self._finish_reason(text)})
        await self._stream(send, {**base, "object": "chat.completion.chunk"}, choices, usage, body)

    def _pieces(self, text: str) -> list[str]:
        """The stream's chunks of `text`: `words_per_chunk` words each, spaces kept."""
        words = [w if i == 0 else f" {w}" for i, w in enumerate(text.split())]
        size = max(1, self.words_per_chunk)
        return ["".join(words[i : i + size]) for i in range(0, len(words), size)]

    def _reply_cap(self, body: dict[str, Any], prompt_tokens: int) -> int | None:
        """The most tokens a reply may have, or the 400 a provider answers for a request past the
        model's limits."""
        window, most = self.context_window, self.max_output_tokens
        if window is not None and prompt_tokens > window:
            raise _HttpError(
                400, f"This model's maximum context length is {window} tokens", code="context_length_exceeded"
            )
        requested = _max_tokens(body)
        if requested is not None and most is not None and requested > most:
            raise _HttpError(400, f"max_tokens is too large: {requested}", param="max_tokens")
        caps = [c for c in (requested, most, None if window is None else window - prompt_tokens) if c is not None]
        return min(caps) if caps else None

    def _prompt_tokens(self, text: str) -> int:
        return byte_tokens(text) if self.bytes_as_tokens else count_tokens(text)

    def _finish_reason(self, text: str) -> str:
        return "length" if count_tokens(text) < self.reply_words else "stop"

    async def _completions(self, body: dict[str, Any], send: Send) -> None:
        prompt = body.get("prompt", "")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise _HttpError(400, "'prompt' must be a string or a list of strings", param="prompt")
        prompts = prompts or [""]
        longest = max(self._prompt_tokens(p) for p in prompts)
        text = reply_for(None, self._reply_cap(body, longest), self.reply_words)
        prompt_tokens = sum(self._prompt_tokens(p) for p in prompts)
        billed = count_tokens(text) * len(prompts) * completions_per_prompt(body)
        usage = _usage(prompt_tokens, billed + self.overbill_tokens, details=False)
        base = {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body["model"],
        }
        finish = self._finish_reason(text)
        if not body.get("stream"):
            choices = [
                {"text": text, "index": i, "logprobs": None, "finish_reason": finish}
                for i in range(len(prompts))
            ]
            await _send_json(send, 200, {**base, "choices": choices, "usage": usage})
            return
        pieces = self._pieces(text)
        chunks = [
            {"text": p, "index": i, "logprobs": None, "finish_reason": None}
            for i in range(len(prompts))
            for p in pieces
        ]
        chunks += [
            {"text": "", "index": i, "logprobs": None, "finish_reason": finish} for i in range(len(prompts))
        ]
        await self._stream(send, base, chunks, usage, body)

    async def _stream(
        self,
        send: Send,
        base: dict[str, Any],
        choices: list[dict[str, Any]],
        usage: dict[str, Any],
        body: dict[str, Any],
    ) -> None:
        """One SSE event per choice delta, then the optional usage chunk, then `[DONE]`."""
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        include_usage = include_usage and not self.ignores_include_usage
        extra = {"usage": None} if include_usage else {}
        events = [{**base, "choices": [c], **extra} for c in choices]
        if include_usage:
            events.append({**base, "choices": [], "usage": usage})
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-request-id", uuid.uuid4().hex.encode()),
                    *_rate_limit_headers(),
                ],
            }
        )
        for i, event in enumerate(events):
            if i == _BREAK_AFTER.get():
                raise _Dropped("the stream breaks")
            if i and self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
            frame = b"data: " + msgspec.json.encode(event) + b"\n\n"
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    async def _embeddings(self, body: dict[str, Any], send: Send) -> None:
        raw_input = body.get("input")
        inputs = [raw_input] if isinstance(raw_input, str) else raw_input
        if not isinstance(inputs, list) or not inputs or not all(isinstance(s, str) for s in inputs):
            raise _HttpError(400, "'input' must be a non-empty string or list of strings", param="input")
        as_b64 = body.get("encoding_format") == "base64"  # the official SDK asks for base64 by default
        data = []
        for i, text in enumerate(inputs):
            vector = embedding_for(text)
            value: Any = vector
            if as_b64:
                value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(self._prompt_tokens(s) for s in inputs)
        await _send_json(
            send,
            200,
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )


def _model(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 1700000000, "owned_by": "fake-upstream"}


def _rate_limit_headers() -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in RATE_LIMIT_HEADERS.items()] + [(b"openai-processing-ms", b"12")]


async def _send_json(
    send: Send, status: int, payload: dict[str, Any], extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    data = msgspec.json.encode(payload)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                (b"x-request-id", uuid.uuid4().hex.encode()),
                *(_rate_limit_headers() if status == 200 else []),
                *(extra or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


FAILED_PROMPT_TOKENS = 7  # the usage a billed failure reports
FAILED_COMPLETION_TOKENS = 5


async def _fail(send: Send, failure: Failure, body: Any) -> None:
    """A failure as the real API answers it: its status and envelope (with the headers it sends
    then), or a connection that breaks once the response has begun."""
    if failure.context_window:
        failure = Failure(status=400, context_window=True)
    if failure.drop:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"1000")]})
        raise _Dropped("the connection breaks")
    status = failure.status or 500
    fallback = "server_error" if status >= 500 else "invalid_request_error"
    payload = error_body(
        f"Fake upstream failure (status {status})", _ERROR_TYPES.get(status, fallback), None, _ERROR_CODES.get(status)
    )
    if failure.context_window:
        payload = error_body(
            "This model's maximum context length is 16 tokens. However, your messages resulted in 40 tokens.",
            "invalid_request_error",
            "messages",
            "context_length_exceeded",
        )
    if failure.usage:
        payload["usage"] = _usage(FAILED_PROMPT_TOKENS, FAILED_COMPLETION_TOKENS, details=False)
    extra = []
    if failure.retry_after is not None:
        extra.append((b"retry-after", failure.retry_after.encode()))
    if failure.retry_after_ms is not None:
        extra.append((b"retry-after-ms", failure.retry_after_ms.encode()))
    if status == 429:
        extra += [(b"x-ratelimit-remaining-requests", b"0"), (b"x-ratelimit-limit-requests", b"10000")]
    await _send_json(send, status, payload, extra)


# --- runner ---


@dataclass
class RunningUpstream(Served[FakeUpstream]):
    """Handle on a served FakeUpstream: point the proxy at `base_url`."""

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"


@contextlib.contextmanager
def run_fake_upstream(
    app: FakeUpstream | None = None, startup_timeout_s: float = 10.0
) -> Iterator[RunningUpstream]:
    """Serve `app` with uvicorn in a background thread on a free port; stop it on exit.

    The socket is bound here and handed to uvicorn, so there is no pick-a-port race.
    """
    app = app or FakeUpstream()
    with serve_in_thread(app, "fake-upstream", startup_timeout_s, what="fake upstream") as served:
        yield RunningUpstream(app, served.port, served.server, served.thread)
