"""Streaming (SSE) responses: chunks pass through as they come, the usage chunk is kept (hidden
from clients that did not ask for it), and `[DONE]` waits until the usage is committed. A client
that hangs up is billed for what was generated, by a task its cancellation cannot stop. Where the
provider never reports usage (it ignored `include_usage`, or the client hung up first), the output
is estimated from the text the chunks carried, as a non-stream answer's is from its body."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Final

import httpx
import msgspec
from litestar import Response
from litestar.response import Stream

from spendledger.api.anthropic.stream import StreamTranslator
from spendledger.api.anthropic.transport import TRANSLATOR
from spendledger.api.attempts import Answered, BodyFor, Failed, Router
from spendledger.api.errors import ApiError
from spendledger.api.forwarding import failed_response
from spendledger.api.proxy import Exchange, Usage, estimate_tokens, record
from spendledger.api.request_body import asks_usage
from spendledger.api.services import Services
from spendledger.ledger.events import UsageRecorded, UsageStatus
from spendledger.ledger.tickets import Ticket

_encoder: Final = msgspec.json.Encoder()


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    refusal: str | None = None
    tool_calls: msgspec.Raw | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None  # chat completions
    text: str | None = None  # completions

    def generated_bytes(self) -> int:
        """The bytes of what this chunk generated (UTF-8), for an estimate of its tokens."""
        size = len(self.text.encode()) if self.text else 0
        delta = self.delta
        if delta is not None:
            for text in (delta.content, delta.reasoning_content, delta.refusal):
                size += len(text.encode()) if text else 0
            size += len(delta.tool_calls) if delta.tool_calls is not None else 0
        return size


class _ChunkHead(msgspec.Struct):
    choices: list[_Choice] = []
    usage: Usage | None = None


_chunk_decoder: Final = msgspec.json.Decoder(_ChunkHead)


async def forward_stream(services: Services, exchange: Exchange, ticket: Ticket, body_for: BodyFor) -> Response[Any]:
    """Retried (api/attempts.py) until a call's first chunk is read: nothing has reached the
    client yet; from then on the stream is the one answer, whatever happens to it."""
    outcome = await Router(services, exchange, body_for, stream=True).call()
    if isinstance(outcome, Failed):
        return await failed_response(exchange, ticket, outcome)
    relay = StreamRelay(services, exchange, ticket, outcome, request_bytes=len(body_for(outcome.deployment)))
    return Stream(
        relay.events(),
        media_type="text/event-stream",
        headers={**exchange.headers(ticket), "cache-control": "no-cache"},
    )


class StreamRelay:
    """Passes SSE events through, keeps the usage, and holds `[DONE]` back until usage is recorded."""

    def __init__(
        self, services: Services, exchange: Exchange, ticket: Ticket, answered: Answered, request_bytes: int
    ) -> None:
        self._services = services
        self._exchange = exchange
        self._ticket = ticket
        self._response = answered.response
        self._first = answered.first
        self._chunks = answered.chunks if answered.chunks is not None else answered.response.aiter_bytes()
        self._request_bytes = request_bytes
        self._client_wants_usage = asks_usage(exchange.head)
        self._usage: Usage | None = None
        self._usage_chunk: bytes | None = None
        self._generated_bytes = 0
        # A translated stream (api/anthropic/transport.py) comes in whole OpenAI events whose usage
        # its translator keeps: sent on as they come, not decoded a second time.
        self._translator: StreamTranslator | None = answered.response.extensions.get(TRANSLATOR)

    async def events(self) -> AsyncIterator[bytes]:
        try:
            buffer = b""
            async for data in self._upstream_bytes():
                if self._translator is not None:
                    yield data
                    continue
                buffer += data.replace(b"\r\n", b"\n")
                while (end := buffer.find(b"\n\n")) >= 0:
                    event, buffer = buffer[: end + 2], buffer[end + 2 :]
                    out = self._pass(event)
                    if out:
                        yield out
            self._exchange.upstream_ended()
            await self._finish("success", 200)
            if self._translator is not None:
                self._usage_chunk = self._translator.final_usage_chunk()
            tail = self._usage_chunk if (self._client_wants_usage and self._usage_chunk) else b""
            yield tail + b"data: [DONE]\n\n"
        except httpx.HTTPError as exc:
            yield await self._fail(f"upstream stream broke ({type(exc).__name__})")
        except ApiError as exc:  # the ledger could not record: end without [DONE]
            yield _sse_error(exc.message, exc.type)
        finally:
            if not self._ticket.closed:
                # The client hung up: bill what was generated, in a task our cancellation can't stop
                # (spawned before any await here, which a cancellation could interrupt).
                usage = self._event("success", 200, error_type="client_disconnected")
                self._services.background.spawn(record(self._exchange, self._ticket, usage))
            self._services.router.ended(self._exchange.deployment)
            await self._response.aclose()

    async def _upstream_bytes(self) -> AsyncIterator[bytes]:
        """The stream's bytes: its first chunk (read before the response began), then the rest."""
        if self._first:
            yield self._first
        async for data in self._chunks:
            yield data

    def _pass(self, event: bytes) -> bytes | None:
        """The bytes to send the client for one upstream event (None to hold or drop it)."""
        if not event.startswith(b"data:"):
            return event
        payload = event[5:].strip()
        if payload == b"[DONE]":
            return None
        try:
            chunk = _chunk_decoder.decode(payload)
        except msgspec.DecodeError:
            return event
        if chunk.usage is not None:
            self._usage = chunk.usage
            if not chunk.choices:
                self._usage_chunk = event
                return None
        self._generated_bytes += sum(choice.generated_bytes() for choice in chunk.choices)
        return event

    def _event(self, status: UsageStatus, http_status: int, error_type: str | None = None) -> UsageRecorded:
        usage, estimated, generated = self._usage, False, self._generated_bytes
        if self._translator is not None:  # exact once message_delta came; else its output estimated
            usage, estimated = self._translator.usage, self._translator.usage_estimated
            generated = self._translator.generated_bytes
        if usage is None:
            estimated = True
            usage = Usage(
                prompt_tokens=max(1, self._request_bytes // 4),
                completion_tokens=estimate_tokens(generated) if generated else 0,
            )
        return self._exchange.usage_event(
            self._ticket, status=status, http_status=http_status, usage=usage, estimated=estimated, error_type=error_type
        )

    async def _fail(self, message: str) -> bytes:
        try:
            await self._finish("failure", 502, error_type="upstream_error")
        except ApiError as exc:
            return _sse_error(exc.message, exc.type)
        return _sse_error(message, "upstream_error")

    async def _finish(self, status: UsageStatus, http_status: int, error_type: str | None = None) -> None:
        await record(self._exchange, self._ticket, self._event(status, http_status, error_type))


def _sse_error(message: str, type_: str) -> bytes:
    error = {"error": {"message": message, "type": type_, "param": None, "code": type_}}
    return b"data: " + _encoder.encode(error) + b"\n\n"
