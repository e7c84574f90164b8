"""The one place that talks to LLM providers: pooled httpx clients, plain and streaming.

Each deployment's URL, headers and timeout are prepared once (`PostTarget`), from its provider's row
(ledger/providers.py: Azure's URL shapes and `api-key` header, a bearer key for the OpenAI-compatible
family); requests go straight to the transport (`DirectClient`): no redirects followed, no cookies kept.
An Anthropic deployment's client translates (api/anthropic/transport.py): it is sent the OpenAI
body like any other and answers in OpenAI's format, speaking Anthropic's Messages API through the
pooled client in between, so that the proxy and the stream relay treat it as any provider.

Bodies are forwarded as bytes; the provider's key comes from the deployment, never from the caller.
Transport failures become `UpstreamFailure` with the status and error type the contract names.
"""

from __future__ import annotations

import email.utils
import time
from typing import Final

import httpx

from spendledger.api.anthropic.transport import AnthropicTransport
from spendledger.api.anthropic.wire import messages_url
from spendledger.api.http_client import DirectClient, pooled_client
from spendledger.api.mock_provider import MockTransport
from spendledger.ledger.config import Deployment
from spendledger.ledger.providers import auth_headers, provider_spec, request_url
from spendledger.ledger.sinks.http import PostTarget

_CONNECT_TIMEOUT_S: Final = 10.0


class UpstreamFailure(Exception):
    """The provider could not be reached, timed out, or broke the connection."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


class Upstream:
    def __init__(self, max_connections: int = 1000) -> None:
        self._http = pooled_client(max_connections, follow_redirects=False)
        self._mock = DirectClient(MockTransport(), trust_env=False)  # never proxied
        # Per (deployment, path): its client and prepared POST. Keyed by identity, checked on use:
        # deployments live as long as the configuration, and hashing one costs more than the lookup.
        self._targets: dict[tuple[int, str, bool], tuple[Deployment, httpx.AsyncClient, PostTarget]] = {}
        # The translating clients of Anthropic targets, by the same key (they wrap `_http`).
        self._translating: dict[tuple[int, str, bool], httpx.AsyncClient] = {}

    async def aclose(self) -> None:
        for client in self._translating.values():
            await client.aclose()
        await self._http.aclose()
        await self._mock.aclose()

    def _target(self, deployment: Deployment, path: str, stream: bool = False) -> tuple[httpx.AsyncClient, PostTarget]:
        stream = stream and deployment.stream_timeout_s is not None  # else a stream's target is the same
        found = self._targets.get((id(deployment), path, stream))
        if found is not None and found[0] is deployment:
            return found[1], found[2]
        spec = provider_spec(deployment.provider)
        headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
        headers.update(auth_headers(spec, deployment.api_key, deployment.azure_ad_token))
        timeout_s = deployment.stream_timeout_s if stream and deployment.stream_timeout_s else deployment.timeout_s
        timeout = httpx.Timeout(timeout_s, connect=min(_CONNECT_TIMEOUT_S, timeout_s))
        client: httpx.AsyncClient
        if deployment.provider == "mock":
            client, url = self._mock, f"http://mock.invalid/v1{path}"
        elif spec.wire == "anthropic":
            client = DirectClient(AnthropicTransport(self._http, deployment, path), trust_env=False)
            self._translating[(id(deployment), path, stream)] = client
            url = messages_url(deployment.api_base or "")
        else:
            base = deployment.api_base or ""
            client, url = self._http, request_url(spec, base, deployment.upstream_model, deployment.api_version, path)
        target = PostTarget(client, url, headers, timeout)
        self._targets[(id(deployment), path, stream)] = (deployment, client, target)
        return client, target

    async def send(self, deployment: Deployment, path: str, body: bytes, *, stream: bool) -> httpx.Response:
        """POST `body` to the deployment. With `stream=True` the caller must close the response."""
        client, target = self._target(deployment, path, stream)
        try:
            response = await client.send(target.request(body), stream=stream)
        except httpx.TimeoutException:
            raise UpstreamFailure(
                504, "upstream_timeout", f"{deployment.model_name}: upstream timed out"
            ) from None
        except httpx.HTTPError as exc:
            raise UpstreamFailure(
                502, "upstream_error", f"{deployment.model_name}: upstream unreachable ({type(exc).__name__})"
            ) from None
        return response


# --- what a provider's response headers say (api/attempts.py, api/proxy.py) ----------------------

MAX_RETRY_AFTER_S: Final = 60.0  # as LiteLLM: a longer wait asked for is not waited for


def retry_after_s(headers: httpx.Headers) -> float | None:
    """How long the provider asks us to wait before calling again: `retry-after-ms` (OpenAI's),
    else `retry-after` in seconds or as an HTTP date; None when absent, unreadable, or not within
    (0, MAX_RETRY_AFTER_S]."""
    wait: float | None = None
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            wait = float(millis) / 1000
        except ValueError:
            wait = None
    if wait is None and (text := headers.get("retry-after")) is not None:
        try:
            wait = float(text)
        except ValueError:
            date = email.utils.parsedate_tz(text)
            wait = None if date is None else email.utils.mktime_tz(date) - time.time()
    if wait is None or wait != wait or not 0 < wait <= MAX_RETRY_AFTER_S:
        return None
    return wait


# OpenAI's rate-limit headers, which LiteLLM also answers under their own names.
OPENAI_RATE_LIMIT_HEADERS: Final = frozenset(
    {
        "x-ratelimit-limit-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-requests",
        "x-ratelimit-reset-tokens",
    }
)
_PASSED_PREFIXES: Final = ("x-ratelimit-", "anthropic-ratelimit-", "llm_provider-")
_PASSED: Final = frozenset({"x-request-id", "request-id", "retry-after", "retry-after-ms", "openai-processing-ms"})


def provider_headers(headers: httpx.Headers) -> dict[str, str]:
    """The provider's request id and rate-limit headers, as LiteLLM answers them: each as
    `llm_provider-<name>`, and OpenAI's six rate-limit headers also under their own names. Only
    these: cookies, server names and the like are the provider's business, not the caller's."""
    passed: dict[str, str] = {}
    # Read as bytes, and only the kept ones decoded: `items()` decodes every header of every answer.
    for raw_name, raw_value in headers.raw:
        name = raw_name.decode("latin-1").lower()
        if name in _PASSED or name.startswith(_PASSED_PREFIXES):
            value = raw_value.decode("latin-1")
            if name in OPENAI_RATE_LIMIT_HEADERS:
                passed[name] = value
            passed[name if name.startswith("llm_provider-") else f"llm_provider-{name}"] = value
    return passed
