"""Sign in and sign out. Sign-in takes the master key or a key whose role may read everything
(proxy_admin, proxy_admin_viewer); the key itself is never stored, logged or echoed back."""

from __future__ import annotations

import secrets
from typing import Any

from litestar import Request, Response, get, post
from litestar.response import Redirect

from spendledger.api.auth import caller_for_token
from spendledger.api.errors import ApiError
from spendledger.api.roles import Permission
from spendledger.api.services import services_of
from spendledger.api.ui.forms import CSRF_FIELD, posted_form
from spendledger.api.ui.render import page
from spendledger.api.ui.sessions import (
    LOGIN_COOKIE,
    CsrfRefused,
    SignInRequired,
    check_csrf,
    current_session,
    end_session,
    login_cookie,
    now_utc,
    session_cookie,
    start_session,
)


def _sign_in_form(request: Request[Any, Any, Any], error: str | None = None, status_code: int = 200) -> Response[str]:
    token = secrets.token_urlsafe(32)
    return page(
        "login.html",
        None,
        status_code=status_code,
        tab="login",
        login_token=token,
        error=error,
        cookies=[login_cookie(request, token)],
    )


@get("/login", include_in_schema=False)
async def sign_in_page(request: Request[Any, Any, Any]) -> Response[str]:
    try:
        await current_session(request)
    except SignInRequired:
        return _sign_in_form(request)
    return Redirect("/ui/budgets")


@post("/login", include_in_schema=False, status_code=303)
async def sign_in(request: Request[Any, Any, Any]) -> Response[str]:
    form = await request.form()
    expected = request.cookies.get(LOGIN_COOKIE)
    if not expected:
        raise CsrfRefused
    check_csrf(form.get(CSRF_FIELD), expected)
    key = form.get("api_key")
    services = services_of(request)
    try:
        caller = await caller_for_token(services, key.strip() if isinstance(key, str) and key.strip() else None)
    except ApiError:
        return _sign_in_form(request, "That key cannot sign in: unknown, blocked, expired or empty.", 401)
    if not caller.may(Permission.READ_ALL):
        return _sign_in_form(
            request, f"This key's role ({caller.role or 'none'}) may not use the admin UI: it needs "
            "proxy_admin or proxy_admin_viewer.", 403,
        )
    token, _ = await start_session(services.pool, caller, now_utc())
    response: Response[str] = Redirect("/ui/budgets", status_code=303)
    response.set_cookie(session_cookie(request, token))
    response.delete_cookie(LOGIN_COOKIE, path="/ui/login")
    return response


@post("/logout", include_in_schema=False, status_code=303)
async def sign_out(request: Request[Any, Any, Any]) -> Response[str]:
    session, _ = await posted_form(request, Permission.READ_ALL)
    await end_session(services_of(request).pool, session.token_hash)
    response: Response[str] = Redirect("/ui/login", status_code=303)
    response.set_cookie(session_cookie(request, None))
    return response


route_handlers = [sign_in_page, sign_in, sign_out]
