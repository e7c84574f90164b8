"""Virtual keys: generation, changes and the key directory they project into.

A key is stored only as its SHA-256 hex digest (as LiteLLM's `hash_token`); the plaintext is
returned once, by `generate_key`. Each key is a stream `key:<hash>`; the `keys` table is its
projection, written in the same transaction as the event.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime
from decimal import Decimal
from typing import Any, Final

import asyncpg
import msgspec

from spendledger.ledger import store
from spendledger.ledger.connections import Connection, Queryable
from spendledger.ledger.entities import validate_budget_fields
from spendledger.ledger.errors import AlreadyExists, NotFound
from spendledger.ledger.events import (
    KeyBlocked,
    KeyDeleted,
    KeyGenerated,
    KeyUnblocked,
    KeyUpdated,
    changed_fields,
)

_json: Final = msgspec.json.Encoder(decimal_format="number")
_ARRAY_FIELDS: Final = frozenset({"models", "allowed_customers"})  # text[] columns


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "sk-" + secrets.token_urlsafe(24)


def display_name(key: str) -> str:
    return f"sk-...{key[-4:]}"


def key_stream(key_hash: str) -> str:
    return f"key:{key_hash}"


class KeyRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A row of the key directory, as the hot path and the management API read it."""

    key_hash: str
    key_name: str
    key_alias: str | None
    user_id: str | None
    team_id: str | None
    models: tuple[str, ...]
    metadata: dict[str, Any]
    max_budget: Decimal | None
    budget_duration: str | None
    budget_id: str | None
    rpm_limit: int | None
    tpm_limit: int | None
    max_parallel_requests: int | None
    expires: datetime | None
    blocked: bool
    created_at: datetime
    updated_at: datetime
    allowed_customers: tuple[str, ...] = ()  # the customers it may bill; empty: any
    # Its internal user, as the `users` table has it now (the key's role derives from it).
    user_exists: bool = False
    user_role: str | None = None

    def expired(self, now: datetime) -> bool:
        return self.expires is not None and self.expires <= now

    def allows_model(self, model: str) -> bool:
        """An empty list, or LiteLLM's "all-proxy-models", means every model."""
        return not self.models or model in self.models or "all-proxy-models" in self.models


def validate_limits(max_budget: Decimal | None, budget_duration: str | None, **limits: int | None) -> None:
    validate_budget_fields({"max_budget": max_budget, "budget_duration": budget_duration, **limits})


async def generate_key(
    conn: Connection, spec: KeyGenerated, plaintext: str, actor: str, now: datetime
) -> KeyRecord:
    """Append `KeyGenerated` for a new key and project it; the caller holds the transaction."""
    validate_limits(
        spec.max_budget,
        spec.budget_duration,
        rpm_limit=spec.rpm_limit,
        tpm_limit=spec.tpm_limit,
        max_parallel_requests=spec.max_parallel_requests,
    )
    if spec.key_hash != hash_key(plaintext):
        raise ValueError("spec.key_hash must be the hash of the plaintext key")
    try:
        await store.append(conn, key_stream(spec.key_hash), 0, [spec], store.command_metadata(actor, now))
    except store.ConcurrencyError:
        raise AlreadyExists("this key already exists", param="key") from None
    await apply_key_event(conn, spec, now)
    record = await get_key(conn, spec.key_hash)
    assert record is not None
    return record


async def update_key(conn: Connection, update: KeyUpdated, actor: str, now: datetime) -> KeyRecord:
    current = await get_key(conn, update.key_hash, for_update=True)
    if current is None:
        raise NotFound("key not found", param="key")
    changes = changed_fields(update)
    validate_limits(
        changes.get("max_budget"),
        changes.get("budget_duration"),
        **{k: changes.get(k) for k in ("rpm_limit", "tpm_limit", "max_parallel_requests")},
    )
    await _append_next(conn, update.key_hash, update, actor, now)
    await apply_key_event(conn, update, now)
    record = await get_key(conn, update.key_hash)
    assert record is not None
    return record


async def set_blocked(
    conn: Connection, key_hash: str, blocked: bool, actor: str, now: datetime
) -> KeyRecord:
    if await get_key(conn, key_hash, for_update=True) is None:
        raise NotFound("key not found", param="key")
    event = KeyBlocked(key_hash=key_hash) if blocked else KeyUnblocked(key_hash=key_hash)
    await _append_next(conn, key_hash, event, actor, now)
    await apply_key_event(conn, event, now)
    record = await get_key(conn, key_hash)
    assert record is not None
    return record


