"""Key management: /key/generate, /key/info, /key/update, /key/delete, /key/list, /key/block|unblock."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.params import Parameter
from litestar.types import ControllerRouterHandler
from msgspec import UNSET, UnsetType

from spendledger.api.auth import Caller, caller_of, requires
from spendledger.api.errors import bad_request
from spendledger.api.jsonio import json_response, sent_fields
from spendledger.api.params import OPTIONAL_ID_PARAM
from spendledger.api.roles import Permission
from spendledger.api.schemas import READ, WRITE, documented
from spendledger.api.services import Services, services_of
from spendledger.ledger import keys as key_commands
from spendledger.ledger.durations import DurationError, parse_duration
from spendledger.ledger.errors import NotFound
from spendledger.ledger.events import KeyGenerated, KeyUpdated
from spendledger.ledger.identifiers import Identifier
from spendledger.ledger.keys import KeyRecord, display_name, hash_key, new_key
from spendledger.ledger.money import ZERO
from spendledger.projections.periods import period_ends
from spendledger.projections.spend import spend_by_id, spend_of

_HASH = re.compile(r"^[0-9a-f]{64}$")
# LiteLLM's MINIMUM_CUSTOM_KEY_LENGTH: a shorter key can be guessed, and its key_name would show it whole.
MIN_CUSTOM_KEY_LENGTH = 16


class GenerateKeyRequest(msgspec.Struct, kw_only=True):
    key: str | None = None
    key_alias: Identifier | None = None
    user_id: Identifier | None = None
    team_id: Identifier | None = None
    models: list[str] = []
    metadata: dict[str, Any] = {}
    duration: str | None = None
    max_budget: Decimal | None = None
    budget_duration: str | None = None
    budget_id: Identifier | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    max_parallel_requests: int | None = None
    blocked: bool = False
    allowed_customers: list[Identifier] = []  # the customers the key may bill; empty: any


class UpdateKeyRequest(msgspec.Struct, kw_only=True):
    key: str
    key_alias: Identifier | None | UnsetType = UNSET
    user_id: Identifier | None | UnsetType = UNSET
    team_id: Identifier | None | UnsetType = UNSET
    models: list[str] | UnsetType = UNSET
    metadata: dict[str, Any] | UnsetType = UNSET
    duration: str | None | UnsetType = UNSET
    max_budget: Decimal | None | UnsetType = UNSET
    budget_duration: str | None | UnsetType = UNSET
    budget_id: Identifier | None | UnsetType = UNSET
    rpm_limit: int | None | UnsetType = UNSET
    tpm_limit: int | None | UnsetType = UNSET
    max_parallel_requests: int | None | UnsetType = UNSET
    allowed_customers: list[Identifier] | UnsetType = UNSET


class DeleteKeysRequest(msgspec.Struct, kw_only=True):
    keys: list[str] = []
    key_aliases: list[Identifier] = []


class KeyRef(msgspec.Struct, kw_only=True):
    key: str


class KeyView(msgspec.Struct, kw_only=True):
    """A key as the routes answer it (`key_view`): never its plaintext, except once in `GeneratedKey`."""

    token: str  # the key's SHA-256 (hex), what /key/list shows
    key_name: str
    key_alias: str | None
    spend: Decimal
    expires: datetime | None
    models: list[str]
    user_id: str | None
    team_id: str | None
    metadata: dict[str, Any]
    max_budget: Decimal | None
    budget_duration: str | None
    budget_reset_at: datetime | None  # the end of the current budget period
    budget_id: str | None
    rpm_limit: int | None
    tpm_limit: int | None
    max_parallel_requests: int | None
    blocked: bool
    allowed_customers: list[str]
    created_at: datetime
    updated_at: datetime


class GeneratedKey(KeyView, kw_only=True):
    key: str  # the plaintext `sk-…`, shown this once


class DeletedKeys(msgspec.Struct, kw_only=True):
    deleted_keys: list[str]


class KeyList(msgspec.Struct, kw_only=True):
    keys: list[str | KeyView]  # hashes; full objects with return_full_object=true
    total_count: int
    current_page: int
    total_pages: int


class KeyInfo(msgspec.Struct, kw_only=True):
    key: str
    info: KeyView


async def key_views(
    conn: asyncpg.Connection | asyncpg.Pool, records: Sequence[KeyRecord], spends: Mapping[str, Decimal]
) -> list[dict[str, Any]]:
    """The keys as the routes answer them, with their spend and when their budget period ends."""
    resets = await period_ends(conn, [(r.created_at, r.budget_duration) for r in records])
    return [key_view(r, spends.get(r.key_hash, ZERO), reset) for r, reset in zip(records, resets, strict=True)]


async def one_key_view(pool: asyncpg.Pool, record: KeyRecord) -> dict[str, Any]:
    spend = await spend_of(pool, "key", record.key_hash)
    return (await key_views(pool, [record], {record.key_hash: spend}))[0]


def key_view(record: KeyRecord, spend: Decimal, reset_at: datetime | None) -> dict[str, Any]:
    return {
        "token": record.key_hash,
        "key_name": record.key_name,
        "key_alias": record.key_alias,
        "spend": spend,
        "expires": record.expires.isoformat() if record.expires else None,
        "models": list(record.models),
        "user_id": record.user_id,
        "team_id": record.team_id,
        "metadata": record.metadata,
        "max_budget": record.max_budget,
        "budget_duration": record.budget_duration,
        "budget_reset_at": reset_at.isoformat() if reset_at else None,
        "budget_id": record.budget_id,
        "rpm_limit": record.rpm_limit,
        "tpm_limit": record.tpm_limit,
        "max_parallel_requests": record.max_parallel_requests,
        "blocked": record.blocked,
        "allowed_customers": list(record.allowed_customers),
        "created_at": record.created_at.isoformat(),
        "updated_at": record.updated_at.isoformat(),
    }


def _expires(duration: str | None, now: datetime) -> datetime | None:
    if duration is None:
        return None
    try:
        return parse_duration(duration).after(now)
    except DurationError as exc:
        raise bad_request(str(exc), param="duration") from None


def _custom_key(key: str | None) -> str:
    """A client-chosen key, checked without ever repeating it; None: a new random key."""
    if key is None:
        return new_key()
    if not key.startswith("sk-") or len(key) < MIN_CUSTOM_KEY_LENGTH:
        raise bad_request(
            f"A custom key must start with 'sk-' and be at least {MIN_CUSTOM_KEY_LENGTH} characters long",
            param="key",
        )
    return key


def _key_owner(caller: Caller, user_id: str | None, team_id: str | None) -> str | None:
    """The user a new key belongs to. An internal user makes keys for itself only (its own user by
    default), and never for a team: without team membership here, that would spend a team's budget."""
    if team_id is not None:
        caller.require(Permission.MANAGE, "give a key a team_id")
    return caller.user_scope(user_id, over=Permission.MANAGE)


