"""Anthropic SSE streams → OpenAI chat.completion.chunk events (api/anthropic/stream.py): fed in
pieces cut anywhere, each chunk a valid `ChatCompletionChunk` of the openai SDK, the usage kept."""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletionChunk

from spendledger.api.anthropic.stream import StreamTranslator
from spendledger.ledger.tokens import TokenUsage


def event(name: str, **data: Any) -> bytes:
    return b"event: %b\ndata: %b\n\n" % (name.encode(), msgspec.json.encode({"type": name, **data}))


START = event("message_start", message={
    "id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "claude-sonnet-4-5",
    "stop_reason": None, "stop_sequence": None,
    "usage": {"input_tokens": 25, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 100, "output_tokens": 1},
})  # fmt: skip
TEXT = [
    event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
    event("ping"),
    event("content_block_delta", index=0, delta={"type": "text_delta", "text": "Hello"}),
    event("content_block_delta", index=0, delta={"type": "text_delta", "text": ' "world" ✓'}),
    event("content_block_stop", index=0),
]
TOOL = [
    event("content_block_start", index=1, content_block={"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}),
    event("content_block_delta", index=1, delta={"type": "input_json_delta", "partial_json": ""}),
    event("content_block_delta", index=1, delta={"type": "input_json_delta", "partial_json": '{"city": "Pa'}),
    event("content_block_delta", index=1, delta={"type": "input_json_delta", "partial_json": 'ris"}'}),
    event("content_block_stop", index=1),
]  # fmt: skip
END_TOOL = [
    event("message_delta", delta={"stop_reason": "tool_use", "stop_sequence": None}, usage={"output_tokens": 15}),
    event("message_stop"),
]
STREAM = b"".join([START, *TEXT, *TOOL, *END_TOOL])


def chunks(out: bytes) -> list[dict[str, Any]]:
    """The data events of `out`, each checked by the openai SDK's own model; `[DONE]` as None."""
    assert out.endswith(b"\n\n")
    decoded = []
    for frame in out.split(b"\n\n")[:-1]:
        assert frame.startswith(b"data: ")
        payload = frame[6:]
        if payload == b"[DONE]":
            decoded.append(None)
            continue
        value = msgspec.json.decode(payload)
        if "error" not in value:
            ChatCompletionChunk.model_validate(value)
        decoded.append(value)
    return decoded


def translate(data: bytes, sizes: list[int] | None = None) -> tuple[StreamTranslator, bytes]:
    translator = StreamTranslator()
    out = b""
    position = 0
    for size in sizes or [len(data)]:
        out += translator.feed(data[position : position + size])
        position += size
    out += translator.feed(data[position:]) + translator.close()
    return translator, out


def test_text_and_tool_call_stream() -> None:
    translator, out = translate(STREAM)
    events = chunks(out)
    deltas = [e["choices"][0]["delta"] for e in events if e and e["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content", "") for d in deltas) == 'Hello "world" ✓'
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0] == {"index": 0, "id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city": "Paris"}'
    finishing = [e for e in events if e and e["choices"] and e["choices"][0]["finish_reason"]]
    assert [e["choices"][0]["finish_reason"] for e in finishing] == ["tool_calls"]
    assert all(e is None or (e["id"], e["model"], e["object"]) == ("msg_1", "claude-sonnet-4-5", "chat.completion.chunk")
               for e in events)  # fmt: skip
    assert events[-1] is None  # [DONE]
    assert translator.finished and translator.failure is None and translator.stop_reason == "tool_use"


def test_the_usage_chunk_comes_after_the_finish_and_the_usage_is_kept() -> None:
    translator, out = translate(STREAM)
    events = chunks(out)
    usage_chunk = events[-2]
    assert usage_chunk is not None and usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {
        "prompt_tokens": 125, "completion_tokens": 15, "total_tokens": 140,
        "prompt_tokens_details": {"cached_tokens": 100, "cache_creation_tokens": 0},
        "cache_creation_input_tokens": 0, "cache_read_input_tokens": 100,
    }  # fmt: skip
    assert translator.usage is not None and not translator.usage_estimated
    assert translator.usage.tokens() == TokenUsage(input_tokens=125, output_tokens=15, cached_input_tokens=100)


def test_message_delta_counts_override_message_starts() -> None:
    # The API's newer message_delta repeats the input counts (cumulative): they are the final ones.
    end = event("message_delta", delta={"stop_reason": "end_turn"},
                usage={"input_tokens": 30, "cache_read_input_tokens": 100, "output_tokens": 9})  # fmt: skip
    translator, _ = translate(START + b"".join(TEXT) + end + event("message_stop"))
    assert translator.usage is not None
    assert translator.usage.tokens() == TokenUsage(input_tokens=130, output_tokens=9, cached_input_tokens=100)


def test_a_stream_cut_short_has_exact_input_and_estimated_output() -> None:
    translator, out = translate(START + b"".join(TEXT))
    assert not translator.finished
    assert translator.usage_estimated
    assert translator.usage is not None
    tokens = translator.usage.tokens()
    assert tokens.input_tokens == 125 and tokens.cached_input_tokens == 100
    assert tokens.output_tokens == max(1, translator.generated_bytes // 4) >= 1
    assert all(e is not None and "usage" not in e for e in chunks(out))


def test_nothing_before_message_start_means_no_usage() -> None:
    assert StreamTranslator().usage is None


def test_an_error_event_becomes_the_openai_envelope_and_a_failure() -> None:
    error = event("error", error={"type": "overloaded_error", "message": "Overloaded"})
    translator, out = translate(START + TEXT[0] + TEXT[2] + error)
    last = chunks(out)[-1]
    assert last == {"error": {"message": "AnthropicException - Overloaded", "type": "overloaded_error",
                              "param": None, "code": "500"}}  # fmt: skip
    assert translator.failure is not None and translator.failure.retryable
    assert not translator.finished


def test_ping_unknown_events_and_garbage_are_dropped() -> None:
    odd = event("ping") + event("brand_new_event", foo=1) + b"data: {not json\n\n" + b": comment\n\n"
    _, out = translate(START + odd)
    assert len(chunks(out)) == 1  # the role chunk only


def test_crlf_line_endings_and_a_final_event_without_its_blank_line() -> None:
    translator, out = translate(STREAM.replace(b"\n", b"\r\n").removesuffix(b"\r\n\r\n"))
    assert translator.finished
    assert chunks(out)[-1] is None


def test_thinking_deltas_become_reasoning_content() -> None:
    thinking = [
        event("content_block_start", index=0, content_block={"type": "thinking", "thinking": ""}),
        event("content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": "Hmm."}),
        event("content_block_delta", index=0, delta={"type": "signature_delta", "signature": "abc"}),
        event("content_block_stop", index=0),
    ]
    _, out = translate(START + b"".join(thinking))
    deltas = [e["choices"][0]["delta"] for e in chunks(out) if e]
    assert deltas[1:] == [{"reasoning_content": "Hmm."}]


def test_the_model_named_can_be_the_callers() -> None:
    translator = StreamTranslator("my-claude")
    first = chunks(translator.feed(START))[0]
    assert first is not None and first["model"] == "my-claude"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40), max_size=80))
