"""The CPU the whole gateway spends per request on an Anthropic deployment against an OpenAI one
(issue 22: the translation may add at most 0.2 ms).

One `spendledger serve` (one worker, real PostgreSQL, no sinks) with two deployments on one fast
local fake that speaks both APIs: `openai/` → its `/v1/chat/completions`, `anthropic/` → its
`/v1/messages`. Both are sent the same OpenAI chat request (scripts/bench/anthropic_translation.py's
REQUEST: a system prompt, three turns, a tool; ~2 KB) and answered the same reply (150 words) and
usage, as a JSON answer or, streamed, one SSE event per word (OpenAI's chunks with its usage chunk,
or Anthropic's events), each written on its own after `--event-gap-ms`. `wrk -c --connections`
loads each target for `--duration` s, the four targets alternating, `--rounds` times (after a
warm-up of each); the server's CPU time (its process tree, psutil or /proc) over the requests wrk
completed is its CPU per request; what Anthropic adds is the median of the rounds' differences.
Prints the runs and the table; writes nothing (docs/benchmarks.md is written by hand).

    .venv/bin/python scripts/bench/anthropic_proxy.py [--duration 10] [--rounds 3] [--connections 16]

The fake is this file run as `--serve-fake PORT` (an asyncio protocol over httptools on uvloop,
as scripts/bench/fake_upstream.py's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httptools
import httpx
import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.bench.anthropic_translation import REPLY, REQUEST
from scripts.bench.fake_upstream import HttpConnection, response
from scripts.bench.proxy import MASTER_KEY, SPENDLEDGER, Meter, Run, Target, free_port, started, wrk
from spendledger.ledger.db import EmbeddedDatabase

TARGET_MS = 0.2
USAGE = {"input_tokens": 520, "output_tokens": 160, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
OPENAI_USAGE = {"prompt_tokens": 520, "completion_tokens": 160, "total_tokens": 680}
WORDS = REPLY.split(" ")
GROUPS = {"openai": "gpt-group", "anthropic": "claude-group"}


# --- the fake: both providers' answers, built once -------------------------------------------------


def _openai_answer() -> bytes:
    return msgspec.json.encode({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": REPLY, "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": OPENAI_USAGE,
    })  # fmt: skip


def _openai_events() -> list[bytes]:
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": "gpt-4o-mini"}
    chunks: list[dict[str, Any]] = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                          "logprobs": None, "finish_reason": None}]}]  # fmt: skip
    chunks += [{**base, "choices": [{"index": 0, "delta": {"content": w if i == 0 else f" {w}"}, "logprobs": None,
                                     "finish_reason": None}]} for i, w in enumerate(WORDS)]  # fmt: skip
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]})
    chunks.append({**base, "choices": [], "usage": OPENAI_USAGE})
    return [b"data: " + msgspec.json.encode(c) + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]


def _anthropic_answer() -> bytes:
    return msgspec.json.encode({
        "id": "msg_bench", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": REPLY}], "stop_reason": "end_turn", "stop_sequence": None, "usage": USAGE,
    })  # fmt: skip


def _anthropic_events() -> list[bytes]:
    def event(name: str, **data: Any) -> bytes:
        return b"event: %b\ndata: %b\n\n" % (name.encode(), msgspec.json.encode({"type": name, **data}))

    message: dict[str, Any] = {"id": "msg_bench", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
               "content": [], "stop_reason": None, "stop_sequence": None, "usage": {**USAGE, "output_tokens": 1}}  # fmt: skip
    return [
        event("message_start", message=message),
        event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        event("ping"),
        *(event("content_block_delta", index=0, delta={"type": "text_delta", "text": w if i == 0 else f" {w}"})
          for i, w in enumerate(WORDS)),
        event("content_block_stop", index=0),
        event("message_delta", delta={"stop_reason": "end_turn", "stop_sequence": None}, usage={"output_tokens": 160}),
        event("message_stop"),
    ]  # fmt: skip


class _FakeProviders(HttpConnection):
    """scripts/bench/fake_upstream.py's connection, answering OpenAI's chat completions and
    Anthropic's messages, a stream (chunked, an event a write) when the body asks for one."""

    answers = {"openai": _openai_answer(), "anthropic": _anthropic_answer()}
    events = {"openai": _openai_events(), "anthropic": _anthropic_events()}
    gap_s = 0.0

    def __init__(self) -> None:
        super().__init__(lambda request: (404, b"{}"))

    def on_message_complete(self) -> None:
        path = httptools.parse_url(self._url).path.decode()
        body = b"".join(self._body)
        kind = "anthropic" if path.endswith("/v1/messages") else "openai" if path.endswith("/chat/completions") else None
        close = not self._parser.should_keep_alive()
        if kind is None:
            self._send(response(404, b"{}", close=close), close=close)
        elif b'"stream":true' not in body:
            self._send(response(200, self.answers[kind], close=close), close=close)
        else:
            self._stream(self.events[kind], close)

    def _stream(self, events: list[bytes], close: bool) -> None:
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
        self._send(head + (b"connection: close\r\n\r\n" if close else b"\r\n"), close=False)
        self._next_event(iter(events), close)

    def _next_event(self, events: Iterator[bytes], close: bool) -> None:
        """One event, then the next after the gap (chained: timers due together may fire in any order)."""
        event = next(events, None)
        if event is None:
            self._send(b"0\r\n\r\n", close=close)
            return
        self._send(b"%x\r\n%b\r\n" % (len(event), event), close=False)
        asyncio.get_running_loop().call_later(self.gap_s, self._next_event, events, close)