def _key_hash(value: str) -> str:
    """Management calls may name a key by its plaintext or by its hash (as /key/list shows it)."""
    return value if _HASH.match(value) else hash_key(value)


async def generate_key(services: Services, caller: Caller, data: GenerateKeyRequest) -> dict[str, Any]:
    """Generate a key (/key/generate and the admin UI): its view with the plaintext, shown this once."""
    now = datetime.now(UTC)
    plaintext = _custom_key(data.key)
    spec = KeyGenerated(
        key_hash=hash_key(plaintext),
        key_name=display_name(plaintext),
        key_alias=data.key_alias,
        user_id=_key_owner(caller, data.user_id, data.team_id),
        team_id=data.team_id,
        models=tuple(data.models),
        metadata=data.metadata,
        max_budget=data.max_budget,
        budget_duration=data.budget_duration,
        budget_id=data.budget_id,
        rpm_limit=data.rpm_limit,
        tpm_limit=data.tpm_limit,
        max_parallel_requests=data.max_parallel_requests,
        expires=_expires(data.duration, now),
        blocked=data.blocked,
        allowed_customers=tuple(dict.fromkeys(data.allowed_customers)),
    )
    async with services.pool.acquire() as conn, conn.transaction():
        record = await key_commands.generate_key(conn, spec, plaintext, actor=caller.actor, now=now)
    return {"key": plaintext, **(await key_views(services.pool, [record], {}))[0]}


