"""The client's exceptions: the server's OpenAI-style error envelope as typed exceptions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """OpenAI's error object: `{"message", "type", "code", "param"}` (a record's or a request's)."""

    message: str
    type: str
    code: str
    param: str | None = None

    @classmethod
    def from_json(cls, value: object) -> ErrorInfo:
        """Lenient: a server (or a proxy in front of it) that says less still gives an ErrorInfo."""
        if not isinstance(value, dict):
            return cls(message=str(value), type="unknown", code="unknown")
        param = value.get("param")
        return cls(
            message=str(value.get("message", "")),
            type=str(value.get("type", "unknown")),
            code=str(value.get("code", "unknown")),
            param=None if param is None else str(param),
        )


class SpendLedgerError(Exception):
    """Every exception this package raises."""


class APIError(SpendLedgerError):
    """A whole request answered with an error status (401 key, 403, 400, 413, 429, 5xx …)."""

    def __init__(self, status_code: int, error: ErrorInfo, *, retry_after_s: float | None = None) -> None:
        super().__init__(f"{status_code} {error.code}: {error.message}")
        self.status_code = status_code
        self.error = error
        self.message = error.message
        self.code = error.code
        self.retry_after_s = retry_after_s


class Refused(APIError):
    """/usage/admit said no: the call must not be made (or the caller takes the risk)."""


class BudgetExceeded(Refused):
    """429 `budget_exceeded`: a budget of the key, user, team or customer has no room for the call."""


class RateLimited(Refused):
    """429 `rate_limit_exceeded`: `retry_after_s` says when to try again, if the server said."""


class CustomerBlocked(Refused):
    """403 `customer_blocked`: the customer (`user`) is blocked."""


class Unreachable(SpendLedgerError):
    """No answer from the server: connection refused or reset, DNS, timeout."""


class DeliveryDeferred(SpendLedgerError):
    """`record_now` could not deliver within its time; the record stays queued (and spooled) and the
    background sender delivers it later."""

    def __init__(self, call_id: str, cause: BaseException | None) -> None:
        super().__init__(f"record {call_id!r} not delivered yet ({cause!r}); it stays queued")
        self.call_id = call_id
        self.cause = cause


class SpoolLocked(SpendLedgerError):
    """Another live client (this process or another) holds the spool file: two senders on one
    spool would send each record twice and compact each other's writes away."""


_REFUSALS: dict[str, type[Refused]] = {
    "budget_exceeded": BudgetExceeded,
    "rate_limit_exceeded": RateLimited,
    "customer_blocked": CustomerBlocked,
}


def api_error(status_code: int, body: Any, retry_after_s: float | None) -> APIError:
    """The typed exception for an error answer; `body` is the parsed JSON (or anything else)."""
    raw = body.get("error") if isinstance(body, dict) else None
    info = (
        ErrorInfo.from_json(raw)
        if raw is not None
        else ErrorInfo(message=f"HTTP {status_code}", type="http_error", code=str(status_code))
    )
    cls = _REFUSALS.get(info.code, APIError)
    return cls(status_code, info, retry_after_s=retry_after_s)