def serve_fake(port: int, gap_ms: float) -> None:
    import uvloop

    _FakeProviders.gap_s = gap_ms / 1000

    async def run() -> None:
        server = await asyncio.get_running_loop().create_server(_FakeProviders, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    uvloop.run(run())


# --- the benchmark ----------------------------------------------------------------------------------


def config(fake: str) -> str:
    prices = "    model_info: {input_cost_per_token: 0.000003, output_cost_per_token: 0.000015}\n"
    return (
        f"model_list:\n  - model_name: {GROUPS['openai']}\n    litellm_params:\n      model: openai/gpt-4o-mini\n"
        f"      api_base: {fake}/v1\n      api_key: sk-bench-openai\n{prices}"
        f"  - model_name: {GROUPS['anthropic']}\n    litellm_params:\n      model: anthropic/claude-sonnet-4-5\n"
        f"      api_base: {fake}\n      api_key: sk-ant-bench\n{prices}"
        f"general_settings:\n  master_key: {MASTER_KEY}\n"
    )


def request_body(provider: str, stream: bool) -> str:
    return json.dumps({**REQUEST, "model": GROUPS[provider], **({"stream": True} if stream else {})})


def check(url: str, token: str, body: str, stream: bool) -> None:
    """One request each before measuring: answered 200 with the whole reply."""
    reply = httpx.post(f"{url}/chat/completions", content=body, timeout=60,
                       headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})  # fmt: skip
    text = reply.text
    if reply.status_code != 200 or (stream and not text.endswith("data: [DONE]\n\n")) or WORDS[-1] not in text:
        raise SystemExit(f"answered {reply.status_code}: {text[:500]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of each measured run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--event-gap-ms", type=float, default=0.2, help="between a stream's events")
    parser.add_argument("--serve-fake", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fake:
        serve_fake(args.serve_fake, args.event_gap_ms)
        return
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: apt-get update && apt-get install -y wrk")
    workdir = Path(tempfile.mkdtemp(prefix="sl-bench-anthropic-", dir="/tmp"))
    database: EmbeddedDatabase | None = None
    try:
        database = EmbeddedDatabase(workdir / "pg")
        with contextlib.ExitStack() as stack:
            bench(args, workdir, database, stack)
    finally:
        if database is not None:
            database.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def bench(args: argparse.Namespace, workdir: Path, database: EmbeddedDatabase, stack: contextlib.ExitStack) -> None:
    port = free_port()
    fake_process = stack.enter_context(_fake(port, args.event_gap_ms, workdir))
    (workdir / "spendledger.yaml").write_text(config(f"http://127.0.0.1:{port}"))
    server_port = free_port()
    argv = [*SPENDLEDGER, "serve", "--config", str(workdir / "spendledger.yaml"), "--host", "127.0.0.1",
            "--port", str(server_port), "--workers", "1"]  # fmt: skip
    server = stack.enter_context(started(
        "spendledger", argv, workdir, f"http://127.0.0.1:{server_port}", "/health/readiness",
        env={"DATABASE_URL": database.url}, timeout_s=120,
    ))  # fmt: skip
    admin = {"Authorization": f"Bearer {MASTER_KEY}"}
    key = httpx.post(f"{server.url}/key/generate", json={"key_alias": "bench"}, headers=admin, timeout=30)
    key.raise_for_status()
    token = key.json()["key"]
    targets = {
        (provider, stream): Target(f"{provider} {'stream' if stream else 'answer'}", server.url, token,
                                   request_body(provider, stream))
        for stream in (False, True) for provider in ("openai", "anthropic")
    }  # fmt: skip
    for (_, stream), target in targets.items():
        check(server.url, token, target.body, stream)
    meter = Meter({"spendledger": server.process.pid, "fake": fake_process.pid})
    for target in targets.values():
        wrk(target, args.connections, args.warmup, meter)
    per_request: dict[tuple[str, bool], list[float]] = {key: [] for key in targets}
    for round_ in range(args.rounds):
        for key_, target in targets.items():
            run = wrk(target, args.connections, args.duration, meter)
            ms = cpu_ms_per_request(run)
            per_request[key_].append(ms)
            print(f"round {round_ + 1}  {target.name:<17} {run.requests:7,} requests {run.rps:8,.0f} req/s  "
                  f"p50 {run.p50_ms:6.2f} ms  errors {sum(run.errors.values())}  server CPU {ms:.4f} ms/request",
                  flush=True)  # fmt: skip
    report(per_request, args)


@contextlib.contextmanager
def _fake(port: int, gap_ms: float, workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The fake providers in a process of their own, ready once their port answers."""
    log = (workdir / "fake.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve-fake", str(port), "--event-gap-ms", str(gap_ms)], stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the fake did not start:\n{(workdir / 'fake.log').read_text()}")
            time.sleep(0.1)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def cpu_ms_per_request(run: Run) -> float:
    """The server's CPU seconds over the run (cores × seconds) per completed request, in ms."""
    return run.cpu["spendledger"] * run.seconds / max(1, run.requests) * 1000


def report(per_request: dict[tuple[str, bool], list[float]], args: argparse.Namespace) -> None:
    print(f"\nServer CPU per request, ms (medians of {args.rounds} rounds of {args.duration:g} s; added: the "
          f"median of the rounds' differences; "
          f"wrk -c{args.connections}; stream events {args.event_gap_ms:g} ms apart; {len(WORDS)} words)\n")  # fmt: skip
    print(f"| {'request':<8} | {'OpenAI':>8} | {'Anthropic':>9} | {'added':>7} | rounds' added |")
    print(f"|{'-' * 10}|{'-' * 10}|{'-' * 11}|{'-' * 9}|{'-' * 15}|")
    verdicts = []
    for stream in (False, True):
        openai, anthropic = per_request[("openai", stream)], per_request[("anthropic", stream)]
        # A round's two runs are seconds apart: their difference is the fairer measure
        # on a machine whose other load changes, so "added" is the median of the rounds' differences.
        differences = [a - o for o, a in zip(openai, anthropic, strict=True)]
        added = statistics.median(differences)
        each = " ".join(f"{d:+.3f}" for d in differences)
        label = "stream" if stream else "answer"
        print(f"| {label:<8} | {statistics.median(openai):8.4f} | {statistics.median(anthropic):9.4f} | "
              f"{added:+7.4f} | {each} |")  # fmt: skip
        verdicts.append(f"{label}: {added:+.4f} ms, {'within' if added <= TARGET_MS else 'OVER'} the {TARGET_MS} ms target")
    print("\nAnthropic adds, per request — " + "; ".join(verdicts))


if __name__ == "__main__":
    main()