async def delete_named_keys(services: Services, caller: Caller, data: DeleteKeysRequest) -> None:
    """Delete keys named by plaintext, hash or alias, all or none (/key/delete and the admin UI)."""
    hashes = [_key_hash(k) for k in data.keys]
    async with services.pool.acquire() as conn, conn.transaction():
        for key_hash in hashes:
            caller.check_key(await key_commands.get_key(conn, key_hash), over=Permission.MANAGE)
        for alias in data.key_aliases:
            record = await key_commands.find_key_by_alias(conn, alias)
            caller.check_key(record, over=Permission.MANAGE)
            if record is None:
                raise NotFound(f"no key with alias {alias!r}", param="key_aliases")
            hashes.append(record.key_hash)
        if not hashes:
            raise bad_request("Name the keys to delete in 'keys' or 'key_aliases'", param="keys")
        await key_commands.delete_keys(conn, hashes, actor=caller.actor, now=datetime.now(UTC))


async def set_key_blocked(services: Services, actor: str, key: str, blocked: bool) -> dict[str, Any]:
    """Block or unblock a key (/key/block|unblock and the admin UI); its view."""
    async with services.pool.acquire() as conn, conn.transaction():
        record = await key_commands.set_blocked(conn, _key_hash(key), blocked, actor, datetime.now(UTC))
    return await one_key_view(services.pool, record)


