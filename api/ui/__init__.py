"""The admin web UI at /ui: server-rendered pages (Jinja, autoescaped), one stylesheet and one small
script shipped in the package — no CDN, no build step. Every change goes through the same command
functions as the management API, with the signed-in key as the event's actor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from litestar import Request, Response, Router, get
from litestar.response import Redirect
from litestar.static_files import create_static_files_router
from litestar.types import ControllerRouterHandler

from spendledger.api.ui import (
    budget_pages,
    customer_pages,
    delivery_pages,
    directory_pages,
    session_pages,
    spend_pages,
)
from spendledger.api.ui.forms import FormRefused, UiForbidden
from spendledger.api.ui.render import SECURITY_HEADERS, page
from spendledger.api.ui.sessions import CsrfRefused, SignInRequired

STATIC = Path(__file__).parent / "static"


def _to_sign_in(request: Request[Any, Any, Any], _: SignInRequired) -> Response[Any]:
    return Redirect("/ui/login", status_code=303)


def _csrf_refused(request: Request[Any, Any, Any], _: CsrfRefused) -> Response[Any]:
    return page(
        "refused.html", None, status_code=403, tab="", title="Form refused",
        message="This form was not sent from a page of this admin UI (its CSRF token is missing or "
        "wrong). Reload the page and try again.",
    )


def _forbidden(request: Request[Any, Any, Any], exc: UiForbidden) -> Response[Any]:
    return page("refused.html", None, status_code=403, tab="", title="Not allowed", message=str(exc))


def _form_refused(request: Request[Any, Any, Any], exc: FormRefused) -> Response[Any]:
    return page("refused.html", None, status_code=400, tab="", title="Form refused", message=str(exc))


@get("/", include_in_schema=False)
async def ui_home() -> Redirect:
    return Redirect("/ui/budgets")


@get("/", include_in_schema=False, status_code=303)
async def root() -> Redirect:
    return Redirect("/ui")


def ui_router() -> Router:
    handlers: list[ControllerRouterHandler] = [
        ui_home,
        *session_pages.route_handlers,
        *budget_pages.route_handlers,
        *customer_pages.route_handlers,
        *directory_pages.route_handlers,
        *spend_pages.route_handlers,
        *delivery_pages.route_handlers,
        create_static_files_router(
            "/static", directories=[STATIC], include_in_schema=False, name="ui-static"
        ),
    ]
    return Router(
        "/ui",
        route_handlers=handlers,
        include_in_schema=False,
        exception_handlers={
            SignInRequired: _to_sign_in,
            CsrfRefused: _csrf_refused,
            UiForbidden: _forbidden,
            FormRefused: _form_refused,
        },
    )


route_handlers: list[ControllerRouterHandler] = [root, ui_router()]
__all__ = ["SECURITY_HEADERS", "route_handlers"]
