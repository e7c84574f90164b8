"""Admission on the request path: build the `Admission`, run it, and turn a refusal into the
status, error type and headers of CONTRACT §5."""

from __future__ import annotations

import functools
import os
from datetime import UTC, datetime, timedelta
from typing import Final

import asyncpg
import structlog

from api.errors import ApiError
from api.metrics import observe_admission, observe_request
from api.proxy import Exchange
from api.services import Services
from ledger.admission import (
    HOLD_GRACE,
    Admission,
    Admitted,
    Outcome,
    Refused,
    announce_budget_exhausted,
)
from ledger.holds import RequestShape, WorstCase, worst_case_cost, worst_case_tokens

log = structlog.get_logger(__name__)

# A stream may run far longer than the upstream's read timeout: its hold must outlive it.
_STREAM_HOLD_FLOOR: Final = timedelta(minutes=10)


@functools.cache
def hold_grace() -> timedelta:
    """SPENDLEDGER_HOLD_GRACE_S shortens the grace (tests of crashed processes use it); read once,
    not on every request."""
    value = os.environ.get("SPENDLEDGER_HOLD_GRACE_S")
    return timedelta(seconds=float(value)) if value else HOLD_GRACE


async def admit(services: Services, exchange: Exchange, shape: RequestShape) -> None:
    """Hold the request's worst-case cost on every scope, or raise the refusal as an ApiError."""
    now = datetime.now(UTC)
    timeout = timedelta(seconds=exchange.deployment.timeout_s)
    if exchange.head.stream:
        timeout = max(timeout, _STREAM_HOLD_FLOOR)
    settings = services.settings
    worst = worst_case_tokens(shape, services.prices.limits(exchange.deployment.deployment_id))
    if worst.assumed and settings.reject_unbounded_requests:
        raise unbounded_error(worst, exchange)
    hold = worst_case_cost(exchange.price, worst)
    admission = Admission(
        call_id=exchange.call_id,
        route=exchange.route,
        model=exchange.head.model,
        scopes=exchange.scopes,
        key_alias=exchange.caller.key_alias,
        hold=hold,
        expires_at=now + timeout + hold_grace(),
        budgets=services.budgets,
        refused_at=now,
        actor=exchange.caller.actor,
    )
    outcome: Outcome | None = None
    if services.leases is not None:
        outcome = await services.leases.admit(admission)
    under_lease = outcome is not None
    if outcome is None:
        outcome = await services.admitter.admit(admission)
    observe_admission(under_lease, isinstance(outcome, Admitted))
    if isinstance(outcome, Refused):
        exchange.recorded = True  # RequestRefused is its terminal event
        observe_request(exchange.route, "refused", exchange.head.model, priced=True)
        if outcome.reason == "budget_exceeded" and settings.webhook is not None:
            try:
                await announce_budget_exhausted(services.pool, outcome, admission)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # The refusal stands; the next refused request announces it (same dedupe key).
                log.warning("budget_crossed_not_enqueued", error_type=type(exc).__name__)
        raise refusal_error(outcome, exchange)
    exchange.budget_periods = outcome.budget_periods
    exchange.rate_headers = rate_headers(outcome)
    exchange.lease, exchange.hold = outcome.lease, hold


def unbounded_error(worst: WorstCase, exchange: Exchange) -> ApiError:
    model = exchange.head.model
    fixes = []
    if "output" in worst.assumed:
        fixes.append(f"send max_tokens (or max_completion_tokens), or set model_info.max_output_tokens for {model!r}")
    if "media" in worst.assumed:
        fixes.append(f"set model_info.max_input_tokens for {model!r}")
    return ApiError(
        400,
        "This request's cost has no known bound and reject_unbounded_requests is set: " + "; ".join(fixes),
        "invalid_request_error",
        code="unbounded_request",
        param="max_tokens" if "output" in worst.assumed else "messages",
        headers={"x-litellm-call-id": exchange.call_id},
    )


def rate_headers(admitted: Admitted) -> dict[str, str]:
    headers = {}
    if admitted.remaining_requests is not None:
        headers["x-ratelimit-remaining-requests"] = str(admitted.remaining_requests)
    if admitted.remaining_tokens is not None:
        headers["x-ratelimit-remaining-tokens"] = str(max(0, admitted.remaining_tokens))
    return headers


def refusal_error(refused: Refused, exchange: Exchange) -> ApiError:
    base = {"x-litellm-call-id": exchange.call_id}
    message = refused.message()
    if refused.reason == "budget_exceeded":
        return ApiError(429, message, "budget_exceeded", headers={**base, "x-should-retry": "false"})
    if refused.reason == "rate_limit_exceeded":
        limit_type = refused.detail.get("limit_type")
        headers = {**base, "retry-after": str(refused.retry_after)}
        if limit_type == "rpm":
            headers |= {
                "x-ratelimit-limit-requests": str(refused.detail.get("limit")),
                "x-ratelimit-remaining-requests": "0",
            }
        elif limit_type == "tpm":
            headers |= {
                "x-ratelimit-limit-tokens": str(refused.detail.get("limit")),
                "x-ratelimit-remaining-tokens": "0",
            }
        return ApiError(429, message, "rate_limit_exceeded", headers=headers)
    if refused.reason == "customer_blocked":
        return ApiError(403, message, "customer_blocked", headers=base)
    if refused.reason == "model_access_denied":
        return ApiError(401, message, "key_model_access_denied", param="model", headers=base)
    return ApiError(401, message, "auth_error", code="401", headers=base)