async def delete_keys(conn: Connection, key_hashes: list[str], actor: str, now: datetime) -> None:
    """Delete all or none: an unknown key refuses the whole command."""
    for key_hash in sorted(set(key_hashes)):
        if await get_key(conn, key_hash, for_update=True) is None:
            raise NotFound(f"key not found: {key_hash[:12]}…", param="keys")
        event = KeyDeleted(key_hash=key_hash)
        await _append_next(conn, key_hash, event, actor, now)
        await apply_key_event(conn, event, now)


async def _append_next(conn: Connection, key_hash: str, event: Any, actor: str, at: datetime) -> None:
    version = await store.stream_version(conn, key_stream(key_hash))
    await store.append(conn, key_stream(key_hash), version, [event], store.command_metadata(actor, at))


# The key's row with its user's role: a key inherits the role of its internal user.
_SELECT: Final = (
    "select k.key_hash, k.key_name, k.key_alias, k.user_id, k.team_id, k.models, k.metadata::text as metadata, "
    "k.max_budget, k.budget_duration, k.budget_id, k.rpm_limit, k.tpm_limit, k.max_parallel_requests, "
    "k.expires, k.blocked, k.created_at, k.updated_at, k.allowed_customers, "
    "u.user_id is not null as user_exists, u.user_role "
    "from keys k left join users u on u.user_id = k.user_id"
)


def record_from_row(row: asyncpg.Record) -> KeyRecord:
    values = dict(row)
    values["models"] = tuple(values["models"] or ())
    values["allowed_customers"] = tuple(values.get("allowed_customers") or ())
    values["metadata"] = msgspec.json.decode(values["metadata"] or "{}")
    return KeyRecord(**values)


async def get_key(
    conn: Queryable, key_hash: str, for_update: bool = False
) -> KeyRecord | None:
    lock = " for update of k" if for_update else ""
    row = await conn.fetchrow(f"{_SELECT} where k.key_hash = $1{lock}", key_hash)
    return record_from_row(row) if row else None


async def find_key_by_alias(conn: Queryable, alias: str) -> KeyRecord | None:
    row = await conn.fetchrow(f"{_SELECT} where k.key_alias = $1", alias)
    return record_from_row(row) if row else None


async def apply_key_event(conn: Connection, event: Any, at: datetime) -> None:
    """Project one key event into the `keys` table (live, and during rebuilds)."""
    if isinstance(event, KeyGenerated):
        try:
            await conn.execute(
                "insert into keys (key_hash, key_name, key_alias, user_id, team_id, models, metadata, "
                "max_budget, budget_duration, budget_id, rpm_limit, tpm_limit, max_parallel_requests, "
                "expires, blocked, created_at, updated_at, allowed_customers) "
                "values ($1,$2,$3,$4,$5,$6,$7::jsonb,$8,$9,$10,$11,$12,$13,$14,$15,$16,$16,$17)",
                event.key_hash,
                event.key_name,
                event.key_alias,
                event.user_id,
                event.team_id,
                list(event.models),
                _json.encode(event.metadata).decode(),
                event.max_budget,
                event.budget_duration,
                event.budget_id,
                event.rpm_limit,
                event.tpm_limit,
                event.max_parallel_requests,
                event.expires,
                event.blocked,
                at,
                list(event.allowed_customers),
            )
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(
                f"a key with alias {event.key_alias!r} already exists", param="key_alias"
            ) from None
    elif isinstance(event, KeyUpdated):
        changes = changed_fields(event)
        if not changes:
            return
        sets: list[str] = []
        args: list[Any] = []
        for index, (name, value) in enumerate(changes.items(), start=2):
            if name == "metadata":
                sets.append(f"metadata = ${index}::jsonb")
                args.append(_json.encode(value).decode())
            else:
                sets.append(f"{name} = ${index}")
                args.append(list(value) if name in _ARRAY_FIELDS else value)
        sets.append(f"updated_at = ${len(args) + 2}")
        try:
            await conn.execute(
                f"update keys set {', '.join(sets)} where key_hash = $1", event.key_hash, *args, at
            )
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(
                f"a key with alias {changes.get('key_alias')!r} already exists", param="key_alias"
            ) from None
    elif isinstance(event, KeyBlocked | KeyUnblocked):
        await conn.execute(
            "update keys set blocked = $2, updated_at = $3 where key_hash = $1",
            event.key_hash,
            isinstance(event, KeyBlocked),
            at,
        )
    elif isinstance(event, KeyDeleted):
        await conn.execute("delete from keys where key_hash = $1", event.key_hash)
    await conn.execute("select pg_notify('sl_key_changed', $1)", event.key_hash)
