"""The mechanics shared by every managed entity (budgets, customers, teams, users).

Each entity is a stream `<prefix>:<id>` and a projection table whose columns are named like the
event fields, so one projector serves all: a `…Created`/`…Defined` event inserts the row, an update
event sets the fields it carries, a delete event removes the row (its events stay). Commands run in
the caller's transaction and append at the stream's current version, so two writers racing on one
entity cannot both win.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Final

import asyncpg
import msgspec

from spendledger.ledger import store
from spendledger.ledger.connections import Connection, Queryable
from spendledger.ledger.durations import DurationError, parse_duration
from spendledger.ledger.errors import AlreadyExists, InvalidCommand, NotFound
from spendledger.ledger.events import Event, changed_fields

_json: Final = msgspec.json.Encoder(decimal_format="number")


@dataclass(frozen=True, slots=True)
class EntityTable:
    table: str
    id_field: str
    stream_prefix: str
    noun: str  # for messages: "budget", "customer" …
    json_columns: frozenset[str] = frozenset({"metadata"})
    array_columns: frozenset[str] = frozenset({"models"})

    def stream(self, entity_id: str) -> str:
        return f"{self.stream_prefix}:{entity_id}"


BUDGETS: Final = EntityTable("budgets", "budget_id", "budget", "budget")
CUSTOMERS: Final = EntityTable("customers", "user_id", "customer", "customer")
TEAMS: Final = EntityTable("teams", "team_id", "team", "team")
USERS: Final = EntityTable("users", "user_id", "user", "user")


def validate_budget_fields(fields: dict[str, Any]) -> None:
    """Money non-negative and finite, durations parseable, limits non-negative integers."""
    for name in ("max_budget", "soft_budget"):
        value = fields.get(name)
        if value is not None and not _storable_money(value):
            raise InvalidCommand(f"{name} must be a non-negative, finite number, got {value}", param=name)
    duration = fields.get("budget_duration")
    if duration is not None:
        try:
            parse_duration(duration)
        except DurationError as exc:
            raise InvalidCommand(str(exc), param="budget_duration") from None
    for name in ("rpm_limit", "tpm_limit", "max_parallel_requests"):
        value = fields.get(name)
        if value is not None and not 0 <= value <= 2_147_483_647:  # the columns are int4
            raise InvalidCommand(
                f"{name} must be a non-negative integer (at most 2147483647), got {value}", param=name
            )


def _storable_money(value: object) -> bool:
    """Non-negative, finite, and inside PostgreSQL numeric's range (asyncpg would write 0 for a
    larger exponent, silently)."""
    return (
        isinstance(value, Decimal)
        and value.is_finite()
        and value >= 0
        and value.adjusted() <= 131071
        and int(value.as_tuple().exponent) >= -16383
    )


def _column_value(kind: EntityTable, name: str, value: Any) -> Any:
    if name in kind.json_columns:
        return _json.encode(value).decode()
    if name in kind.array_columns:
        return list(value)
    return value


def _placeholder(kind: EntityTable, name: str, index: int) -> str:
    return f"${index}::jsonb" if name in kind.json_columns else f"${index}"


async def fetch(
    conn: Queryable, kind: EntityTable, entity_id: str, for_update: bool = False
) -> asyncpg.Record | None:
    lock = " for update" if for_update else ""
    return await conn.fetchrow(f"select * from {kind.table} where {kind.id_field} = $1{lock}", entity_id)


async def require(conn: Connection, kind: EntityTable, entity_id: str) -> asyncpg.Record:
    row = await fetch(conn, kind, entity_id, for_update=True)
    if row is None:
        raise NotFound(f"{kind.noun} {entity_id!r} does not exist", param=kind.id_field)
    return row


async def append_next(
    conn: Connection,
    kind: EntityTable,
    entity_id: str,
    event: Event,
    actor: str,
    at: datetime | None = None,
) -> None:
    stream = kind.stream(entity_id)
    version = await store.stream_version(conn, stream)
    await store.append(conn, stream, version, [event], store.command_metadata(actor, at))


async def create(
    conn: Connection, kind: EntityTable, event: Event, actor: str, now: datetime
) -> None:
    """Append a creation event and insert its row; an existing id is refused."""
    entity_id = getattr(event, kind.id_field)
    if await fetch(conn, kind, entity_id) is not None:
        raise AlreadyExists(f"{kind.noun} {entity_id!r} already exists", param=kind.id_field)
    await append_next(conn, kind, entity_id, event, actor, now)
    await project_create(conn, kind, event, now)


async def update(
    conn: Connection, kind: EntityTable, event: Event, actor: str, now: datetime
) -> None:
    entity_id = getattr(event, kind.id_field)
    await require(conn, kind, entity_id)
    await append_next(conn, kind, entity_id, event, actor, now)
    await project_update(conn, kind, event, now)


async def delete(conn: Connection, kind: EntityTable, event: Event, actor: str) -> None:
    entity_id = getattr(event, kind.id_field)
    await require(conn, kind, entity_id)
    await append_next(conn, kind, entity_id, event, actor)
    await project_delete(conn, kind, entity_id)


async def project_create(conn: Connection, kind: EntityTable, event: Event, at: datetime) -> None:
    fields = {name: getattr(event, name) for name in event.__struct_fields__ if name != "source"}
    names = list(fields)
    values = [_column_value(kind, n, fields[n]) for n in names]
    placeholders = [_placeholder(kind, n, i) for i, n in enumerate(names, start=1)]
    at_index = len(names) + 1
    try:
        await conn.execute(
            f"insert into {kind.table} ({', '.join(names)}, created_at, updated_at) "
            f"values ({', '.join(placeholders)}, ${at_index}, ${at_index})",
            *values,
            at,
        )
    except asyncpg.UniqueViolationError:
        raise AlreadyExists(
            f"{kind.noun} {fields[kind.id_field]!r} already exists", param=kind.id_field
        ) from None


async def project_update(conn: Connection, kind: EntityTable, event: Event, at: datetime) -> None:
    changes = changed_fields(event, kind.id_field)
    sets = [f"{name} = {_placeholder(kind, name, i)}" for i, name in enumerate(changes, start=2)]
    sets.append(f"updated_at = ${len(changes) + 2}")
    values = [_column_value(kind, n, v) for n, v in changes.items()]
    await conn.execute(
        f"update {kind.table} set {', '.join(sets)} where {kind.id_field} = $1",
        getattr(event, kind.id_field),
        *values,
        at,
    )


async def project_delete(conn: Connection, kind: EntityTable, entity_id: str) -> None:
    await conn.execute(f"delete from {kind.table} where {kind.id_field} = $1", entity_id)
