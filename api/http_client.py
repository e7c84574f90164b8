"""The HTTP client every outgoing call uses: httpx's API over aiohttp's engine, and a direct send.

httpx's own transport (httpcore + h11, pure Python) costs ~1.1 ms of CPU per request at 64
concurrent requests on these machines; aiohttp does the same work in a fraction of that. The
requests, responses, exceptions and timeouts stay httpx's, so callers see httpx only.
`scripts/bench/http_client.py` measures each layer (docs/benchmarks.md, "HTTP client cost per request").

- `AiohttpTransport` replaces the `httpx-aiohttp` package's transport: it builds one aiohttp
  `ClientTimeout` per distinct timeout instead of one per request, keeps no cookie jar, and maps
  aiohttp's errors to the httpx exceptions httpcore would raise (httpx-aiohttp turns a refused
  connection into `ConnectTimeout`).
- `DirectClient.send` hands a request straight to the client's transport, skipping `AsyncClient.send`'s
  auth flow, redirects, cookies and event hooks, none of which our calls use.
"""

from __future__ import annotations

import urllib.request
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import aiohttp
import httpx

# Most specific first: the first match wins. Timeouts are TimeoutErrors, some also ClientErrors.
_ERRORS: Final[tuple[tuple[type[BaseException], Callable[..., httpx.TransportError]], ...]] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.SocketTimeoutError, httpx.ReadTimeout),
    (TimeoutError, httpx.TimeoutException),
    (aiohttp.ClientConnectorError, httpx.ConnectError),
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.ReadError),
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),
    (aiohttp.ClientOSError, httpx.NetworkError),
    (aiohttp.InvalidURL, httpx.UnsupportedProtocol),
    (aiohttp.ClientError, httpx.TransportError),
)


def _httpx_error(exc: BaseException, request: httpx.Request) -> BaseException:
    for aiohttp_type, httpx_type in _ERRORS:
        if isinstance(exc, aiohttp_type):
            return httpx_type(str(exc) or type(exc).__name__, request=request)
    return exc


class _Body(httpx.AsyncByteStream):
    """An aiohttp response body as httpx reads it; closing it early drops the connection."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        content = self._response.content
        try:
            while chunk := await content.readany():
                yield chunk
        except Exception as exc:
            raise _httpx_error(exc, self._request) from exc

    async def aclose(self) -> None:
        # Fully read, the connection is back in the pool already; otherwise it holds unread bytes.
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx transport on one aiohttp session: HTTP/1.1, pooled, no redirects, no cookies, no proxy."""

    def __init__(self, max_connections: int, keepalive_s: float = 5.0) -> None:
        self._max_connections = max_connections
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[float | None, ...], aiohttp.ClientTimeout] = {}

    def _new_session(self) -> aiohttp.ClientSession:
        # Created on first use: aiohttp binds the session to the running event loop.
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            keepalive_timeout=self._keepalive_s,
            ssl=httpx.create_ssl_context(),  # the CA bundle httpx would use (certifi)
        )
        return aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False
        )

    def _timeout(self, timeout: dict[str, float | None]) -> aiohttp.ClientTimeout:
        """httpx's connect/read/pool timeouts as aiohttp's; a few distinct values, so cached."""
        key = (timeout.get("connect"), timeout.get("read"), timeout.get("pool"))
        found = self._timeouts.get(key)
        if found is None:
            found = self._timeouts[key] = aiohttp.ClientTimeout(
                total=None, sock_connect=key[0], sock_read=key[1], connect=key[2]
            )
        return found

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._session_started()
        data: Any
        try:
            data = request.content or None
        except httpx.RequestNotRead:  # a streamed request body
            data = request.stream
        try:
            response = await session.request(
                request.method,
                str(request.url),
                headers=request.headers.multi_items(),
                data=data,
                allow_redirects=False,
                timeout=self._timeout(request.extensions.get("timeout", {})),
            )
        except Exception as exc:
            raise _httpx_error(exc, request) from exc
        extensions = {"http_version": b"HTTP/1.1", "reason_phrase": (response.reason or "").encode()}
        body = response.content
        if body.is_eof() and body.exception() is None:
            # The whole body came with the head (short answers do) and aiohttp has put the connection
            # back: hand it over already read, which spares httpx's chain of (async) generators.
            raw = body.read_nowait()
            done = httpx.Response(
                response.status,
                headers=response.raw_headers,
                stream=httpx.ByteStream(raw),
                request=request,
                extensions=extensions,
            )
            if "content-encoding" in done.headers:
                done.read()  # decodes it, as reading the stream would
            else:
                done._content = raw  # what read() would compute, without its ~7 µs of generators
            return done
        return httpx.Response(
            response.status,
            headers=response.raw_headers,
            stream=_Body(response, request),
            request=request,
            extensions=extensions,
        )

    def _session_started(self) -> aiohttp.ClientSession:
        self._session = self._new_session()
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class DirectClient(httpx.AsyncClient):
    """An AsyncClient whose `send` hands the request straight to its transport when none of the
    client's machinery applies: no auth, no redirects to follow, no event hooks, no proxy from the
    environment (httpx mounts those as other transports; read once, it does not change under a
    server). That path neither stores nor sends cookies, and costs ~40% less CPU per request."""

    def __init__(self, transport: httpx.AsyncBaseTransport, **kwargs: Any) -> None:
        super().__init__(transport=transport, **kwargs)
        self._direct = None if self.trust_env and urllib.request.getproxies() else transport

    async def send(
        self,
        request: httpx.Request,
        *,
        stream: bool = False,
        auth: httpx._types.AuthTypes | httpx._client.UseClientDefault | None = httpx.USE_CLIENT_DEFAULT,
        follow_redirects: bool | httpx._client.UseClientDefault = httpx.USE_CLIENT_DEFAULT,
    ) -> httpx.Response:
        hooks = self.event_hooks
        if (
            self._direct is None
            or auth is not httpx.USE_CLIENT_DEFAULT
            or follow_redirects is True
            or self.follow_redirects
            or self.auth is not None
            or hooks["request"]
            or hooks["response"]
            or request.url.userinfo  # httpx turns these into basic auth
        ):
            return await super().send(request, stream=stream, auth=auth, follow_redirects=follow_redirects)
        if "timeout" not in request.extensions:  # what AsyncClient.send does; ours carry their own
            request.extensions["timeout"] = self.timeout.as_dict()
        response = await self._direct.handle_async_request(request)
        response.request = request
        if not stream:
            try:
                await response.aread()
            except BaseException:
                await response.aclose()
                raise
        return response


def pooled_client(max_connections: int, **kwargs: Any) -> DirectClient:
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return DirectClient(AiohttpTransport(max_connections), limits=limits, **kwargs)
