"""OpenAI-style errors: every failure leaves as `{"error": {message, type, param, code}}`.

Domain exceptions from the ledger, Litestar's own HTTP exceptions (validation, 404, 405, 413) and
anything unexpected are all mapped here, so no route ever answers with Litestar's default body.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import asyncpg
import structlog
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from spendledger.api.jsonio import json_response
from spendledger.ledger.config_values import ConfigError
from spendledger.ledger.db import database_unavailable
from spendledger.ledger.errors import AlreadyExists, InvalidCommand, LedgerError, NotFound
from spendledger.ledger.identifiers import ID_MAX_LENGTH, ID_RULE
from spendledger.ledger.store import ConcurrencyError

log = structlog.get_logger(__name__)

# How long a client should wait before retrying while the database is unreachable (seconds).
LEDGER_RETRY_AFTER_S = 2


class ApiError(Exception):
    """An error the API answers on purpose, with its status, type and code."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code or type_
        self.param = param
        self.headers = dict(headers or {})

    def response(self) -> Response[Any]:
        return error_response(self.status, self.message, self.type, self.code, self.param, self.headers)


def error_response(
    status: int,
    message: str,
    type_: str,
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response[Any]:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code or type_}}
    if type_ == "ledger_unavailable" and not any(name.lower() == "retry-after" for name in headers or {}):
        # Every 503 of an unreachable ledger says when to retry, whichever code path raised it.
        headers = {**(headers or {}), "retry-after": str(LEDGER_RETRY_AFTER_S)}
    return json_response(body, status, headers)


def auth_error(message: str) -> ApiError:
    return ApiError(401, message, "auth_error", "401")


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", "invalid_request", param)


def _handle_api_error(_: Request[Any, Any, Any], exc: ApiError) -> Response[Any]:
    return exc.response()


def _handle_ledger_error(_: Request[Any, Any, Any], exc: LedgerError) -> Response[Any]:
    if isinstance(exc, NotFound):
        return error_response(404, exc.message, "not_found_error", "not_found", exc.param)
    if isinstance(exc, AlreadyExists):
        return error_response(400, exc.message, "invalid_request_error", "already_exists", exc.param)
    if isinstance(exc, InvalidCommand):
        return error_response(400, exc.message, "invalid_request_error", "invalid_request", exc.param)
    return error_response(400, exc.message, "invalid_request_error", "invalid_request", exc.param)


def _handle_conflict(_: Request[Any, Any, Any], exc: ConcurrencyError) -> Response[Any]:
    """Two commands raced on one stream and this one lost: nothing was written; send it again."""
    message = f"{exc}: another change to the same object won the race; nothing was written, retry"
    return error_response(409, message, "conflict_error", "conflict")


def _handle_validation(request: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    param = None
    details = []
    for item in exc.extra or []:
        if isinstance(item, dict):
            key = item.get("key")
            if key and param is None:
                param = str(key)
            details.append(f"{item.get('key') or 'body'}: {_readable(str(item.get('message')))}")
    where = exc.detail
    if where.startswith("Validation failed for "):
        # By method and path only: Litestar's own detail repeats the query string, whatever it holds.
        where = f"Validation failed for {request.method} {request.url.path}"
    message = where if not details else f"{where}: " + "; ".join(details)
    return error_response(400, message, "invalid_request_error", "invalid_request", param)


# What msgspec says when a value breaks the id rule (ledger/identifiers.py): its bounds, its regex.
_ID_VIOLATIONS = ("Expected `str` of length >= 1", f"Expected `str` of length <= {ID_MAX_LENGTH}")


def _readable(message: str) -> str:
    """An id's violation as the id rule, not as msgspec's bound or the regex it was checked with."""
    if message.startswith("Expected `str` matching regex") or message in _ID_VIOLATIONS:
        return f"Expected an id: {ID_RULE}"
    return message


_STATUS_TYPES = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("auth_error", "401"),
    403: ("permission_denied", "403"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
}


def _handle_http(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    type_, code = _STATUS_TYPES.get(exc.status_code, ("api_error", str(exc.status_code)))
    headers = dict(exc.headers or {})
    return error_response(exc.status_code, str(exc.detail), type_, code, None, headers)


def _handle_unstorable(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """A value PostgreSQL refuses (NUL in text, a number out of range): the caller's input, not a 500."""
    log.warning("unstorable_input", path=request.url.path, error_type=type(exc).__name__)
    # Only the server's own messages are echoed (they carry a severity): asyncpg raises the same
    # class client-side for an argument it cannot encode, quoting the argument, whatever it holds.
    from_server = isinstance(exc, asyncpg.PostgresError) and getattr(exc, "severity", None)
    reason = str(exc) if from_server else "a value is out of range or of the wrong type"
    message = f"A value in the request cannot be stored: {reason}"
    return error_response(400, message, "invalid_request_error", "invalid_request")


def _handle_database_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """The database is down, restarting or out of connections: 503 with a retry-after, on any
    route. The message names nothing of the database (its address may carry a password)."""
    if not database_unavailable(exc):
        return _handle_unexpected(request, exc)
    log.error("ledger_unavailable", path=request.url.path, error_type=type(exc).__name__)
    message = "The ledger database is unavailable; retry shortly"
    return error_response(503, message, "ledger_unavailable")


def _handle_recursion(request: Request[Any, Any, Any], exc: RecursionError) -> Response[Any]:
    """Only a client's input nests deep enough to exhaust the stack (a JSON body decoded by
    Litestar or msgspec): the caller's fault, never a 500."""
    log.warning("input_nested_too_deeply", path=request.url.path)
    message = "The request is nested too deeply to be read"
    return error_response(400, message, "invalid_request_error", "invalid_request")


def _handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    if isinstance(exc, ConfigError):
        return error_response(500, str(exc), "config_error")
    log.error("unhandled_error", path=request.url.path, error_type=type(exc).__name__, exc_info=exc)
    return error_response(500, "internal server error", "internal_error")


exception_handlers: Mapping[Any, Any] = {
    ApiError: _handle_api_error,
    LedgerError: _handle_ledger_error,
    ConcurrencyError: _handle_conflict,
    ValidationException: _handle_validation,
    HTTPException: _handle_http,
    # asyncpg's server-side data errors (class 22) and its client-side argument-encoding errors
    asyncpg.DataError: _handle_unstorable,
    asyncpg.exceptions._base.DataError: _handle_unstorable,
    # Connection-level failures (the handler tells them from other errors of these classes).
    OSError: _handle_database_error,
    asyncpg.PostgresConnectionError: _handle_database_error,
    asyncpg.InterfaceError: _handle_database_error,
    asyncpg.CannotConnectNowError: _handle_database_error,
    asyncpg.AdminShutdownError: _handle_database_error,
    asyncpg.CrashShutdownError: _handle_database_error,
    asyncpg.TooManyConnectionsError: _handle_database_error,
    RecursionError: _handle_recursion,
    Exception: _handle_unexpected,
}
