"""The HTTP client every outgoing call uses: httpx's API over aiohttp's engine.

httpx's own transport (httpcore + h11, pure Python) costs ~1.1 ms of CPU per request at 64
concurrent requests on these machines; the `httpx-aiohttp` transport does the same work in
~0.2 ms (measured with 4,000 POSTs to a local upstream). The API, the exceptions and the
timeouts stay httpx's, so nothing else changes.
"""

from __future__ import annotations

import httpx
from httpx_aiohttp import AiohttpTransport


def pooled_client(max_connections: int, **kwargs: object) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.AsyncClient(transport=AiohttpTransport(limits=limits), limits=limits, **kwargs)  # type: ignore[arg-type]
