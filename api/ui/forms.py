"""Forms posted by the admin UI's pages: the CSRF check, the permission, and the fields turned into
the API's own request Structs — so a form is held to exactly the rules of the route it mirrors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, TypeVar

import msgspec
from litestar import Request

from spendledger.api.errors import ApiError
from spendledger.api.roles import Permission
from spendledger.api.ui.sessions import UiSession, check_csrf, current_session
from spendledger.ledger.errors import AlreadyExists, LedgerError, NotFound

T = TypeVar("T")

CSRF_FIELD: Final = "csrf_token"
MAX_FIELD_LENGTH: Final = 4096  # no field of these forms needs more; a longer one is refused whole


class UiForbidden(Exception):
    """The signed-in key's role may not do this (a viewer posting a change)."""


class FormRefused(Exception):
    """What was sent breaks a rule: shown above the form, the form kept as it was filled in."""


async def posted_form(request: Request[Any, Any, Any], permission: Permission = Permission.MANAGE) -> tuple[UiSession, dict[str, str]]:
    """The session and the fields of a form posted to a page: signed in, the session's CSRF
    token, and `permission` — checked in that order, before anything is read or written."""
    session = await current_session(request)
    form = await request.form()
    check_csrf(form.get(CSRF_FIELD), session.csrf_token)
    if not session.caller.may(permission):
        raise UiForbidden(f"{session.caller.role or 'this key'} may not {permission.value}")
    fields: dict[str, str] = {}
    for name, value in form.items():
        if name == CSRF_FIELD or not isinstance(value, str):
            continue
        if len(value) > MAX_FIELD_LENGTH:
            raise FormRefused(f"{name}: at most {MAX_FIELD_LENGTH} characters")
        fields[name] = value
    return session, fields


def to_request(
    fields: Mapping[str, str], kind: type[T], labels: Mapping[str, str], fixed: Mapping[str, Any] | None = None,
    *, cleared: bool = False,
) -> T:
    """The form's fields as `kind` (an API request Struct), with `fixed` fields added: a field left
    empty is not sent (`cleared`: an edit form, sent as null — the limit removed); numbers are read
    from their text; a list field takes one item per comma. `FormRefused` names the field by its label."""
    body: dict[str, Any] = {}
    for name, value in fields.items():
        text = value.strip()
        if name not in labels:
            continue
        if not text:
            if cleared:
                body[name] = [] if name in _LIST_FIELDS else None
            continue
        body[name] = [item.strip() for item in text.split(",") if item.strip()] if name in _LIST_FIELDS else text
    body.update(fixed or {})
    try:
        return msgspec.convert(body, kind, strict=False)
    except msgspec.ValidationError as exc:
        raise FormRefused(_readable(str(exc), labels)) from None


_LIST_FIELDS: Final = frozenset({"models", "allowed_customers"})


def _readable(message: str, labels: Mapping[str, str]) -> str:
    text, _, where = message.partition(" - at `$.")
    field = where.rstrip("`").split("[")[0].split("`")[0]
    label = labels.get(field, field)
    if text.startswith("Expected `int"):
        text = "expected a whole number"
    elif text.startswith(("Expected `decimal", "Invalid decimal")):
        text = "expected a number, such as 4 or 0.5"
    elif "matching regex" in text or "length" in text:
        text = "expected an id: 1 to 256 characters, no control characters"
    return f"{label}: {text}" if where else text


def refusal(exc: Exception) -> str:
    """The message of a command's refusal, as the API would say it."""
    if isinstance(exc, ApiError | LedgerError):
        return exc.message
    return str(exc)


# What a command refuses with, shown on the page instead of raised.
REFUSED: Final = (ApiError, LedgerError, FormRefused)


def notice(request: Request[Any, Any, Any], thing: str, verbs: tuple[str, ...]) -> str | None:
    """The line a page shows after a change redirected to it (`?created=<id>` …)."""
    for verb in verbs:
        if (name := request.query_params.get(verb)) is not None:
            return f"{thing} {name!r} {verb}."
    return None


def refusal_status(exc: Exception) -> int:
    """The status the API answers the same refusal with."""
    if isinstance(exc, ApiError):
        return exc.status
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, AlreadyExists):
        return 409
    return 400
