"""A non-streaming request through the router (api/attempts.py), billed and answered (streams:
api/streaming.py); and the answer when no call succeeded, which both share."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Response

from spendledger.api.attempts import BodyFor, Failed, Router
from spendledger.api.proxy import (
    Exchange,
    Usage,
    answer_usage,
    estimate_tokens,
    record,
    record_failure,
    upstream_error_response,
)
from spendledger.api.services import Services
from spendledger.api.upstream import UpstreamFailure
from spendledger.ledger.tickets import Ticket


async def failed_response(exchange: Exchange, ticket: Ticket, failed: Failed) -> Response[Any]:
    """Record the request as failed (at the cost of what the providers billed, 0 as a rule) and
    answer the last call's error; raises the gateway's own failures as ApiError."""
    if failed.failure is not None:
        error = await record_failure(exchange, ticket, failed.failure)
        if failed.retry_after is not None:
            error.headers["retry-after"] = str(failed.retry_after)
        raise error
    return await upstream_error_response(exchange, ticket, failed.status, failed.body)


async def forward(services: Services, exchange: Exchange, ticket: Ticket, body_for: BodyFor) -> Response[Any]:
    outcome = await Router(services, exchange, body_for, stream=False).call()
    if isinstance(outcome, Failed):
        return await failed_response(exchange, ticket, outcome)
    exchange.upstream_ended()
    content = outcome.response.content
    try:
        usage = answer_usage(content)
    except msgspec.DecodeError:
        message = f"{exchange.deployment.model_name}: upstream answered with invalid JSON"
        raise await record_failure(exchange, ticket, UpstreamFailure(502, "upstream_error", message)) from None
    estimated = usage is None
    if usage is None:
        usage = Usage(prompt_tokens=estimate_tokens(len(body_for(outcome.deployment))), completion_tokens=estimate_tokens(len(content)))
    event = exchange.usage_event(ticket, status="success", http_status=200, usage=usage, estimated=estimated)
    key_spend = await record(exchange, ticket, event)
    return Response(
        content=content,
        status_code=200,
        media_type="application/json",
        headers=exchange.headers(ticket, event, key_spend),
    )
