"""Anthropic's SSE stream → OpenAI chat.completion.chunk events, incrementally.

`StreamTranslator.feed` takes the provider's bytes as they come (cut anywhere) and gives the bytes
to send on: `message_start` → the first chunk (`role`), `text_delta` → `content`, a `tool_use`
block's start → a tool call's id and name, `input_json_delta` → its arguments, `thinking_delta` →
`reasoning_content`, `message_delta` → the finish reason and then a usage chunk (`choices: []`,
OpenAI's shape for `stream_options.include_usage`), `message_stop` → `[DONE]`, an `error` event →
the OpenAI error envelope as a data event; `ping`, and event types Anthropic may add, are dropped.

Two ways to plug it into api/streaming.py's relay. As is, it makes an OpenAI upstream's stream,
usage chunk and `[DONE]` included, which the relay reads as it reads one (it hides the usage chunk
from a client that did not ask, and sends its own `[DONE]` once the usage is recorded). Or, to
spare decoding every chunk again, with `usage_chunk=False, done=False`: the relay sends `feed`'s
bytes on as they are, bills `usage` (`usage_estimated`, `generated_bytes`, `failure`, `finished`
say how the stream went) and ends with `final_usage_chunk()` if asked for, then `[DONE]`.

`usage` is exact once `message_delta` came; before that (a stream cut short) the input is
message_start's exact count and the output estimated from the text generated.
"""

from __future__ import annotations

import time
from typing import Final

import msgspec

from spendledger.api.anthropic.errors import OpenAIError, from_stream_event
from spendledger.api.anthropic.response import AnthropicUsage, finish_reason, openai_usage
from spendledger.api.usage_block import Usage, estimate_tokens


class _StartMessage(msgspec.Struct, frozen=True):
    id: str = ""
    model: str = ""
    usage: AnthropicUsage | None = None


class _Block(msgspec.Struct, frozen=True):
    type: str = ""
    id: str = ""
    name: str = ""
    text: str = ""


class _Delta(msgspec.Struct, frozen=True):
    """A content block's delta, or message_delta's: one Struct for both, as both are `delta`."""

    type: str = ""
    text: str = ""
    partial_json: str = ""
    thinking: str = ""
    stop_reason: str | None = None


class _Error(msgspec.Struct, frozen=True):
    type: str = "api_error"
    message: str = ""


class _Event(msgspec.Struct, frozen=True):
    type: str = ""
    message: _StartMessage | None = None
    index: int = 0
    content_block: _Block | None = None
    delta: _Delta | None = None
    usage: AnthropicUsage | None = None
    error: _Error | None = None


_decoder: Final = msgspec.json.Decoder(_Event)
_encode: Final = msgspec.json.Encoder().encode
_CHUNK_END: Final = b',"logprobs":null,"finish_reason":null}]}\n\n'
_CONTENT_END: Final = b"}" + _CHUNK_END
_DONE: Final = b"data: [DONE]\n\n"
_DELTA_EVENT: Final = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
_AFTER_DELTA_EVENT: Final = len(_DELTA_EVENT)
_TEXT_DELTA: Final = b'"delta":{"type":"text_delta","text":'
_AFTER_TEXT_DELTA: Final = 1 + len(_TEXT_DELTA)
_string_decoder: Final = msgspec.json.Decoder(str)


