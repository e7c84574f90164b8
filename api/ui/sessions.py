"""Sign-ins to the admin UI: a session cookie, its row in `ui_sessions`, and CSRF tokens.

The cookie holds 32 random bytes; the database holds only their SHA-256, the hash of the key that
signed in, and the session's CSRF token. Each page reads the row and checks the key again
(`caller_for_hash`): a key blocked, deleted or expired since sign-in ends the session at once.
Forms carry the session's CSRF token, compared in constant time; the cookie is `HttpOnly`,
`SameSite=Strict`, and `Secure` when served over TLS, scoped to /ui.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import asyncpg
import msgspec
from litestar import Request
from litestar.datastructures import Cookie

from spendledger.api.auth import Caller, caller_for_hash
from spendledger.api.errors import ApiError
from spendledger.api.services import Services, services_of

COOKIE: Final = "spendledger_ui"
LOGIN_COOKIE: Final = "spendledger_ui_login"  # the sign-in form's own CSRF token (no session yet)
LIFETIME: Final = timedelta(hours=12)


class SignInRequired(Exception):
    """No session, or one that ended: the page sends the browser to the sign-in form."""


class CsrfRefused(Exception):
    """A form posted without the session's CSRF token."""


class UiSession(msgspec.Struct, frozen=True, kw_only=True):
    caller: Caller
    csrf_token: str
    token_hash: str


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def start_session(pool: asyncpg.Pool, caller: Caller, now: datetime) -> tuple[str, str]:
    """A new session for `caller`: (the cookie's value, its CSRF token)."""
    token = secrets.token_urlsafe(32)
    csrf_token = secrets.token_urlsafe(32)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("delete from ui_sessions where expires_at < $1", now)
        await conn.execute(
            "insert into ui_sessions (token_hash, key_hash, is_master, csrf_token, created_at, expires_at) "
            "values ($1, $2, $3, $4, $5, $6)",
            _hash(token),
            caller.key_hash,
            caller.is_master,
            csrf_token,
            now,
            now + LIFETIME,
        )
    return token, csrf_token


async def end_session(pool: asyncpg.Pool, token_hash: str) -> None:
    await pool.execute("delete from ui_sessions where token_hash = $1", token_hash)


async def current_session(request: Request[Any, Any, Any]) -> UiSession:
    """The signed-in session of this request, its key checked again; else `SignInRequired`."""
    token = request.cookies.get(COOKIE)
    if not token or len(token) > 100:
        raise SignInRequired
    services: Services = services_of(request)
    token_hash = _hash(token)
    row = await services.pool.fetchrow(
        "select key_hash, is_master, csrf_token from ui_sessions where token_hash = $1 and expires_at > now()",
        token_hash,
    )
    if row is None:
        raise SignInRequired
    try:
        caller = await caller_for_hash(services, row["key_hash"], row["is_master"])
    except ApiError:
        await end_session(services.pool, token_hash)
        raise SignInRequired from None
    return UiSession(caller=caller, csrf_token=row["csrf_token"], token_hash=token_hash)


def check_csrf(sent: str | None, expected: str) -> None:
    if not sent or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise CsrfRefused


def session_cookie(request: Request[Any, Any, Any], token: str | None) -> Cookie:
    """The session cookie to set (`token`), or to clear (None)."""
    return Cookie(
        key=COOKIE,
        value=token or "",
        path="/ui",
        httponly=True,
        secure=request.url.scheme == "https",
        samesite="strict",
        max_age=int(LIFETIME.total_seconds()) if token else 0,
    )


def login_cookie(request: Request[Any, Any, Any], token: str) -> Cookie:
    return Cookie(
        key=LOGIN_COOKIE,
        value=token,
        path="/ui/login",
        httponly=True,
        secure=request.url.scheme == "https",
        samesite="strict",
        max_age=3600,
    )


def now_utc() -> datetime:
    return datetime.now(UTC)
