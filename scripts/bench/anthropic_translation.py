"""The CPU an Anthropic deployment adds to a request (issue 22: at most 0.2 ms over an OpenAI one).

A typical chat request (a system prompt, a few turns, a tool; ~2 KB) and its answer (~150 words),
plain and streamed (one event per word), through each path's own per-request work, in this
process, on one core:

- OpenAI: the proxy's parse of the request (`decode_body`, `upstream_body`), of the answer's usage,
  and, streamed, the relay's decoding of every chunk (as api/streaming.py's `StreamRelay._pass`).
- Anthropic: the same parse of the request (the proxy validates it whatever the provider), then
  `to_messages_request`; `to_openai_response` for the answer; streamed, `StreamTranslator.feed` of
  Anthropic's events, either followed by the relay's decoding of the chunks it gives ("relay
  decodes": the translator plugged in as an OpenAI upstream) or not ("relay trusts": the relay
  sends the translator's bytes on and bills its `usage`).

CPU time (`time.process_time`) per request: the best of --repeats runs of --iterations each.
Prints the table; writes nothing (the numbers go into docs/benchmarks.md by hand).

    .venv/bin/python scripts/bench/anthropic_translation.py [--iterations 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from spendledger.api.anthropic.request import to_messages_request
from spendledger.api.anthropic.response import to_openai_response
from spendledger.api.anthropic.stream import StreamTranslator
from spendledger.api.proxy import _usage_decoder
from spendledger.api.request_body import decode_body, upstream_body
from spendledger.api.streaming import _chunk_decoder
from spendledger.ledger.config import Deployment

TARGET_MS = 0.2
FORECAST = ("The forecast for Paris shows light rain in the morning, clearing by the afternoon with "
            "temperatures around eighteen degrees and a gentle breeze from the west.")  # fmt: skip
WORDS = FORECAST.split()
REPLY = " ".join(WORDS[i % len(WORDS)] for i in range(150))
REQUEST: dict[str, Any] = {
    "model": "claude-group",
    "messages": [
        {"role": "system", "content": "You are a helpful travel assistant. " * 8},
        {"role": "user", "content": "I am going to Paris next week. " * 10},
        {"role": "assistant", "content": "Paris is lovely in spring. " * 12},
        {"role": "user", "content": [{"type": "text", "text": "What should I pack for the weather? " * 6}]},
    ],
    "tools": [{"type": "function", "function": {
        "name": "get_weather", "description": "The forecast for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }}],
    "max_tokens": 500,
    "temperature": 0.7,
    "user": "customer-42",
}  # fmt: skip
USAGE = {"input_tokens": 520, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0, "output_tokens": 160}


def openai_answer() -> bytes:
    return msgspec.json.encode({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": REPLY, "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 520, "completion_tokens": 160, "total_tokens": 680},
    })  # fmt: skip


def anthropic_answer() -> bytes:
    return msgspec.json.encode({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": REPLY}], "stop_reason": "end_turn", "stop_sequence": None, "usage": USAGE,
    })  # fmt: skip


def openai_stream() -> list[bytes]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
    words = REPLY.split(" ")
    chunks = [{**base, "choices": [{"index": 0, "delta": {"content": w if i == 0 else f" {w}"}, "finish_reason": None}]}
              for i, w in enumerate(words)]  # fmt: skip
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    chunks.append({**base, "choices": [], "usage": {"prompt_tokens": 520, "completion_tokens": 160, "total_tokens": 680}})
    return [b"data: " + msgspec.json.encode(c) + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]


def anthropic_stream() -> list[bytes]:
    def event(name: str, **data: Any) -> bytes:
        return b"event: %b\ndata: %b\n\n" % (name.encode(), msgspec.json.encode({"type": name, **data}))

    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5", "content": [],
               "stop_reason": None, "stop_sequence": None, "usage": {**USAGE, "output_tokens": 1}}  # fmt: skip
    words = REPLY.split(" ")
    return [
        event("message_start", message=message),
        event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        event("ping"),
        *(event("content_block_delta", index=0, delta={"type": "text_delta", "text": w if i == 0 else f" {w}"})
          for i, w in enumerate(words)),
        event("content_block_stop", index=0),
        event("message_delta", delta={"stop_reason": "end_turn", "stop_sequence": None}, usage={"output_tokens": 160}),
        event("message_stop"),
    ]  # fmt: skip


def relay_parse(frames: list[bytes]) -> int:
    """What api/streaming.py's relay does per event: split, decode, keep usage, count bytes."""
    generated = 0
    buffer = b""
    for data in frames:
        buffer += data
        while (end := buffer.find(b"\n\n")) >= 0:
            event, buffer = buffer[: end + 2], buffer[end + 2 :]
            payload = event[5:].strip()
            if payload == b"[DONE]":
                continue
            chunk = _chunk_decoder.decode(payload)
            generated += sum(choice.generated_bytes() for choice in chunk.choices)
    return generated