class KeyController(Controller):
    path = "/key"
    tags = ["keys"]

    @post(
        "/generate",
        guards=[requires(Permission.MANAGE_OWN_KEYS)],
        status_code=200,
        summary="Generate a virtual key (the plaintext is shown once)",
        **documented(*WRITE, 404),
    )
    async def generate(
        self, request: Request[Any, Any, Any], data: GenerateKeyRequest
    ) -> Response[GeneratedKey]:
        return json_response(await generate_key(services_of(request), caller_of(request), data))

    @post(
        "/update",
        guards=[requires(Permission.MANAGE_OWN_KEYS)],
        status_code=200,
        summary="Change a key's settings (only the fields sent)",
        **documented(*WRITE, 404),
    )
    async def update(self, request: Request[Any, Any, Any], data: UpdateKeyRequest) -> Response[KeyView]:
        services = services_of(request)
        caller = caller_of(request)
        now = datetime.now(UTC)
        changes = sent_fields(data, "key", "duration")
        if data.duration is not UNSET:
            changes["expires"] = _expires(data.duration, now)
        if "allowed_customers" in changes:
            changes["allowed_customers"] = tuple(dict.fromkeys(changes["allowed_customers"]))
        if "user_id" in changes or "team_id" in changes:
            caller.require(Permission.MANAGE, "move a key to another user or team")
        update = KeyUpdated(key_hash=_key_hash(data.key), **changes)
        async with services.pool.acquire() as conn, conn.transaction():
            caller.check_key(await key_commands.get_key(conn, update.key_hash), over=Permission.MANAGE)
            record = await key_commands.update_key(conn, update, actor=caller.actor, now=now)
        return json_response(await one_key_view(services.pool, record))

    @post(
        "/delete",
        guards=[requires(Permission.MANAGE_OWN_KEYS)],
        status_code=200,
        summary="Delete keys (all or none)",
        **documented(*WRITE, 404),
    )
    async def delete(self, request: Request[Any, Any, Any], data: DeleteKeysRequest) -> Response[DeletedKeys]:
        await delete_named_keys(services_of(request), caller_of(request), data)
        return json_response({"deleted_keys": data.keys + data.key_aliases})

    @post(
        "/block",
        guards=[requires(Permission.MANAGE)],
        status_code=200,
        summary="Block a key: it is refused until unblocked",
        **documented(*WRITE, 404),
    )
    async def block(self, request: Request[Any, Any, Any], data: KeyRef) -> Response[KeyView]:
        return await self._set_blocked(request, data.key, blocked=True)

    @post(
        "/unblock",
        guards=[requires(Permission.MANAGE)],
        status_code=200,
        summary="Unblock a key",
        **documented(*WRITE, 404),
    )
    async def unblock(self, request: Request[Any, Any, Any], data: KeyRef) -> Response[KeyView]:
        return await self._set_blocked(request, data.key, blocked=False)

    async def _set_blocked(self, request: Request[Any, Any, Any], key: str, blocked: bool) -> Response[Any]:
        return json_response(await set_key_blocked(services_of(request), caller_of(request).actor, key, blocked))

    @get(
        "/list",
        guards=[requires(Permission.READ_OWN)],
        summary="List keys (hashes, or full objects with return_full_object=true); an internal user's own",
        **documented(*READ),
    )
    async def list_keys(
        self,
        request: Request[Any, Any, Any],
        user_id: str | None = OPTIONAL_ID_PARAM,
        team_id: str | None = OPTIONAL_ID_PARAM,
        key_alias: str | None = OPTIONAL_ID_PARAM,
        page: int = Parameter(default=1, ge=1),
        size: int = Parameter(default=10, ge=1, le=100),
        return_full_object: bool = False,
    ) -> Response[KeyList]:
        services = services_of(request)
        user_id = caller_of(request).user_scope(user_id, over=Permission.READ_ALL)
        where = (
            "($1::text is null or user_id = $1) and ($2::text is null or team_id = $2) "
            "and ($3::text is null or key_alias = $3)"
        )
        total = await services.pool.fetchval(
            f"select count(*) from keys where {where}", user_id, team_id, key_alias
        )
        rows = await services.pool.fetch(
            f"select key_hash from keys where {where} order by created_at, key_hash limit $4 offset $5",
            user_id,
            team_id,
            key_alias,
            size,
            (page - 1) * size,
        )
        hashes = [row["key_hash"] for row in rows]
        keys: list[Any] = hashes
        if return_full_object:
            spends = await spend_by_id(services.pool, "key", hashes)
            records = [r for h in hashes if (r := await key_commands.get_key(services.pool, h)) is not None]
            keys = await key_views(services.pool, records, spends)
        return json_response(
            {
                "keys": keys,
                "total_count": total,
                "current_page": page,
                "total_pages": max(1, -(-total // size)),
            }
        )


@get(
    "/key/info",
    guards=[requires(None)],
    tags=["keys"],
    summary="A key's settings and spend (any key for admins; an internal user's own; a key itself)",
    **documented(*READ, 404),
)
async def key_info(request: Request[Any, Any, Any], key: str | None = None) -> Response[KeyInfo]:
    caller = caller_of(request)
    services = services_of(request)
    if key is None:
        if caller.key is None:
            raise bad_request("Name the key: /key/info?key=sk-…", param="key")
        key_hash = caller.key_hash
    else:
        key_hash = _key_hash(key)
    record = await key_commands.get_key(services.pool, key_hash)
    caller.check_key(record, over=Permission.READ_ALL)
    if record is None:
        raise NotFound("key not found", param="key")
    return json_response({"key": key or record.key_name, "info": await one_key_view(services.pool, record)})


route_handlers: list[ControllerRouterHandler] = [KeyController, key_info]
