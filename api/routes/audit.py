"""GET /audit/events: the immutable event log, filtered and cursor-paginated, as JSON or NDJSON.

Who may read: whoever may read everything (`proxy_admin`, `proxy_admin_viewer`: api/roles.py), and a
generated key whose `metadata.role` is `read_only` or `auditor` — only the events of its own key,
whatever filters it sends (they are intersected with that scope, never widen it). Any other key is
refused (403).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

import msgspec
from litestar import Request, Response, get
from litestar.params import Parameter
from litestar.response import Stream

from spendledger.api.auth import Caller, caller_of, forbidden, requires
from spendledger.api.errors import bad_request
from spendledger.api.jsonio import json_response
from spendledger.api.roles import Permission
from spendledger.api.schemas import READ, documented, text
from spendledger.api.services import Services, services_of
from spendledger.ledger.errors import NotFound
from spendledger.ledger.keys import hash_key
from spendledger.projections.audit import (
    EVENT_TYPES,
    MAX_LIMIT,
    AuditEvent,
    AuditFilters,
    InvalidCursor,
    current_horizon,
    decode_cursor,
    event_types,
    key_hash_for_alias,
    looks_like_key_hash,
    read_events,
)

AUDIT_ROLES: Final = frozenset({"read_only", "auditor"})
DEFAULT_LIMIT: Final = 100
NDJSON_PAGE: Final = MAX_LIMIT
_line_encoder: Final = msgspec.json.Encoder()
# A "+hh:mm" offset sent unencoded in a query string arrives as " hh:mm".
_SPACED_OFFSET: Final = re.compile(r" (\d{2}:?\d{2})$")


class AuditEventView(msgspec.Struct, kw_only=True):
    """An event as the log holds it (`projections.audit.AuditEvent`; `data` and `metadata` are the
    stored JSON, passed through)."""

    position: int
    txid: str
    stream: str
    version: int
    type: str
    data: dict[str, Any]
    metadata: dict[str, Any]
    recorded_at: datetime


class AuditPage(msgspec.Struct, kw_only=True):
    events: list[AuditEventView]
    next_cursor: str | None  # null: nothing more is visible yet


def _scope_of(caller: Caller) -> str | None:
    """None for a caller that reads everything (no restriction), the key's own hash for an auditor key."""
    if caller.may(Permission.READ_ALL):
        return None
    role = caller.key.metadata.get("role") if caller.key is not None else None
    if role not in AUDIT_ROLES:
        raise forbidden(
            "Reading the audit log needs a proxy_admin or proxy_admin_viewer, or a key with "
            "metadata.role read_only (its own events)"
        )
    return caller.key_hash


def _actor(value: str | None) -> str | None:
    """An actor as events name it; a generated key may be given as itself (`sk-…`)."""
    if value is not None and value.startswith("sk-"):
        return f"key:{hash_key(value)}"
    return value


def _datetime(value: str | None, param: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(_SPACED_OFFSET.sub(r"+\1", value.strip()))
    except ValueError:
        raise bad_request(
            f"{param} must be an ISO 8601 date or datetime (e.g. 2026-11-30T12:00:00Z), got {value!r}",
            param=param,
        ) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


async def _key_hash(services: Services, value: str, restricted: bool) -> str:
    """`sk-…` key → its hash; a sha256 hex digest as is; else a key alias."""
    if value.startswith("sk-"):
        return hash_key(value)
    if looks_like_key_hash(value):
        return value
    key_hash = await key_hash_for_alias(services.pool, value)
    if key_hash is not None:
        return key_hash
    if restricted:
        # A restricted caller learns nothing about other keys: an unknown alias just selects nothing.
        return "0" * 64
    raise NotFound(f"no key has (or had) the alias {value!r}", param="key")


@get(
    "/audit/events",
    guards=[requires(None)],
    tags=["audit"],
    summary="The immutable event log, filtered by customer, user, team, key, model, type and time",
    **documented(*READ, 404, also={"application/x-ndjson": text("format=ndjson: one event per line")}),
)
async def audit_events(
    request: Request[Any, Any, Any],
    customer: str | None = None,
    user: str | None = None,
    team: str | None = None,
    key: str | None = None,
    model: str | None = None,
    actor: str | None = None,
    types: Annotated[list[str] | None, Parameter(query="type")] = None,
    start: str | None = None,
    end: str | None = None,
    cursor: str | None = None,
    limit: int | None = Parameter(default=None, ge=1, le=MAX_LIMIT),
    format: Literal["json", "ndjson"] = "json",
) -> Response[AuditPage]:
    scope_key = _scope_of(caller_of(request))
    services = services_of(request)
    for name, value in (
        ("customer", customer),
        ("user", user),
        ("team", team),
        ("key", key),
        ("model", model),
        ("actor", actor),
    ):
        if value is not None and "\x00" in value:
            raise bad_request(f"{name} must not contain NUL characters", param=name)

    type_names = event_types(types or ())
    unknown = [name for name in type_names if name not in EVENT_TYPES]
    if unknown:
        raise bad_request(
            f"unknown event type(s): {', '.join(unknown)}; known: {', '.join(sorted(EVENT_TYPES))}",
            param="type",
        )
    start_at, end_at = _datetime(start, "start"), _datetime(end, "end")
    if start_at is not None and end_at is not None and end_at < start_at:
        raise bad_request("end must not be before start", param="end")
    if cursor is not None:
        try:
            decode_cursor(cursor)
        except InvalidCursor:
            raise bad_request("cursor is not one this API returned", param="cursor") from None
    filters = AuditFilters(
        customer=customer,
        user=user,
        team=team,
        key=await _key_hash(services, key, restricted=scope_key is not None) if key is not None else None,
        scope_key=scope_key,
        model=model,
        actor=_actor(actor),
        types=type_names,
        start=start_at,
        end=end_at,
    )

    if format == "ndjson":
        page_size = limit or NDJSON_PAGE
        horizon = await current_horizon(services.pool)
        # The first page is read before the response starts, so that a failing query still gets
        # an error envelope instead of a stream cut short.
        first = await read_events(services.pool, filters, cursor, page_size, horizon)
        # NDJSON lines, where the annotation documents the JSON page (api/schemas.py).
        stream: Response[Any] = Stream(
            _ndjson(services, filters, first, page_size, horizon),
            media_type="application/x-ndjson",
            headers={"Cache-Control": "no-store"},
        )
        return stream
    events, next_cursor = await read_events(services.pool, filters, cursor, limit or DEFAULT_LIMIT)
    return json_response({"events": events, "next_cursor": next_cursor})


async def _ndjson(
    services: Services,
    filters: AuditFilters,
    page: tuple[list[AuditEvent], str | None],
    page_size: int,
    horizon: int,
) -> AsyncIterator[bytes]:
    """Every matching event committed before the stream began, one page (one query) at a time, so
    memory stays flat and no connection is held while the client reads."""
    while True:
        events, cursor = page
        if events:
            yield b"".join(_line_encoder.encode(event) + b"\n" for event in events)
        if cursor is None:
            return
        page = await read_events(services.pool, filters, cursor, page_size, horizon)


route_handlers = [audit_events]