def test_any_cutting_of_the_bytes_gives_the_same_events(sizes: list[int]) -> None:
    whole = translate(STREAM)[1]
    translator, out = translate(STREAM, sizes)
    assert _without_created(out) == _without_created(whole)
    assert translator.finished


def _without_created(out: bytes) -> list[Any]:
    return [{k: v for k, v in e.items() if k != "created"} if e else e for e in chunks(out)]


def test_without_inline_usage_and_done_the_caller_ends_the_stream() -> None:
    translator = StreamTranslator(usage_chunk=False, done=False)
    events = chunks(translator.feed(STREAM))
    assert all(e is not None and e["choices"] for e in events)  # no usage chunk, no [DONE]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    usage_chunk = chunks(translator.final_usage_chunk())
    assert usage_chunk[0] is not None and usage_chunk[0]["usage"]["completion_tokens"] == 15
    assert translator.finished
    assert StreamTranslator().final_usage_chunk() == b""


def test_a_text_delta_of_another_layout_is_read_the_long_way() -> None:
    # The same delta with its keys in another order and spaced: not the fast path's bytes.
    odd = b'event: content_block_delta\ndata: {"index": 0, "type": "content_block_delta", "delta": {"text": "Hi", "type": "text_delta"}}\n\n'
    extra = event("content_block_delta", index=0, delta={"type": "text_delta", "text": "A", "extra": 1})
    _, out = translate(START + odd + extra)
    deltas = [e["choices"][0]["delta"] for e in chunks(out) if e]
    assert deltas[1:] == [{"content": "Hi"}, {"content": "A"}]