def cpu_ms(work: Callable[[], object], iterations: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(iterations):
            work()
        best = min(best, time.process_time() - start)
    return best / iterations * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    raw = msgspec.json.encode(REQUEST)
    # upstream_body reads only the deployment's upstream model (the rest of Deployment is not needed)
    deployment = cast(Deployment, SimpleNamespace(upstream_model="gpt-4o-mini"))
    o_answer, a_answer = openai_answer(), anthropic_answer()
    o_stream, a_stream = openai_stream(), anthropic_stream()

    def openai_request() -> object:
        return upstream_body(decode_body(raw), raw, deployment)

    def anthropic_request() -> object:
        decode_body(raw)
        return to_messages_request(raw, "claude-sonnet-4-5")

    def anthropic_stream_decoded() -> object:
        translator = StreamTranslator()
        return relay_parse([translator.feed(frame) for frame in a_stream])

    def anthropic_stream_trusted() -> object:
        translator = StreamTranslator(usage_chunk=False, done=False)
        sent = [translator.feed(frame) for frame in a_stream]
        return sent, translator.usage, translator.final_usage_chunk()

    measured = {
        "request": (cpu_ms(openai_request, args.iterations, args.repeats),
                    cpu_ms(anthropic_request, args.iterations, args.repeats)),
        "answer": (cpu_ms(lambda: _usage_decoder.decode(o_answer), args.iterations, args.repeats),
                   cpu_ms(lambda: to_openai_response(a_answer), args.iterations, args.repeats)),
    }  # fmt: skip
    streamed = cpu_ms(lambda: relay_parse(o_stream), args.iterations // 4, args.repeats)
    measured[f"stream, relay decodes ({len(a_stream)} events)"] = (
        streamed, cpu_ms(anthropic_stream_decoded, args.iterations // 4, args.repeats)
    )
    measured[f"stream, relay trusts ({len(a_stream)} events)"] = (
        streamed, cpu_ms(anthropic_stream_trusted, args.iterations // 4, args.repeats)
    )
    print(f"CPU per request, ms (best of {args.repeats} × {args.iterations}; request {len(raw):,} B, "
          f"answer {len(a_answer):,} B)\n")  # fmt: skip
    print(f"| {'part':<34} | {'OpenAI':>8} | {'Anthropic':>9} | {'added':>7} |")
    print(f"|{'-' * 36}|{'-' * 10}|{'-' * 11}|{'-' * 9}|")
    added = {part: anthropic - openai for part, (openai, anthropic) in measured.items()}
    for part, (openai, anthropic) in measured.items():
        print(f"| {part:<34} | {openai:8.4f} | {anthropic:9.4f} | {added[part]:7.4f} |")
    print()
    for label, parts in (("plain", ("request", "answer")), *((p, ("request", p)) for p in measured if p.startswith("stream"))):
        total = sum(added[p] for p in parts)
        verdict = "within" if total <= TARGET_MS else "OVER"
        print(f"Anthropic adds {total:.4f} ms of CPU per request ({label}): {verdict} the {TARGET_MS} ms target")


if __name__ == "__main__":
    main()
