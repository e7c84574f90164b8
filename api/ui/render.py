"""Pages as HTML: the Jinja environment (autoescaped), money shown exactly, and the headers every
page carries (a strict Content-Security-Policy: no inline script or style, no framing)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Final

import jinja2
from litestar import Response
from litestar.datastructures import Cookie
from litestar.enums import MediaType

from spendledger.api.roles import Permission
from spendledger.api.ui.sessions import UiSession

SECURITY_HEADERS: Final = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",  # pages show spend and ids: not for shared caches or the back button
}


def money(value: Decimal | int | str | None, dash: str = "—") -> str:
    """An amount as the ledger holds it, every digit and no exponent: `$0.001112`."""
    if value is None:
        return dash
    text = format(Decimal(value), "f")  # the Decimal's own digits: never through a float
    if "." in text:
        text = text.rstrip("0").rstrip(".")  # trailing zeros carry no value
    return f"-${text[1:]}" if text.startswith("-") else f"${text}"


def when(value: datetime | str | None) -> str:
    if value is None:
        return "—"
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def limit(value: Any) -> str:
    return "—" if value is None else str(value)


_environment = jinja2.Environment(
    loader=jinja2.PackageLoader("spendledger.api.ui", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_environment.filters.update(money=money, when=when, limit=limit)


def page(
    template: str,
    session: UiSession | None,
    *,
    status_code: int = 200,
    cookies: list[Cookie] | None = None,
    **context: Any,
) -> Response[str]:
    """The page `template` rendered for `session` (None: signed out)."""
    caller = session.caller if session is not None else None
    html = _environment.get_template(template).render(
        signed_in=caller is not None,
        who=_who(session),
        can_manage=caller is not None and caller.may(Permission.MANAGE),
        csrf_token=session.csrf_token if session is not None else "",
        **context,
    )
    return Response(
        content=html,
        media_type=MediaType.HTML,
        status_code=status_code,
        headers=SECURITY_HEADERS,
        cookies=cookies or [],
    )


def _who(session: UiSession | None) -> str:
    if session is None:
        return ""
    caller = session.caller
    if caller.key is None:
        return "master key" if caller.actor == "master_key" else "open server (no master key)"
    name = caller.key.key_alias or caller.key.key_name
    return f"{name} ({caller.role})" if caller.role else name
