"""The router's calls for one request: retries, fallbacks, cooldowns and per-deployment limits.

A request is tried on its model group, in the order the routing strategy gives (api/routing.py);
a call that fails in a way another call may not — the provider unreachable or timed out, or
answering 401, 403, 404, 408, 409, 429 or 5xx — is retried, up to `num_retries` times on the
group (after a jittered exponential backoff, or the provider's `retry-after` when it sends one; at
once when the group has another deployment left to try), and up to the deployment's `max_retries`
times on the same deployment first. When the group has failed, the fallback groups are tried in
order, each with its own retries; a context-window error goes straight to
`context_window_fallbacks` (LiteLLM's order). Any other answer — a success, or the caller's own
4xx — ends the request. A stream is retried only until its first byte: the first chunk is read
here, before the client has been sent anything.

Each failed call is listed on the request's exchange (its `Attempt`), and a failed call that
reported usage is billed with the request. The hold already covers the dearest deployment of the
chain (api/enforcement.py), so no call here needs another admission.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final

import httpx

from spendledger.api.deployment_limits import NoRoom
from spendledger.api.proxy import UPSTREAM_PATHS, Exchange, Usage, usage_in
from spendledger.api.services import Services
from spendledger.api.upstream import UpstreamFailure, provider_headers, retry_after_s
from spendledger.ledger.config import Deployment
from spendledger.ledger.events import Attempt
from spendledger.ledger.money import ZERO
from spendledger.ledger.pricing import charge

BodyFor = Callable[[Deployment], bytes]  # the request's body as one deployment is sent it

# LiteLLM's backoff: 0.5 s doubling per retry, at most 8 s, plus up to 0.75 s of jitter.
INITIAL_RETRY_DELAY_S: Final = 0.5
MAX_RETRY_DELAY_S: Final = 8.0
JITTER_S: Final = 0.75
_RETRIED_STATUSES: Final = frozenset({401, 403, 404, 408, 409, 429})
_CONTEXT_WINDOW_SIGNS: Final = (
    b"context_length_exceeded",
    b"maximum context length",
    b"context window",
    b"prompt is too long",
    b"input is too long",
)


@dataclass(slots=True)
class Answered:
    """A 200: for a stream, still open, its first chunk read (`first`) and the rest in `chunks`."""

    deployment: Deployment
    response: httpx.Response
    first: bytes = b""
    chunks: AsyncIterator[bytes] | None = None


@dataclass(slots=True)
class Failed:
    """How the request's last call ended, when no call answered: a provider's error (`status`
    and `body`), or the gateway's own failure (`failure`: unreachable, timed out, no room)."""

    deployment: Deployment
    status: int
    body: bytes = b""
    failure: UpstreamFailure | None = None
    retry_after: int | None = None


def retried(status: int) -> bool:
    return status >= 500 or status in _RETRIED_STATUSES


def context_window_error(status: int, body: bytes) -> bool:
    lowered = body[:2000].lower()
    return status == 400 and any(sign in lowered for sign in _CONTEXT_WINDOW_SIGNS)


def backoff_s(retry: int, asked_s: float | None) -> float:
    """LiteLLM's wait before retry number `retry` (from 0): the provider's `retry-after` when it
    asked for one (bounded by upstream.MAX_RETRY_AFTER_S), else exponential; plus jitter."""
    jitter = JITTER_S * random.random()
    if asked_s is not None:
        return asked_s + jitter
    return min(INITIAL_RETRY_DELAY_S * 2.0**retry, MAX_RETRY_DELAY_S) + jitter


def _broken_stream(deployment: Deployment, exc: httpx.HTTPError) -> UpstreamFailure:
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamFailure(504, "upstream_timeout", f"{deployment.model_name}: upstream timed out")
    return UpstreamFailure(
        502, "upstream_error", f"{deployment.model_name}: upstream stream broke ({type(exc).__name__})"
    )


