"""Forwarding one OpenAI-style request and accounting for it (streams: api/streaming.py).

The path of a request: decode and validate the fields we need (api/request_body.py), pick a
deployment, hold the worst case (api/enforcement.py: the ledger's `Ticket`), forward the body (only
`model`, and for streams `stream_options`, are rewritten), read the usage, settle the ticket with
`UsageRecorded`, and only then release the response: no request is ever served unbilled.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

import msgspec
import structlog

from spendledger.api.auth import Caller
from spendledger.api.errors import ApiError
from spendledger.api.metrics import observe_usage
from spendledger.api.request_body import RequestHead
from spendledger.api.upstream import UpstreamFailure
from spendledger.api.usage_block import CompletionDetails, PromptDetails, Usage, estimate_tokens
from spendledger.ledger.background import BackgroundTasks
from spendledger.ledger.config import Deployment
from spendledger.ledger.connections import DATABASE_ERRORS
from spendledger.ledger.events import Attempt, Route, UsageRecorded, UsageStatus
from spendledger.ledger.money import ZERO, add, format_money
from spendledger.ledger.pricing import Charge, Price, charge
from spendledger.ledger.scopes import Scopes
from spendledger.ledger.tickets import Ticket
from spendledger.ledger.tokens import TokenUsage

# Re-exported: the usage block lives in api/usage_block.py (api/anthropic/ reads it without importing
# this module, which imports the upstream); importers of these names from here keep working.
__all__ = ["CompletionDetails", "PromptDetails", "Usage", "estimate_tokens"]

log = structlog.get_logger(__name__)

UPSTREAM_PATHS: Final[dict[Route, str]] = {
    "chat.completions": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
}


class _UsageOnly(msgspec.Struct):
    usage: Usage | None = None


_usage_decoder: Final = msgspec.json.Decoder(_UsageOnly)


def answer_usage(content: bytes) -> Usage | None:
    """The usage block of a provider's answer (None: it reported none); raises msgspec.DecodeError
    for a body that is not JSON."""
    return _usage_decoder.decode(content).usage


def usage_in(content: bytes) -> Usage | None:
    """The usage block of a provider's JSON body (an error's too), if it has one."""
    try:
        return _usage_decoder.decode(content).usage
    except msgspec.DecodeError:
        return None


_warned_unpriced: set[tuple[str, str]] = set()


def _warn_unpriced_once(deployment_id: str, model: str, kind: str) -> None:
    """A kind of token used with no price of its own: one warning per deployment and kind (each
    request is counted by `spendledger_unpriced_token_kinds_total`, and named in its event)."""
    if (deployment_id, kind) not in _warned_unpriced:
        _warned_unpriced.add((deployment_id, kind))
        log.warning(
            "token_kind_unpriced", deployment_id=deployment_id, model=model, kind=kind,
            detail="billed at the plain token's price: set its price in model_info",
        )  # fmt: skip


def _with_billed(
    counts: dict[str, int], costs: dict[Any, Decimal], total: Decimal, billed: list[tuple[TokenUsage, Charge]]
) -> tuple[dict[str, int], dict[Any, Decimal], Decimal]:
    counts, costs = dict(counts), dict(costs)
    for tokens, cost in billed:
        for name, n in tokens.counts().items():
            counts[name] = counts.get(name, 0) + n
        for kind, amount in cost.costs.items():
            costs[kind] = add(costs.get(kind, ZERO), amount)
        total = add(total, cost.total)
    return counts, costs, total


class Exchange:
    """One proxied request: who asked, what for, where it goes, and how to bill it. What admission
    took for it is its `Ticket` (ledger/tickets.py), which the functions below are handed."""

    def __init__(
        self,
        route: Route,
        caller: Caller,
        head: RequestHead,
        deployment: Deployment,
        price: Price | None,
        customer_id: str | None,
    ) -> None:
        self.call_id = str(uuid.uuid4())
        # Every line logged while this request is served names it (api/logging.py).
        structlog.contextvars.bind_contextvars(call_id=self.call_id)
        self.route: Route = route
        self.caller = caller
        self.head = head
        self.deployment = deployment
        self.price = price
        self.scopes = Scopes(caller.key_hash, caller.user_id, caller.team_id, customer_id)
        self.started_at = datetime.now(UTC)
        self._started = time.perf_counter()
        self._upstream_began: float | None = None
        self._upstream_s: float | None = None
        # What the router did (api/attempts.py): its failed calls, and what they were billed.
        self.attempts: list[Attempt] = []
        self.billed: list[tuple[TokenUsage, Charge]] = []
        self.answered = False  # a call answered 200 (its stream may still break)
        self.retries = 0
        self.fallbacks = 0
        self.failed_s = 0.0  # the failed calls' time, and the backoff waited between calls
        self.provider_headers: dict[str, str] = {}
        # The tokens counted in deployments' tpm windows (api/deployment_limits.py), once settled:
        # the answering call's (`counted_final`), and the billed failed calls' by deployment.
        self.token_counter: Callable[[dict[str, int]], Coroutine[Any, Any, None]] | None = None
        self.background: BackgroundTasks | None = None
        self.counted_final = False
        self.counted_failed: dict[str, int] = {}

    def answered_by(self, deployment: Deployment, price: Price | None) -> None:
        self.deployment = deployment
        self.price = price

    def upstream_began(self) -> None:
        self._upstream_began = time.perf_counter()

    def upstream_ended(self) -> None:
        """The provider is done (its answer read, or its stream's last byte)."""
        if self._upstream_began is not None and self._upstream_s is None:
            self._upstream_s = time.perf_counter() - self._upstream_began

    def timings(self) -> tuple[float, float]:
        """(the request's time so far, the providers' part of it: every call's), seconds."""
        self.upstream_ended()
        return time.perf_counter() - self._started, (self._upstream_s or 0.0) + self.failed_s

    def call_failed(self, waited_s: float) -> None:
        """The call begun last failed: its time, and the backoff `waited_s` after it, are not ours."""
        if self._upstream_began is not None:
            self.failed_s += time.perf_counter() - self._upstream_began
        self.failed_s += waited_s
        self._upstream_began = None

    def _so_far(self) -> tuple[float, float]:
        """timings() without ending the provider's part (a stream's headers go before its end)."""
        now = time.perf_counter()
        upstream = self._upstream_s
        if upstream is None:
            upstream = 0.0 if self._upstream_began is None else now - self._upstream_began
        return now - self._started, upstream + self.failed_s

    def count_tokens(self, event: UsageRecorded) -> None:
        """After the settle: the tokens each counted deployment used, into its tpm window."""
        if self.token_counter is None or self.background is None:
            return
        counts = dict(self.counted_failed)
        if self.counted_final and self.answered:
            final = event.total_tokens - sum(tokens.total_tokens for tokens, _ in self.billed)
            counts[self.deployment.deployment_id] = counts.get(self.deployment.deployment_id, 0) + final
        if counts:
            self.background.spawn(self.token_counter(counts))

    def usage_event(
        self,
        ticket: Ticket,
        *,
        status: UsageStatus,
        http_status: int,
        usage: Usage | None = None,
        estimated: bool = False,
        error_type: str | None = None,
    ) -> UsageRecorded:
        tokens = usage.tokens() if usage else TokenUsage()
        cost = charge(self.price, tokens)
        for kind in cost.unpriced_kinds:
            _warn_unpriced_once(self.deployment.deployment_id, self.head.model, kind)
        counts, costs, total = tokens.counts(), cost.costs, cost.total
        if self.billed:  # failed calls the providers billed: their tokens and costs are the request's too
            counts, costs, total = _with_billed(counts, costs, total, self.billed)
        scopes = self.scopes
        return UsageRecorded(
            call_id=self.call_id,
            route=self.route,
            model_group=self.head.model,
            deployment_id=self.deployment.deployment_id,
            provider=self.deployment.provider,
            upstream_model=self.deployment.upstream_model,
            key_hash=scopes.key_hash,
            key_alias=self.caller.key_alias,
            user_id=scopes.user_id,
            team_id=scopes.team_id,
            customer_id=scopes.customer_id,
            status=status,
            http_status=http_status,
            error_type=error_type,
            stream=self.head.stream,
            **counts,
            usage_estimated=estimated,
            input_cost_per_token=cost.input_cost_per_token,
            output_cost_per_token=cost.output_cost_per_token,
            unit_prices=cost.unit_prices,
            costs=costs,
            unpriced_kinds=cost.unpriced_kinds,
            cost=total,
            priced=cost.priced,
            started_at=self.started_at,
            ended_at=datetime.now(UTC),
            budget_periods=ticket.budget_periods,
            hold=ticket.hold,
            attempts=self._attempts(http_status, error_type),
        )

    def _attempts(self, http_status: int, error_type: str | None) -> tuple[Attempt, ...]:
        """Every call, the answering one (this event's own) last; none when there was one call."""
        if not self.attempts:
            return ()
        if not self.answered:
            return tuple(self.attempts) if len(self.attempts) > 1 else ()
        self.upstream_ended()
        last = Attempt(
            deployment_id=self.deployment.deployment_id,
            model_group=self.deployment.model_name,
            upstream_model=self.deployment.upstream_model,
            http_status=http_status,
            latency_ms=round((self._upstream_s or 0.0) * 1000),
            error_type=error_type,
        )
        return (*self.attempts, last)

    def headers(
        self, ticket: Ticket, event: UsageRecorded | None = None, key_spend: Decimal | None = None
    ) -> dict[str, str]:
        total_s, upstream_s = self._so_far()
        headers = {
            **self.provider_headers,
            "x-litellm-call-id": self.call_id,
            "x-litellm-model-id": self.deployment.deployment_id,
            "x-litellm-model-group": self.head.model,
            "x-litellm-attempted-retries": str(self.retries),
            "x-litellm-attempted-fallbacks": str(self.fallbacks),
            "x-litellm-response-duration-ms": f"{total_s * 1000:.3f}",
            "x-litellm-overhead-duration-ms": f"{max(0.0, total_s - upstream_s) * 1000:.3f}",
        }
        admitted = ticket.admitted  # the rate limits' room (leases are granted only without them)
        if admitted.remaining_requests is not None:
            headers["x-ratelimit-remaining-requests"] = str(admitted.remaining_requests)
        if admitted.remaining_tokens is not None:
            headers["x-ratelimit-remaining-tokens"] = str(max(0, admitted.remaining_tokens))
        if event is not None:
            headers["x-litellm-response-cost"] = format_money(event.cost)
        if key_spend is not None:
            headers["x-litellm-key-spend"] = format_money(key_spend)
        return headers


async def record(exchange: Exchange, ticket: Ticket, event: UsageRecorded) -> Decimal | None:
    """Settle the request with its terminal event (the key's new spend once committed); if the
    ledger cannot commit it, withhold the response."""
    try:
        spend = await ticket.settle(event)
        exchange.count_tokens(event)
    except DATABASE_ERRORS as exc:
        log.error("usage_not_recorded", call_id=exchange.call_id, error_type=type(exc).__name__)
        raise ApiError(
            503,
            "The usage of this request could not be recorded, so its response is withheld",
            "ledger_unavailable",
            headers=exchange.headers(ticket),
        ) from None
    observe_usage(event, *exchange.timings())
    return spend


async def record_failure(exchange: Exchange, ticket: Ticket, failure: UpstreamFailure) -> ApiError:
    event = exchange.usage_event(
        ticket, status="failure", http_status=failure.status, error_type=failure.error_type
    )
    await record(exchange, ticket, event)
    return ApiError(failure.status, failure.message, failure.error_type, headers=exchange.headers(ticket, event))
