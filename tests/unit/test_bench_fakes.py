"""The benchmark's fakes (scripts/bench/fake_upstream.py) speak HTTP/1.1 as its clients need it:
keep-alive, pipelining, chunked bodies, `Connection: close`, and a 400 for what they cannot parse."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import pytest

from scripts.bench.fake_upstream import COMPLETION, serve, sinks_app, upstream_app


async def _served(app_name: str) -> tuple[asyncio.Task[None], int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    app = upstream_app() if app_name == "upstream" else sinks_app()
    task = asyncio.create_task(serve(app, "127.0.0.1", port))
    for _ in range(100):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.01)
        else:
            writer.close()
            return task, port
    raise AssertionError("the fake did not start")


@pytest.fixture
async def upstream() -> AsyncIterator[int]:
    task, port = await _served("upstream")
    yield port
    task.cancel()


@pytest.fixture
async def sinks() -> AsyncIterator[int]:
    task, port = await _served("sinks")
    yield port
    task.cancel()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    status_line = await reader.readline()
    headers = {}
    while (line := await reader.readline()) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers["content-length"]))
    return int(status_line.split()[1]), headers, body


def _post(path: str, body: bytes, token: str = "t", extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


async def _stats(port: int) -> dict[str, int]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /bench/stats HTTP/1.1\r\nhost: x\r\n\r\n")
    status, _, body = await _read_response(reader)
    writer.close()
    assert status == 200
    return dict(json.loads(body))


async def test_pipelined_requests_on_one_connection_are_answered_in_order_and_counted_by_token(
    upstream: int,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", upstream)
    writer.write(
        _post("/v1/chat/completions", b"{}", token="a")
        + _post("/nowhere", b"{}", token="a")
        + _post("/chat/completions", b"{}", token="b")
    )
    answers = [await _read_response(reader) for _ in range(3)]
    assert [status for status, _, _ in answers] == [200, 404, 200]
    assert answers[0][2] == COMPLETION and json.loads(answers[0][2])["usage"]["total_tokens"] == 15
    assert "connection" not in answers[2][1]  # kept alive
    writer.close()
    assert await _stats(upstream) == {"a": 1, "b": 1}


async def test_connection_close_is_honoured_and_a_chunked_body_is_read_whole(sinks: int) -> None:
    events = b'{"events":[{"transaction_id":"1"},{"transaction_id":"2"}]}'
    chunked = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (10, events[:10], len(events) - 10, events[10:])
    reader, writer = await asyncio.open_connection("127.0.0.1", sinks)
    writer.write(
        b"POST /api/v1/events/batch HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
        b"connection: close\r\n\r\n" + chunked
    )
    status, headers, _ = await _read_response(reader)
    assert (status, headers["connection"]) == (200, "close")
    assert await reader.read() == b""  # and closed
    writer.close()
    assert await _stats(sinks) == {"lago_posts": 1, "lago_events": 2}


async def test_a_request_it_cannot_parse_gets_400_and_the_connection_closed(upstream: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", upstream)
    writer.write(b"NOT HTTP AT ALL\r\n\r\n")
    status, _, _ = await _read_response(reader)
    assert status == 400
    assert await reader.read() == b""
    writer.close()


async def test_reset_zeroes_the_counts(sinks: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", sinks)
    writer.write(_post("/webhook", b"{}") + _post("/bench/reset", b""))
    assert [(await _read_response(reader))[0] for _ in range(2)] == [200, 200]
    writer.close()
    assert await _stats(sinks) == {}


async def test_the_sinks_count_litellms_lago_events_and_webhooks_apart_from_spendledgers(sinks: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", sinks)
    writer.write(
        _post("/api/v1/events", b'{"event":{"transaction_id":"1"}}')
        + _post("/litellm-webhook", b"{}")
        + _post("/webhook", b"{}")
        + _post("/api/v1/events/batch", b'{"events":[{"transaction_id":"2"}]}')
    )
    assert [(await _read_response(reader))[0] for _ in range(4)] == [200] * 4
    writer.close()
    assert await _stats(sinks) == {
        "litellm_lago_events": 1,
        "litellm_webhooks": 1,
        "webhooks": 1,
        "lago_posts": 1,
        "lago_events": 1,
    }