class Router:
    """One request's calls (`call`), its exchange told of each."""

    def __init__(self, services: Services, exchange: Exchange, body_for: BodyFor, stream: bool) -> None:
        self._services = services
        self._exchange = exchange
        self._body_for = body_for
        self._stream = stream
        self._path = UPSTREAM_PATHS[exchange.route]
        self._settings = services.router.settings
        if services.limits is not None:
            exchange.token_counter = services.limits.count_tokens
            exchange.background = services.background

    async def call(self) -> Answered | Failed:
        model = self._exchange.head.model
        outcome = await self._group(model)
        if isinstance(outcome, Answered) or not self._falls_back(outcome):
            return outcome
        window = outcome.failure is None and context_window_error(outcome.status, outcome.body)
        for group in self._settings.fallbacks_for(model, context_window=window):
            self._exchange.fallbacks += 1
            outcome = await self._group(group)
            if isinstance(outcome, Answered) or not self._falls_back(outcome):
                return outcome
        return outcome

    def _falls_back(self, failed: Failed) -> bool:
        return failed.failure is not None or retried(failed.status) or context_window_error(failed.status, failed.body)

    async def _group(self, group: str) -> Answered | Failed:
        """Call the group, retrying as `num_retries` allows."""
        router = self._services.router
        tried: set[str] = set()
        retries = 0
        while True:
            ordered = router.order(group, tried)
            chosen = await self._choose(ordered)
            if isinstance(chosen, NoRoom):
                return self._no_room(group, ordered, chosen)
            outcome = await self._deployment(chosen)
            tried.add(chosen.deployment_id)
            if isinstance(outcome, Answered) or not retried(outcome.status):
                return outcome
            if retries >= self._settings.num_retries:
                return outcome
            # Another deployment left to try goes at once (LiteLLM's rule); the same one waits.
            cooling = router.cooldowns.cooling
            others = any(d.deployment_id not in tried and not cooling(d.deployment_id) for d in router.deployments(group))
            wait = 0.0 if others else backoff_s(retries, outcome.retry_after)
            retries += 1
            self._exchange.retries += 1
            await self._wait(wait)

    async def _choose(self, ordered: list[Deployment]) -> Deployment | NoRoom:
        limits = self._services.limits
        if limits is not None:
            candidates = limits.needed(ordered)
            if candidates:
                return await limits.take(candidates)
        return ordered[0]

    def _no_room(self, group: str, ordered: list[Deployment], no_room: NoRoom) -> Failed:
        message = (
            f"No deployments available for model group {group!r}: every deployment is at its rpm or tpm "
            f"limit. Try again in {no_room.retry_after} seconds"
        )
        failure = UpstreamFailure(429, "rate_limit_exceeded", message)
        deployment = ordered[0]
        self._note(deployment, 429, "rate_limit_exceeded", 0.0)
        return Failed(deployment, 429, failure=failure, retry_after=no_room.retry_after)

    async def _deployment(self, deployment: Deployment) -> Answered | Failed:
        """Call one deployment, again up to its `max_retries` times while it fails retriably."""
        again = 0
        while True:
            outcome = await self._once(deployment)
            if isinstance(outcome, Answered) or not retried(outcome.status) or again >= deployment.max_retries:
                return outcome
            await self._wait(backoff_s(again, outcome.retry_after))
            again += 1

    async def _once(self, deployment: Deployment) -> Answered | Failed:
        exchange, services = self._exchange, self._services
        exchange.answered_by(deployment, services.prices.price(deployment.deployment_id))
        services.router.began(deployment)
        began = time.perf_counter()
        exchange.upstream_began()
        try:
            response = await services.upstream.send(
                deployment, self._path, self._body_for(deployment), stream=self._stream
            )
        except UpstreamFailure as failure:
            return self._failed(deployment, began, Failed(deployment, failure.status, failure=failure))
        if response.status_code != 200:
            body = await self._read_error(response)
            asked = retry_after_s(response.headers)
            failed = Failed(deployment, response.status_code, body, retry_after=None if asked is None else round(asked))
            return self._failed(deployment, began, failed, response)
        exchange.provider_headers = provider_headers(response.headers)
        exchange.answered = True
        exchange.counted_final = services.limits is not None and services.limits.counts_tokens(deployment)
        if not self._stream:
            services.router.ended(deployment)
            return Answered(deployment, response)
        chunks = response.aiter_bytes()
        try:
            first = await anext(chunks, b"")
        except httpx.HTTPError as exc:
            await response.aclose()
            exchange.answered = False
            broke = _broken_stream(deployment, exc)
            return self._failed(deployment, began, Failed(deployment, broke.status, failure=broke))
        return Answered(deployment, response, first, chunks)

    async def _read_error(self, response: httpx.Response) -> bytes:
        try:
            return await response.aread()
        except httpx.HTTPError:
            return b""
        finally:
            await response.aclose()

    def _failed(
        self, deployment: Deployment, began: float, failed: Failed, response: httpx.Response | None = None
    ) -> Failed:
        """Note a failed call: on the exchange (billed if it reported usage), and in the cooldowns."""
        self._services.router.ended(deployment)
        router = self._services.router
        error_type = failed.failure.error_type if failed.failure is not None else None
        usage = usage_in(failed.body) if failed.body else None
        self._note(deployment, failed.status, error_type, time.perf_counter() - began, usage)
        router.cooldowns.failed(deployment.deployment_id, deployment.model_name, failed.status)
        self._exchange.provider_headers = provider_headers(response.headers) if response is not None else {}
        return failed

    def _note(
        self, deployment: Deployment, status: int, error_type: str | None, latency_s: float, usage: Usage | None = None
    ) -> None:
        exchange = self._exchange
        tokens, cost = None, None
        if usage is not None:
            tokens = usage.tokens()
            cost = charge(self._services.prices.price(deployment.deployment_id), tokens)
            exchange.billed.append((tokens, cost))
            limits = self._services.limits
            if limits is not None and limits.counts_tokens(deployment):
                counted = exchange.counted_failed
                counted[deployment.deployment_id] = counted.get(deployment.deployment_id, 0) + tokens.total_tokens
        exchange.attempts.append(
            Attempt(
                deployment_id=deployment.deployment_id,
                model_group=deployment.model_name,
                upstream_model=deployment.upstream_model,
                http_status=status,
                latency_ms=round(latency_s * 1000),
                error_type=error_type,
                input_tokens=tokens.input_tokens if tokens else 0,
                output_tokens=tokens.output_tokens if tokens else 0,
                cost=cost.total if cost else ZERO,
            )
        )
        exchange.call_failed(0.0)

    async def _wait(self, seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds)
            self._exchange.call_failed(seconds)
