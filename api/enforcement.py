"""Admission on the request path: build the `Admission`, have the ledger admit it (its `Ticket`),
and turn a refusal into the status, error type and headers of CONTRACT §5."""

from __future__ import annotations

import functools
import os
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Final

import msgspec

from spendledger.api.errors import ApiError
from spendledger.api.metrics import observe_admission, observe_request
from spendledger.api.proxy import Exchange
from spendledger.api.services import Services
from spendledger.ledger.admission import HOLD_GRACE, Admission, Refused
from spendledger.ledger.config import Deployment
from spendledger.ledger.holds import RequestShape, WorstCase, worst_case_cost, worst_case_tokens
from spendledger.ledger.tickets import Ticket

# A stream may run far longer than the upstream's read timeout: its hold must outlive it.
_STREAM_HOLD_FLOOR: Final = timedelta(minutes=10)


@functools.cache
def hold_grace() -> timedelta:
    """SPENDLEDGER_HOLD_GRACE_S shortens the grace (tests of crashed processes use it); read once,
    not on every request."""
    value = os.environ.get("SPENDLEDGER_HOLD_GRACE_S")
    return timedelta(seconds=float(value)) if value else HOLD_GRACE


async def admit(services: Services, exchange: Exchange, shape: RequestShape) -> Ticket:
    """Hold the request's worst-case cost on every scope (the ticket that owns it until the request
    settles), or raise the refusal as an ApiError."""
    now = datetime.now(UTC)
    chain = services.router.chain(exchange.head.model)
    timeout = timedelta(seconds=services.router.time_bound_s(exchange.head.model, exchange.head.stream))
    if exchange.head.stream:
        timeout = max(timeout, _STREAM_HOLD_FLOOR)
    settings = services.settings
    worst, hold = _dearest(services, chain, shape)
    if worst.assumed and settings.reject_unbounded_requests:
        raise unbounded_error(worst, exchange)
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
    outcome = await services.tickets.admit(admission)
    if isinstance(outcome, Refused):  # its RequestRefused is the request's terminal event
        observe_admission(False, False)
        observe_request(exchange.route, "refused", exchange.head.model, priced=True)
        raise refusal_error(outcome, exchange.call_id)
    observe_admission(outcome.lease is not None, True)
    return outcome


def _dearest(services: Services, chain: tuple[Deployment, ...], shape: RequestShape) -> tuple[WorstCase, Decimal]:
    """The worst case over every deployment the request may end up calling (its group's and its
    fallbacks'): whichever answers, or whichever bills, the hold covers it."""
    prices = services.prices
    worst = worst_case_tokens(shape, prices.limits(chain[0].deployment_id))
    hold = worst_case_cost(prices.price(chain[0].deployment_id), worst)
    for deployment in chain[1:]:
        other = worst_case_tokens(shape, prices.limits(deployment.deployment_id))
        cost = worst_case_cost(prices.price(deployment.deployment_id), other)
        if other.assumed and not worst.assumed:
            worst = msgspec.structs.replace(worst, assumed=other.assumed)
        hold = max(hold, cost)
    return worst, hold


def unbounded_error(worst: WorstCase, exchange: Exchange) -> ApiError:
    return ApiError(
        400,
        unbounded_message(worst, exchange.head.model),
        "invalid_request_error",
        code="unbounded_request",
        param="max_tokens" if "output" in worst.assumed else "messages",
        headers={"x-litellm-call-id": exchange.call_id},
    )


def unbounded_message(worst: WorstCase, model: str) -> str:
    fixes = []
    if "output" in worst.assumed:
        fixes.append(f"send max_tokens (or max_completion_tokens), or set model_info.max_output_tokens for {model!r}")
    if "media" in worst.assumed:
        fixes.append(f"set model_info.max_input_tokens for {model!r}")
    return "This request's cost has no known bound and reject_unbounded_requests is set: " + "; ".join(fixes)


def refusal_error(refused: Refused, call_id: str) -> ApiError:
    base = {"x-litellm-call-id": call_id}
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
