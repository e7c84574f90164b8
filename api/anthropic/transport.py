"""An Anthropic deployment as an OpenAI-speaking upstream: an httpx transport that translates.

api/upstream.py hands the proxy, for an `anthropic/` deployment, a client whose transport is an
`AnthropicTransport`: the proxy and the stream relay send an OpenAI chat request and read an OpenAI
answer, as from any provider, and never learn that Anthropic's Messages API was spoken in between.
So retries see Anthropic's statuses already mapped, and billing reads the usage it always reads:

- the request body is translated (`to_messages_request`) and sent, with the target's headers
  (`x-api-key`, `anthropic-version`) and timeouts, through the gateway's pooled client;
- a request that cannot be translated, or any route but chat completions, is answered here with
  the OpenAI error envelope and a 4xx, nothing sent: the proxy records it as a failure at cost 0
  and passes the 4xx on, as it does a provider's own;
- Anthropic's errors become the OpenAI envelope with the status LiteLLM answers (`to_openai_error`),
  its `request-id`, `retry-after` and `anthropic-ratelimit-*` headers kept;
- an answer becomes a chat.completion, and a stream chat.completion.chunk events
  (`StreamTranslator`), each whole: the relay (api/streaming.py) finds the translator in the
  response's extensions (`TRANSLATOR`), sends its bytes on without decoding them again and bills
  the usage it kept (its own usage chunk and `[DONE]` come from the relay, after the commit). A
  stream that breaks (an `error` event, a body ending before `message_stop`, a read error) ends
  with the translator's error chunk and then an `httpx` transport error, which the relay records
  as the stream's failure, billed for the input as Anthropic counted it and the output so far.

When the client names no `max_tokens`, the translation's default is `DEFAULT_MAX_TOKENS`, capped at
the model's output limit: never more than the hold's worst case (ledger/holds.py) assumes.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Final

import httpx
import msgspec

from spendledger.api.anthropic.errors import envelope, to_openai_error
from spendledger.api.anthropic.request import to_messages_request
from spendledger.api.anthropic.response import to_openai_response
from spendledger.api.anthropic.stream import StreamTranslator
from spendledger.api.anthropic.wire import DEFAULT_MAX_TOKENS
from spendledger.api.errors import ApiError
from spendledger.ledger.config import Deployment
from spendledger.ledger.pricing import limits_for

CHAT_PATH: Final = "/chat/completions"
TRANSLATOR: Final = "spendledger.translator"  # a stream response's extension: its StreamTranslator
_JSON: Final = (b"content-type", b"application/json")
_SSE: Final = (b"content-type", b"text/event-stream")
# Anthropic's headers worth passing on: the request's id (for Anthropic's support), and what a
# client or a router needs to back off.
_KEPT: Final = (b"request-id", b"retry-after", b"x-should-retry")
_KEPT_PREFIX: Final = b"anthropic-ratelimit-"
Header = tuple[bytes, bytes]


def default_max_tokens(deployment: Deployment) -> int:
    """`max_tokens` for a request that names none: LiteLLM's default, or the model's output limit
    if lower, so that it never exceeds the output the hold was taken for."""
    limit = limits_for(deployment).max_output_tokens
    return DEFAULT_MAX_TOKENS if limit is None else min(DEFAULT_MAX_TOKENS, limit)


def kept_headers(headers: httpx.Headers) -> list[Header]:
    """Anthropic's `request-id`, `retry-after` and rate-limit headers, in its order. (Read as bytes:
    httpx's `items()` decodes every header, at a few µs a request.)"""
    kept = []
    for name, value in headers.raw:
        lowered = name.lower()
        if lowered in _KEPT or lowered.startswith(_KEPT_PREFIX):
            kept.append((lowered, value))
    return kept