class StreamTranslator:
    """One Anthropic stream's translation; `model` names the model in the chunks (by default the
    one message_start names)."""

    def __init__(
        self, model: str | None = None, *, usage_chunk: bool = True, done: bool = True, secret: str | None = None
    ) -> None:
        self._model = model
        self._inline_usage = usage_chunk  # the usage chunk after the finish chunk (else final_usage_chunk())
        self._done = done  # `[DONE]` at message_stop (else the caller ends the stream)
        self._secret = secret
        self._crlf: bool | None = None  # whether the provider ends lines with CRLF (seen on its first)
        self._created = int(time.time())
        self._buffer = b""
        self._head = b""  # every chunk's bytes up to its delta, once message_start named the message
        self._content_head = b""  # and a text delta's, up to its text
        self._usage_head = b""
        self._tool_calls: dict[int, int] = {}  # content block index → tool call index
        self._started: AnthropicUsage | None = None
        self._final: AnthropicUsage | None = None
        self.generated_bytes = 0
        self.stop_reason: str | None = None
        self.finished = False  # message_stop came: the stream ended as Anthropic ends one
        self.failure: OpenAIError | None = None  # an error event came: the stream failed

    def feed(self, data: bytes) -> bytes:
        """The OpenAI SSE bytes for the events completed by `data` (b"" while one is incomplete)."""
        buffer = self._buffer + data if self._buffer else data
        if self._crlf is None and b"\n" in data:
            self._crlf = b"\r\n" in buffer
        if self._crlf:
            buffer = buffer.replace(b"\r\n", b"\n")
        end = buffer.find(b"\n\n")
        if end == len(buffer) - 2:  # the common case: the bytes end with the one event they hold
            self._buffer = b""
            return self._event(buffer[:end])
        out = []
        start = 0
        while end >= 0:
            out.append(self._event(buffer[start:end]))
            start = end + 2
            end = buffer.find(b"\n\n", start)
        self._buffer = buffer[start:]
        return b"".join(out)

    def close(self) -> bytes:
        """The bytes for an event the stream ended in without its blank line, if any."""
        rest, self._buffer = self._buffer.strip(), b""
        return self._event(rest) if rest else b""

    @property
    def usage(self) -> Usage | None:
        """What the stream used so far (None before message_start)."""
        merged = self._merged()
        return None if merged is None else openai_usage(merged).usage()

    def _merged(self) -> AnthropicUsage | None:
        if self._started is None and self._final is None:
            return None
        started, final = self._started or AnthropicUsage(), self._final
        if final is None:  # cut short: the output Anthropic has not counted yet is estimated
            estimate = estimate_tokens(self.generated_bytes) if self.generated_bytes else 0
            return msgspec.structs.replace(started, output_tokens=max(started.output_tokens or 0, estimate))
        # message_delta's counts are cumulative; the fields it leaves out are message_start's.
        return AnthropicUsage(
            input_tokens=_first(final.input_tokens, started.input_tokens),
            output_tokens=_first(final.output_tokens, started.output_tokens),
            cache_creation_input_tokens=_first(final.cache_creation_input_tokens, started.cache_creation_input_tokens),
            cache_read_input_tokens=_first(final.cache_read_input_tokens, started.cache_read_input_tokens),
        )

    @property
    def usage_estimated(self) -> bool:
        return self._final is None

    def _event(self, event: bytes) -> bytes:
        # Most events are text deltas, laid out by Anthropic byte for byte alike: their text (a
        # JSON string, checked to be exactly one) is copied as encoded, not decoded and encoded again.
        if event.startswith(_DELTA_EVENT) and self._head:
            comma = event.find(b",", _AFTER_DELTA_EVENT)
            if event.startswith(_TEXT_DELTA, comma + 1) and event.endswith(b"}}"):
                text = event[comma + _AFTER_TEXT_DELTA : -2]
                try:
                    filled = _string_decoder.decode(text)
                except msgspec.DecodeError:
                    filled = None  # another shape than Anthropic's today: read it the long way
                if filled is not None:
                    if not filled:
                        return b""
                    self.generated_bytes += len(text) - 2
                    return self._content_head + text + _CONTENT_END
        payload = _data_of(event)
        if not payload:
            return b""
        try:
            parsed = _decoder.decode(payload)
        except msgspec.DecodeError:
            return b""  # not an event of Anthropic's: nothing an OpenAI client could read
        kind = parsed.type
        if kind == "content_block_delta" and parsed.delta is not None:
            return self._delta(parsed.index, parsed.delta)
        if kind == "message_start" and parsed.message is not None:
            return self._start(parsed.message)
        if kind == "content_block_start" and parsed.content_block is not None:
            return self._block_start(parsed.index, parsed.content_block)
        if kind == "message_delta":
            return self._message_delta(parsed)
        if kind == "message_stop":
            self.finished = True
            return _DONE if self._done else b""
        if kind == "error":
            error = parsed.error or _Error()
            self.failure = from_stream_event(error.type, error.message, secret=self._secret)
            return b"data: " + self.failure.envelope() + b"\n\n"
        return b""  # ping, content_block_stop, and types Anthropic may add

    def _start(self, message: _StartMessage) -> bytes:
        self._started = message.usage
        self._set_head(message.id, self._model or message.model)
        return self._head + b'{"role":"assistant","content":""}' + _CHUNK_END

    def _set_head(self, message_id: str, model: str) -> None:
        common = b'data: {"id":%b,"object":"chat.completion.chunk","created":%d,"model":%b,"choices":' % (
            _encode(message_id), self._created, _encode(model),
        )  # fmt: skip
        self._head = common + b'[{"index":0,"delta":'
        self._content_head = self._head + b'{"content":'
        self._usage_head = common + b'[],"usage":'

    def _block_start(self, index: int, block: _Block) -> bytes:
        if block.type == "tool_use":
            call = self._tool_calls[index] = len(self._tool_calls)
            self.generated_bytes += len(block.name)
            delta = b'{"tool_calls":[{"index":%d,"id":%b,"type":"function","function":{"name":%b,"arguments":""}}]}' % (
                call, _encode(block.id), _encode(block.name),
            )  # fmt: skip
            return self._chunk(delta)
        if block.type == "text" and block.text:
            return self._text(b"content", block.text)
        return b""

    def _delta(self, index: int, delta: _Delta) -> bytes:
        if delta.type == "text_delta":
            return self._text(b"content", delta.text) if delta.text else b""
        if delta.type == "input_json_delta":
            call = self._tool_calls.get(index)
            if call is None or not delta.partial_json:
                return b""
            self.generated_bytes += len(delta.partial_json)
            return self._chunk(b'{"tool_calls":[{"index":%d,"function":{"arguments":%b}}]}' % (call, _encode(delta.partial_json)))
        if delta.type == "thinking_delta":
            return self._text(b"reasoning_content", delta.thinking) if delta.thinking else b""
        return b""  # signature_delta, citations_delta: nothing in OpenAI's format carries them

    def _text(self, field: bytes, text: str) -> bytes:
        encoded = _encode(text)
        self.generated_bytes += len(encoded) - 2  # near enough: escapes count as the bytes they take
        return self._chunk(b'{"%b":%b}' % (field, encoded))

    def _chunk(self, delta: bytes) -> bytes:
        if not self._head:  # a block before message_start (never seen): chunks still need a head
            self._set_head("", self._model or "")
        return self._head + delta + _CHUNK_END

    def _message_delta(self, event: _Event) -> bytes:
        if event.delta is not None and event.delta.stop_reason is not None:
            self.stop_reason = event.delta.stop_reason
        if event.usage is not None:
            self._final = event.usage
        if not self._head:
            self._set_head("", self._model or "")
        reason = finish_reason(self.stop_reason).encode()
        out = self._head + b'{},"logprobs":null,"finish_reason":"' + reason + b'"}]}\n\n'
        return out + self.final_usage_chunk() if self._inline_usage else out

    def final_usage_chunk(self) -> bytes:
        """The usage chunk (`choices: []`) for the usage so far; b"" before message_start."""
        merged = self._merged()
        if merged is None:
            return b""
        return self._usage_head + _encode(openai_usage(merged)) + b"}\n\n"


def _first(*counts: int | None) -> int | None:
    return next((c for c in counts if c is not None), None)


def _data_of(event: bytes) -> bytes:
    """The data of one SSE event (its `data:` lines, joined as the SSE rules join them)."""
    at = event.find(b"data:")
    if at < 0:
        return b""
    if (at == 0 or event[at - 1] == 0x0A) and event.find(b"\n", at) < 0:  # Anthropic's: one data line, last
        return event[at + 6 :] if event[at + 5 : at + 6] == b" " else event[at + 5 :]
    return _data_lines(event)


def _data_lines(event: bytes) -> bytes:
    lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines)
