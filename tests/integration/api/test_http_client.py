"""Our aiohttp transport behind httpx (api/http_client.py) and the prepared POSTs (ledger/sinks/http.py),
against real local servers: what callers see must be httpx's, whatever the engine underneath."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from spendledger.api.http_client import AiohttpTransport, DirectClient, pooled_client
from spendledger.api.upstream import Upstream, UpstreamFailure
from spendledger.ledger.config import Deployment
from spendledger.ledger.sinks.http import PostTarget
from tests.fakes.serving import serve_in_thread
from tests.fakes.upstream import RunningUpstream, run_fake_upstream
from tests.support import free_port

KEY = "upstream-secret"
CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"say something"}]}'
STREAM = b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"a b c d e f g h"}]}'
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def upstream() -> Iterator[RunningUpstream]:
    with run_fake_upstream() as running:
        yield running


@pytest.fixture(autouse=True)
def _reset(upstream: RunningUpstream) -> None:
    upstream.app.reset()


@pytest.fixture
async def client() -> AsyncIterator[DirectClient]:
    http = pooled_client(10)
    yield http
    await http.aclose()


def target(client: httpx.AsyncClient, url: str, timeout_s: float = 5.0) -> PostTarget:
    headers = {**JSON, "accept": "application/json, text/event-stream", "authorization": f"Bearer {KEY}"}
    return PostTarget(client, url, headers, httpx.Timeout(timeout_s))


async def test_a_post_sends_the_prepared_headers_and_returns_a_read_httpx_response(
    client: DirectClient, upstream: RunningUpstream
) -> None:
    response = await client.send(target(client, f"{upstream.base_url}/chat/completions").request(CHAT))
    assert isinstance(response, httpx.Response)
    assert response.status_code == 200
    assert response.json()["object"] == "chat.completion"
    assert response.headers["content-type"] == "application/json"
    assert response.request.url == f"{upstream.base_url}/chat/completions"
    [seen] = upstream.app.requests
    assert seen.body == CHAT
    assert seen.headers["authorization"] == f"Bearer {KEY}"
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["accept"] == "application/json, text/event-stream"
    assert seen.headers["content-length"] == str(len(CHAT))
    assert seen.headers["host"] == f"127.0.0.1:{upstream.port}"
    assert seen.headers["user-agent"].startswith("python-httpx/")  # the client's defaults still go


async def test_the_prepared_request_equals_what_build_request_makes(client: DirectClient) -> None:
    url = "http://127.0.0.1:9/v1/chat/completions"
    headers = {**JSON, "authorization": f"Bearer {KEY}"}
    built = client.build_request("POST", url, content=CHAT, headers=headers, timeout=httpx.Timeout(7.0))
    prepared = PostTarget(client, url, headers, httpx.Timeout(7.0)).request(CHAT)
    assert prepared.headers.multi_items() == built.headers.multi_items()
    assert (prepared.url, prepared.content, prepared.extensions) == (
        built.url,
        built.content,
        built.extensions,
    )


async def test_a_read_timeout_is_an_httpx_timeout(client: DirectClient, upstream: RunningUpstream) -> None:
    upstream.app.delay_s = 1.0
    request = target(client, f"{upstream.base_url}/chat/completions", timeout_s=0.2).request(CHAT)
    with pytest.raises(httpx.ReadTimeout):
        await client.send(request)


async def test_a_refused_connection_is_an_httpx_connect_error_not_a_timeout(client: DirectClient) -> None:
    request = target(client, f"http://127.0.0.1:{free_port()}/v1/chat/completions").request(CHAT)
    with pytest.raises(httpx.ConnectError) as raised:
        await client.send(request)
    assert not isinstance(raised.value, httpx.TimeoutException)
    assert raised.value.request is request


async def test_a_stream_is_read_chunk_by_chunk_and_can_be_closed_early(
    client: DirectClient, upstream: RunningUpstream
) -> None:
    upstream.app.chunk_delay_s = 0.05  # each SSE event in a packet of its own
    chat = target(client, f"{upstream.base_url}/chat/completions")
    response = await client.send(chat.request(STREAM), stream=True)
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = response.aiter_bytes()
    first = await anext(chunks)
    assert first.startswith(b"data: {")
    await response.aclose()  # the caller hangs up with most of the stream unread
    assert response.is_closed
    # The half-read connection was dropped, not handed to the next request.
    again = await client.send(chat.request(CHAT))
    assert again.json()["object"] == "chat.completion"


async def test_a_stream_read_to_the_end_has_every_event(
    client: DirectClient, upstream: RunningUpstream
) -> None:
    upstream.app.chunk_delay_s = 0.01
    response = await client.send(
        target(client, f"{upstream.base_url}/chat/completions").request(STREAM), stream=True
    )
    try:
        body = b"".join([chunk async for chunk in response.aiter_bytes()])
    finally:
        await response.aclose()
    assert body.endswith(b"data: [DONE]\n\n")
    assert body.count(b"data: ") > 3


# --- answers FakeUpstream does not give: compressed, redirecting ---


async def _odd(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    if scope["path"] == "/gzip":
        body = gzip.compress(b'{"ok":true}')
        headers = [(b"content-encoding", b"gzip"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
    else:
        body = b""
        await send({"type": "http.response.start", "status": 307, "headers": [(b"location", b"/gzip")]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def odd() -> Iterator[str]:
    with serve_in_thread(_odd, "odd-server") as served:
        yield served.root_url


async def test_a_compressed_answer_is_decoded_as_httpx_does(client: DirectClient, odd: str) -> None:
    response = await client.send(target(client, f"{odd}/gzip").request(b"{}"))
    assert response.json() == {"ok": True}


async def test_redirects_are_not_followed(client: DirectClient, odd: str) -> None:
    response = await client.send(target(client, f"{odd}/redirect").request(b"{}"))
    assert response.status_code == 307
    assert response.headers["location"] == "/gzip"


async def test_the_transport_works_under_a_plain_async_client(upstream: RunningUpstream) -> None:
    async with httpx.AsyncClient(transport=AiohttpTransport(4)) as plain:
        response = await plain.post(f"{upstream.base_url}/chat/completions", content=CHAT, headers=JSON)
    assert response.json()["object"] == "chat.completion"


# --- Upstream: the error mapping and the mock provider on top of it ---


def deployment(api_base: str, provider: str = "openai", timeout_s: float = 5.0) -> Deployment:
    return Deployment(
        model_name="m", deployment_id="d", provider=provider, upstream_model="gpt-4o-mini",
        api_base=api_base, api_key=KEY, timeout_s=timeout_s,
    )  # fmt: skip


async def test_upstream_maps_refused_to_502_and_slow_to_504(upstream: RunningUpstream) -> None:
    up = Upstream(max_connections=4)
    try:
        with pytest.raises(UpstreamFailure) as refused:
            await up.send(
                deployment(f"http://127.0.0.1:{free_port()}"), "/chat/completions", CHAT, stream=False
            )
        assert (refused.value.status, refused.value.error_type) == (502, "upstream_error")
        upstream.app.delay_s = 1.0
        with pytest.raises(UpstreamFailure) as slow:
            await up.send(
                deployment(upstream.base_url, timeout_s=0.2), "/chat/completions", CHAT, stream=False
            )
        assert (slow.value.status, slow.value.error_type) == (504, "upstream_timeout")
    finally:
        await up.aclose()


async def test_upstream_mock_provider_answers_plain_and_streamed() -> None:
    up = Upstream(max_connections=4)
    mock = deployment("", provider="mock")
    try:
        plain = await up.send(mock, "/chat/completions", CHAT, stream=False)
        assert plain.json()["usage"]["completion_tokens"] > 0
        streamed = await up.send(mock, "/chat/completions", STREAM, stream=True)
        try:
            body = b"".join([chunk async for chunk in streamed.aiter_bytes()])
        finally:
            await streamed.aclose()
        assert body.endswith(b"data: [DONE]\n\n")
    finally:
        await up.aclose()