class AnthropicTransport(httpx.AsyncBaseTransport):
    """One (deployment, route) target: OpenAI's chat requests in and answers out, Anthropic's
    Messages API spoken through `client` (the gateway's pooled one, which this never closes)."""

    def __init__(self, client: httpx.AsyncClient, deployment: Deployment, path: str) -> None:
        self._client = client
        self._path = path
        self._model = deployment.upstream_model
        self._secret = deployment.api_key
        self._default_max_tokens = default_max_tokens(deployment)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._path != CHAT_PATH:
            message = f"Anthropic deployments serve chat completions only, not {self._path}"
            return _answer(400, envelope(message, "invalid_request_error", "400"), [_JSON], request)
        try:
            body = to_messages_request(request.content, self._model, default_max_tokens=self._default_max_tokens)
        except ApiError as exc:
            return _answer(exc.status, envelope(exc.message, exc.type, exc.code, exc.param), [_JSON], request)
        # The request (made for this one call by Upstream.send) is sent on with its body replaced:
        # its URL, headers and timeouts are the target's already, and a copy would cost as much again.
        request.headers["Content-Length"] = str(len(body))
        request.stream = httpx.ByteStream(body)
        request._content = body  # what read() would set; the transport sends `content`
        response = await self._client.send(request, stream=True)
        kept = kept_headers(response.headers)
        if response.status_code != 200:
            try:
                raw = await response.aread()
            finally:
                await response.aclose()
            error = to_openai_error(response.status_code, raw, secret=self._secret)
            return _answer(error.status, error.envelope(), [_JSON, *kept], request)
        if not response.headers.get("content-type", "").startswith("text/event-stream"):  # no stream asked
            try:
                raw = await response.aread()
            finally:
                await response.aclose()
            return self._completion(raw, kept, request)
        translator = StreamTranslator(usage_chunk=False, done=False, secret=self._secret)
        stream = TranslatedStream(response, translator)
        return httpx.Response(
            200, headers=[_SSE, *kept], stream=stream, request=request, extensions={TRANSLATOR: translator}
        )

    def _completion(self, raw: bytes, kept: list[Header], request: httpx.Request) -> httpx.Response:
        try:
            completion, _ = to_openai_response(raw)
        except msgspec.DecodeError:
            # Not a Messages answer: what the proxy makes of a provider's 5xx (a 502, at cost 0).
            message = "Anthropic answered 200 with a body that is not a Messages answer"
            return _answer(502, envelope(message, "api_error", "502"), [_JSON, *kept], request)
        return _answer(200, completion, [_JSON, *kept], request)


def _answer(status: int, body: bytes, headers: list[Header], request: httpx.Request) -> httpx.Response:
    response = httpx.Response(status, headers=headers, stream=httpx.ByteStream(body), request=request)
    response._content = body  # read already, as api/http_client.py hands a short answer over
    return response


class TranslatedStream(httpx.AsyncByteStream):
    """Anthropic's SSE body, read as it comes, given as OpenAI's chunks."""

    def __init__(self, response: httpx.Response, translator: StreamTranslator) -> None:
        self._response = response
        self._translator = translator

    async def __aiter__(self) -> AsyncIterator[bytes]:
        translator = self._translator
        response = self._response
        # Anthropic's bytes as they come: straight from the transport unless they need decoding
        # (httpx's aiter_bytes adds two generators a chunk, and a stream has a chunk an event).
        raw = response.stream
        chunks: AsyncIterable[bytes]
        if isinstance(raw, httpx.AsyncByteStream) and "content-encoding" not in response.headers:
            chunks = raw
        else:
            chunks = response.aiter_bytes()
        async for data in chunks:  # a read error goes to the relay as it is: the stream's failure
            out = translator.feed(data)
            if out:
                yield out
            if translator.failure is not None:
                break
        out = translator.close()
        if out:
            yield out
        if translator.failure is not None:
            failure = translator.failure
            reason = f"Anthropic's stream failed: {failure.upstream_type}"
        elif not translator.finished:
            reason = "Anthropic's stream ended before message_stop"
        else:
            return
        raise httpx.RemoteProtocolError(reason, request=self._response.request)

    async def aclose(self) -> None:
        await self._response.aclose()
