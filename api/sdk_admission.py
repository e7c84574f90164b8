"""`POST /usage/admit`: a budget hold for an LLM call made outside the gateway, taken before the call
as the proxy takes one before it forwards — the same worst case, the same refusals (429
`budget_exceeded` / `rate_limit_exceeded`, 403 `customer_blocked`). The hold's id is the call id the
usage is then recorded under (`POST /usage` with that `call_id`), which releases it; a hold never
recorded expires as the proxy's do."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Final

import msgspec
from msgspec import Meta

from spendledger.api.auth import Caller
from spendledger.api.enforcement import hold_grace, refusal_error, unbounded_message
from spendledger.api.errors import ApiError, bad_request
from spendledger.api.prompt_text import prompt_text_tokens
from spendledger.api.services import Services
from spendledger.ledger.admission import Admission, Refused
from spendledger.ledger.events import Route
from spendledger.ledger.holds import RequestShape, worst_case_cost, worst_case_tokens
from spendledger.ledger.identifiers import Identifier
from spendledger.ledger.scopes import Scopes

Tokens = Annotated[int, Meta(ge=0, le=100_000_000)]


class AdmitRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: Identifier
    user: Identifier | None = None  # the customer billed
    call_id: Identifier | None = None  # default: a new one, answered as the hold's id
    route: Route = "chat.completions"
    messages: list[dict[str, Any]] | None = None  # the prompt, to bound its tokens as the proxy does
    prompt_tokens: Tokens | None = None  # or the prompt's size in tokens, as the caller counts it
    max_tokens: Tokens | None = None
    n: Annotated[int, Meta(ge=1, le=128)] = 1
    timeout_s: Annotated[int, Meta(ge=1, le=3600)] = 600  # how long the call may take


class Hold(msgspec.Struct, kw_only=True):
    hold_id: str  # record the call's usage with this call_id: it releases the hold
    expires_at: datetime
    hold: Decimal  # the worst-case cost held, USD


_ALREADY: Final = "select exists(select from holds where call_id = $1) or exists(select from events where stream = $2)"


def _shape(data: AdmitRequest) -> RequestShape:
    if data.messages is not None:
        text = prompt_text_tokens({"messages": msgspec.Raw(msgspec.json.encode(data.messages))})
    elif data.prompt_tokens is not None:
        text = data.prompt_tokens
    else:
        raise bad_request("Send the prompt: `messages`, or its size as `prompt_tokens`", param="messages")
    if data.route == "embeddings":
        return RequestShape(text_tokens=text, generates=False, bounded_by_context=False)
    return RequestShape(text_tokens=text, completions=data.n, output_cap=data.max_tokens)


async def admit_call(services: Services, caller: Caller, data: AdmitRequest) -> Hold:
    deployments = services.router.deployments(data.model)
    if not deployments:
        raise bad_request(f"Model {data.model!r} is not a model group of this gateway", param="model")
    if not caller.allows_model(data.model):
        raise ApiError(401, f"API key not allowed to access model {data.model!r}", "key_model_access_denied", param="model")
    deployment = deployments[0]
    worst = worst_case_tokens(_shape(data), services.prices.limits(deployment.deployment_id))
    if worst.assumed and services.settings.reject_unbounded_requests:
        raise ApiError(400, unbounded_message(worst, data.model), "invalid_request_error", code="unbounded_request", param="max_tokens")
    call_id = data.call_id or str(uuid.uuid4())
    if await services.pool.fetchval(_ALREADY, call_id, f"request:{call_id}"):
        raise ApiError(409, f"call_id {call_id!r} is held or recorded already", "conflict", param="call_id")
    now = datetime.now(UTC)
    expires_at = now + timedelta(seconds=data.timeout_s) + hold_grace()
    hold = worst_case_cost(services.prices.price(deployment.deployment_id), worst)
    admission = Admission(
        call_id=call_id,
        route=data.route,
        model=data.model,
        scopes=Scopes(caller.key_hash, caller.user_id, caller.team_id, caller.customer_for(data.user)),
        key_alias=caller.key_alias,
        hold=hold,
        expires_at=expires_at,
        budgets=services.budgets,
        refused_at=now,
        actor=caller.actor,
    )
    outcome = await services.tickets.admit_held(admission)
    if isinstance(outcome, Refused):
        raise refusal_error(outcome, call_id)
    return Hold(hold_id=call_id, expires_at=expires_at, hold=hold)
