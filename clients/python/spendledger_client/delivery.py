"""What an answer to POST /usage means for its batch, and how long to wait before trying again.

Shared by the sync sender and the async `record_now`: they differ only in how they send.

| answer                                   | verdict   | the batch's records                          |
|------------------------------------------|-----------|----------------------------------------------|
| 200 with one result per record           | DELIVERED | settled: dropped from the spool (errors to `on_error`) |
| no answer (connection, timeout), 408, 409, 425, 429, 5xx | RETRY | kept; tried again after a backoff (`retry-after` honoured) |
| 400, 413, 422                            | SPLIT     | kept; sent in halves, so one bad record is found and rejected alone |
| any other 4xx (401, 403, 404 …)          | HALT      | kept in the spool; this client stops sending (its key or URL is wrong) |

409 is retried: every record is idempotent by call_id, and the contract answers a real conflict per
record (outcome "error", code "conflict") inside a 200, so a whole-request 409 can only be a
transient clash (another send of the same call_ids in progress); a resend then answers per record.
"""

from __future__ import annotations

import enum
import json
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from .errors import APIError, ErrorInfo, Unreachable, api_error
from .records import Hold, Result

RETRY_STATUSES = frozenset({408, 409, 425, 429})
SPLIT_STATUSES = frozenset({400, 413, 422})


class Verdict(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    SPLIT = "split"
    HALT = "halt"


@dataclass(frozen=True, slots=True)
class Attempt:
    verdict: Verdict
    results: list[Result] | None = None
    error: APIError | Unreachable | None = None
    retry_after_s: float | None = None


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential with "equal jitter": attempt k waits between half of and the whole of
    min(max_s, initial_s * 2**k), so clients that failed together do not come back together, and
    none comes back at once. A server's `retry-after` is taken as said, capped at max_s."""

    initial_s: float
    max_s: float

    def delay(self, attempt: int, retry_after_s: float | None = None) -> float:
        if retry_after_s is not None:
            return min(max(retry_after_s, 0.0), self.max_s)
        ceiling = min(self.max_s, self.initial_s * 2 ** min(attempt, 62))
        return random.uniform(ceiling / 2, ceiling)


def unreachable(exc: httpx.HTTPError) -> Attempt:
    return Attempt(Verdict.RETRY, error=Unreachable(f"{type(exc).__name__}: {exc}"))


def interpret(response: httpx.Response, expected: int) -> Attempt:
    """The verdict on a batch of `expected` records from the server's answer."""
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    body = parse_json(response.content)
    if response.status_code == 200:
        return _results(body, expected)
    error = api_error(response.status_code, body, retry_after)
    status = response.status_code
    if status in RETRY_STATUSES or status >= 500:
        return Attempt(Verdict.RETRY, error=error, retry_after_s=retry_after)
    if status in SPLIT_STATUSES:
        return Attempt(Verdict.SPLIT, error=error)
    return Attempt(Verdict.HALT, error=error)


def _results(body: Any, expected: int) -> Attempt:
    raw = body.get("results") if isinstance(body, dict) else None
    if not isinstance(raw, list) or len(raw) != expected or not all(isinstance(r, dict) for r in raw):
        # Not the contract's answer (a proxy's page, a half-deployed server): nothing is known to be
        # settled, so everything is kept and sent again.
        info = ErrorInfo(f"200 without {expected} results", "invalid_response", "invalid_response")
        return Attempt(Verdict.RETRY, error=APIError(200, info))
    return Attempt(Verdict.DELIVERED, results=[Result.from_json(r) for r in raw])


def parse_json(content: bytes) -> Any:
    """JSON with its fractions as Decimal (costs are money); None when the body is not JSON."""
    try:
        return json.loads(content, parse_float=Decimal)
    except ValueError:
        return None


def parse_retry_after(value: str | None) -> float | None:
    """`retry-after` as seconds: delta-seconds, or an HTTP date (RFC 9110)."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


def rejected(call_id: str, error: APIError | Unreachable | None) -> Result:
    """The result of a record the server refused alone (a 400 on a batch of one)."""
    info = (
        error.error
        if isinstance(error, APIError)
        else ErrorInfo(str(error), "invalid_request_error", "invalid_record")
    )
    return Result(call_id=call_id, outcome="error", error=info)


def admit_body(
    model: str,
    user: str | None,
    prompt_tokens: int | None,
    messages: list[Any] | None,
    max_tokens: int | None,
    n: int | None,
) -> dict[str, Any]:
    return {
        "model": model,
        "user": user,
        "prompt_tokens": prompt_tokens,
        "messages": messages,
        "max_tokens": max_tokens,
        "n": n,
    }


def hold_from(response: httpx.Response, model: str, user: str | None) -> Hold:
    """The hold of a 200 from /usage/admit; any other answer raised as its typed exception."""
    body = parse_json(response.content)
    if response.status_code != 200:
        raise api_error(response.status_code, body, parse_retry_after(response.headers.get("retry-after")))
    if not isinstance(body, dict) or not isinstance(body.get("hold_id"), str):
        raise APIError(200, ErrorInfo("200 without a hold_id", "invalid_response", "invalid_response"))
    expires = body.get("expires_at")
    return Hold(
        hold_id=body["hold_id"],
        expires_at=datetime.fromisoformat(expires) if isinstance(expires, str) else None,
        model=model,
        user=user,
    )
