"""HTTP client cost per request (issue 6): the CPU our process spends to POST one chat completion.

Sends --requests POSTs of a chat-completion body (split over --rounds, variants alternating) at
--concurrency to the fast fake upstream (scripts/bench/fake_upstream.py `upstream`, in its own
process) through each way of sending it, on uvloop as the server runs. Reports the client process's CPU (time.process_time) per request and req/s per variant, checks
that the fake upstream counted every request, and with --write puts the table in docs/benchmarks.md.

    .venv/bin/python scripts/bench/http_client.py [--requests 20000] [--rounds 2] [--concurrency 64]
        [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.bench.proxy import fake_argv, free_port, started, stats
from scripts.bench.report import write_section
from spendledger.api.http_client import AiohttpTransport, DirectClient
from spendledger.ledger.sinks.http import PostTarget

try:
    from httpx_aiohttp import AiohttpTransport as PackageTransport
except ImportError:  # no longer a dependency: the "before" variants are skipped
    PackageTransport = None

TIMEOUT_S = 600.0
KEY = "bench-key"
BODY = msgspec.json.encode(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "How fast is this client?"}]}
)
Post = Callable[[], Awaitable[None]]
Close = Callable[[], Awaitable[None]]
Opener = Callable[[str], Awaitable[tuple[Post, Close]]]


@dataclass
class Variant:
    name: str
    what: str
    open: Opener  # a new client for each round
    cpu_s: float = 0.0
    wall_s: float = 0.0
    requests: int = 0
    per_round_us: list[float] = field(default_factory=list)


def _check(status: int, body: bytes) -> None:
    if status != 200 or not body.startswith(b"{"):
        raise SystemExit(f"unexpected answer {status}: {body[:200]!r}")


async def before(url: str) -> tuple[Post, Close]:
    """What api/upstream.py did: httpx-aiohttp, headers, Timeout and request built per call, client.send."""
    assert PackageTransport is not None
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    client = httpx.AsyncClient(
        transport=PackageTransport(limits=limits), limits=limits, follow_redirects=False
    )

    async def post() -> None:
        headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
        headers["authorization"] = f"Bearer {KEY}"
        timeout = httpx.Timeout(TIMEOUT_S, connect=min(10.0, TIMEOUT_S))
        request = client.build_request("POST", url, content=BODY, headers=headers, timeout=timeout)
        response = await client.send(request)
        _check(response.status_code, response.content)

    return post, client.aclose


HEADERS = {"content-type": "application/json", "accept": "application/json, text/event-stream",
           "authorization": f"Bearer {KEY}"}  # fmt: skip


def prepared(new_client: Callable[[], httpx.AsyncClient]) -> Opener:
    """api/upstream.py's way: a `PostTarget` per deployment (URL, headers, timeout built once), then
    `client.send` of its request (straight to the transport on a `DirectClient`)."""

    async def open_(url: str) -> tuple[Post, Close]:
        client = new_client()
        target = PostTarget(client, url, HEADERS, httpx.Timeout(TIMEOUT_S, connect=min(10.0, TIMEOUT_S)))

        async def post() -> None:
            response = await client.send(target.request(BODY))
            _check(response.status_code, response.content)

        return post, client.aclose

    return open_


async def raw_aiohttp(url: str) -> tuple[Post, Close]:
    """aiohttp alone, configured as our transport configures it: the floor under any httpx layer."""
    session = AiohttpTransport(1000)._new_session()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=TIMEOUT_S, connect=TIMEOUT_S)

    async def post() -> None:
        async with session.post(url, data=BODY, headers=HEADERS, timeout=timeout) as response:
            _check(response.status, await response.read())

    return post, session.close


async def measure(variant: Variant, url: str, requests: int, concurrency: int) -> None:
    post, close = await variant.open(url)
    try:
        await asyncio.gather(*(post() for _ in range(concurrency)))  # warm-up: open the connections
        left = requests

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await post()

        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        await close()
    variant.cpu_s += cpu
    variant.wall_s += wall
    variant.requests += requests
    variant.per_round_us.append(cpu / requests * 1e6)


def variants() -> list[Variant]:
    ours = [
        Variant("ours, prepared, `AsyncClient.send`", "`PostTarget` request through the client's machinery to "
                "our `AiohttpTransport`", prepared(lambda: httpx.AsyncClient(transport=AiohttpTransport(1000)))),
        Variant("**ours, prepared, direct (applied)**", "`PostTarget` request, `DirectClient.send` straight "
                "to our `AiohttpTransport`", prepared(lambda: DirectClient(AiohttpTransport(1000)))),
        Variant("aiohttp alone (reference)", "`ClientSession.post` + `read()`, no httpx at all", raw_aiohttp),
    ]  # fmt: skip
    if PackageTransport is None:
        return ours
    package = PackageTransport
    return [
        Variant("httpx-aiohttp, as before", "per call: headers dict, `httpx.Timeout`, `build_request`; "
                "`AsyncClient.send`", before),
        Variant("httpx-aiohttp, prepared, direct", "`PostTarget` request, `DirectClient.send` straight to the "
                "package's transport", prepared(lambda: DirectClient(package(limits=httpx.Limits(max_connections=1000))))),
        *ours,
    ]  # fmt: skip


def table(found: list[Variant], baseline: Variant) -> str:
    rows = [
        "| variant | what it does per request | CPU µs/request | per round | req/s | CPU vs before |",
        "|---|---|---:|---|---:|---:|",
    ]
    base = baseline.cpu_s / baseline.requests
    for v in found:
        per = v.cpu_s / v.requests
        rounds = ", ".join(f"{us:.0f}" for us in v.per_round_us)
        rows.append(f"| {v.name} | {v.what} | {per * 1e6:.0f} | {rounds} | {v.requests / v.wall_s:,.0f} | "
                    f"{per / base:.0%} |")  # fmt: skip
    return "\n".join(rows)


def findings(found: list[Variant]) -> str:
    us = {v.name.strip("*"): v.cpu_s / v.requests * 1e6 for v in found}
    applied, alone = us["ours, prepared, direct (applied)"], us["aiohttp alone (reference)"]
    lines = [f"- httpx's layer still costs {applied - alone:.0f} µs per request over aiohttp alone "
             f"({applied:.0f} vs {alone:.0f}): the `httpx.Request` and `httpx.Response` objects and their headers."]  # fmt: skip
    lines.append(f"- Skipping `AsyncClient.send` (auth, redirects, cookies, hooks) saves "
                 f"{us['ours, prepared, `AsyncClient.send`'] - applied:.0f} µs per request on our transport.")  # fmt: skip
    if "httpx-aiohttp, as before" in us:
        before, package = us["httpx-aiohttp, as before"], us["httpx-aiohttp, prepared, direct"]
        lines.insert(
            0, f"- Applied: {before:.0f} → {applied:.0f} µs of CPU per request ({applied / before - 1:+.0%})."
        )
        lines.append(f"- Preparing the request once and sending it directly saves {before - package:.0f} µs on "
                     f"httpx-aiohttp's transport; ours instead of it saves {package - applied:.0f} µs more (a cached "
                     "`ClientTimeout`, no cookie jar, short answers handed over already read).")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="per variant, over all rounds")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--write", action="store_true", help="write the section of docs/benchmarks.md")
    args = parser.parse_args()
    port = free_port()
    per_round = args.requests // args.rounds
    found = variants()
    with (
        tempfile.TemporaryDirectory() as tmp,
        started(
            "upstream", fake_argv("upstream", port), Path(tmp), f"http://127.0.0.1:{port}", "/bench/stats"
        ) as upstream,
    ):
        url = f"{upstream.url}/v1/chat/completions"
        runner = asyncio.Runner(loop_factory=_loop_factory())
        with runner:
            for round_ in range(args.rounds):
                for variant in found:
                    runner.run(measure(variant, url, per_round, args.concurrency))
                    print(f"round {round_ + 1} {variant.name}: {variant.per_round_us[-1]:.0f} µs CPU/request",
                          flush=True)  # fmt: skip
        counted = stats(upstream)[KEY]
    sent = sum(v.requests + args.concurrency * args.rounds for v in found)
    if counted != sent:
        raise SystemExit(f"the fake upstream counted {counted} requests, {sent} were sent")
    body = table(found, found[0]) + "\n\n" + findings(found)
    note = (
        f"{per_round:,} POSTs per variant and round at concurrency {args.concurrency} ({args.rounds} rounds, "
        f"variants alternating, after a warm-up of {args.concurrency}), to the fake upstream "
        f"(scripts/bench/fake_upstream.py, its own process); CPU of the client process only (`time.process_time`), event loop uvloop. The "
        f"fake upstream counted all {counted:,} requests.\n\n{body}\n"
    )
    print(note)
    if args.write:
        command = ".venv/bin/python scripts/bench/http_client.py " + " ".join(sys.argv[1:])
        write_section("HTTP client cost per request (issue 6)", command.strip(), note, "")


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.new_event_loop
    return None


if __name__ == "__main__":
    main()
