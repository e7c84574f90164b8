"""Internal users: /user/new, /user/update, /user/delete, /user/info, /user/list."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

import msgspec
from litestar import Request, Response, get, post
from litestar.params import Parameter
from msgspec import UNSET, UnsetType

from spendledger.api.auth import caller_of, requires
from spendledger.api.errors import bad_request
from spendledger.api.jsonio import json_response, sent_fields
from spendledger.api.params import OPTIONAL_ID_PARAM
from spendledger.api.roles import Permission
from spendledger.api.routes.keys import KeyView, key_views
from spendledger.api.schemas import READ, WRITE, documented
from spendledger.api.services import Services, services_of
from spendledger.ledger import directory
from spendledger.ledger import keys as key_commands
from spendledger.ledger.connections import Queryable
from spendledger.ledger.durations import DurationError, parse_duration
from spendledger.ledger.errors import NotFound
from spendledger.ledger.events import KeyGenerated, UserCreated, UserUpdated
from spendledger.ledger.identifiers import ID_RULE, FreeText, Identifier, is_identifier
from spendledger.ledger.keys import display_name, hash_key, new_key
from spendledger.projections.directory import get_user, keys_of, list_users

# LiteLLM's user roles (LitellmUserRoles).
USER_ROLES: Final = frozenset(
    {
        "proxy_admin",
        "proxy_admin_viewer",
        "org_admin",
        "internal_user",
        "internal_user_viewer",
        "team",
        "customer",
    }
)


class NewUserRequest(msgspec.Struct, kw_only=True):
    user_id: Identifier | None = None
    user_email: FreeText | None = None
    user_alias: FreeText | None = None
    user_role: FreeText | None = None
    max_budget: Decimal | None = None
    soft_budget: Decimal | None = None
    budget_duration: str | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    max_parallel_requests: int | None = None
    models: list[str] = []
    metadata: dict[str, Any] = {}
    # The key LiteLLM creates with the user (`auto_create_key`), and its alias and lifetime.
    auto_create_key: bool = True
    key_alias: Identifier | None = None
    duration: str | None = None


class UpdateUserRequest(msgspec.Struct, kw_only=True):
    user_id: Identifier
    user_email: FreeText | None | UnsetType = UNSET
    user_alias: FreeText | None | UnsetType = UNSET
    user_role: FreeText | None | UnsetType = UNSET
    max_budget: Decimal | None | UnsetType = UNSET
    soft_budget: Decimal | None | UnsetType = UNSET
    budget_duration: str | None | UnsetType = UNSET
    rpm_limit: int | None | UnsetType = UNSET
    tpm_limit: int | None | UnsetType = UNSET
    max_parallel_requests: int | None | UnsetType = UNSET
    models: list[str] | UnsetType = UNSET
    metadata: dict[str, Any] | UnsetType = UNSET


class UserIds(msgspec.Struct, kw_only=True):
    user_ids: list[Identifier]


class UserView(msgspec.Struct, kw_only=True):
    """An internal user as the routes answer it (projections/directory.py `user_view`)."""

    user_id: str
    user_email: str | None
    user_alias: str | None
    user_role: str | None
    max_budget: Decimal | None
    soft_budget: Decimal | None
    spend: Decimal  # of the current budget period (lifetime, without a limit or duration)
    budget_duration: str | None
    budget_reset_at: datetime | None
    rpm_limit: int | None
    tpm_limit: int | None
    max_parallel_requests: int | None
    models: list[str]
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class NewUser(UserView, kw_only=True):
    """The user, and the key made with it (all null with `auto_create_key: false`)."""

    key: str | None  # the plaintext `sk-…`, shown this once
    token: str | None
    key_name: str | None
    key_alias: str | None
    expires: datetime | None


class UpdatedUser(msgspec.Struct, kw_only=True):
    user_id: str
    data: UserView


class DeletedUsers(msgspec.Struct, kw_only=True):
    deleted_users: list[str]


class UserInfo(msgspec.Struct, kw_only=True):
    user_id: str
    user_info: UserView
    keys: list[KeyView]


class UserList(msgspec.Struct, kw_only=True):
    users: list[UserView]
    total: int
    page: int
    page_size: int
    total_pages: int


_tags = ["users"]


def _check_role(role: str | None) -> None:
    if role is not None and role not in USER_ROLES:
        raise bad_request(
            f"user_role must be one of {', '.join(sorted(USER_ROLES))}, got {role!r}", param="user_role"
        )


async def _user(conn: Queryable, user_id: str) -> dict[str, Any]:
    view = await get_user(conn, user_id)
    if view is None:
        raise NotFound(f"User {user_id} not found", param="user_id")
    return view


@post(
    "/user/new",
    guards=[requires(Permission.MANAGE)],
    tags=_tags,
    status_code=200,
    summary="Create an internal user, and a key for it (the plaintext is shown once)",
    **documented(*WRITE),
)
async def new_user(request: Request[Any, Any, Any], data: NewUserRequest) -> Response[NewUser]:
    return json_response(await create_user(services_of(request), caller_of(request).actor, data))


async def create_user(services: Services, actor: str, data: NewUserRequest) -> dict[str, Any]:
    """Create an internal user, and its key unless told not to (/user/new and the admin UI): its
    view with the key's plaintext, shown this once."""
    now = datetime.now(UTC)
    user_id = str(uuid.uuid4()) if data.user_id is None else data.user_id
    if not user_id.strip():
        raise bad_request("user_id must not be empty", param="user_id")
    _check_role(data.user_role)
    expires = None
    if data.duration is not None:
        try:
            expires = parse_duration(data.duration).after(now)
        except DurationError as exc:
            raise bad_request(str(exc), param="duration") from None
    event = UserCreated(
        user_id=user_id,
        user_email=data.user_email,
        user_alias=data.user_alias,
        user_role=data.user_role,
        max_budget=data.max_budget,
        soft_budget=data.soft_budget,
        budget_duration=data.budget_duration,
        rpm_limit=data.rpm_limit,
        tpm_limit=data.tpm_limit,
        max_parallel_requests=data.max_parallel_requests,
        models=tuple(data.models),
        metadata=data.metadata,
    )
    key: dict[str, Any] = {"key": None, "token": None, "key_name": None, "key_alias": None, "expires": None}
    async with services.pool.acquire() as conn, conn.transaction():
        await directory.create_user(conn, event, actor, now)
        if data.auto_create_key:
            # The key carries only the user: the user's models, budget and limits govern it as a scope.
            plaintext = new_key()
            spec = KeyGenerated(
                key_hash=hash_key(plaintext),
                key_name=display_name(plaintext),
                key_alias=data.key_alias,
                user_id=user_id,
                expires=expires,
            )
            record = await key_commands.generate_key(
                conn, spec, plaintext, actor=actor, now=now
            )
            key = {
                "key": plaintext,
                "token": record.key_hash,
                "key_name": record.key_name,
                "key_alias": record.key_alias,
                "expires": record.expires.isoformat() if record.expires else None,
            }
        view = await _user(conn, user_id)
    return {**view, **key}


@post(
    "/user/update",
    guards=[requires(Permission.MANAGE)],
    tags=_tags,
    status_code=200,
    summary="Change an internal user (only the fields sent)",
    **documented(*WRITE, 404),
)
async def update_user(request: Request[Any, Any, Any], data: UpdateUserRequest) -> Response[UpdatedUser]:
    services = services_of(request)
    changes = sent_fields(data, "user_id")
    if "user_role" in changes:
        _check_role(changes["user_role"])
    async with services.pool.acquire() as conn, conn.transaction():
        if changes:
            await directory.update_user(
                conn,
                UserUpdated(user_id=data.user_id, **changes),
                caller_of(request).actor,
                datetime.now(UTC),
            )
        view = await _user(conn, data.user_id)
    return json_response({"user_id": data.user_id, "data": view})


@post(
    "/user/delete",
    guards=[requires(Permission.MANAGE)],
    tags=_tags,
    status_code=200,
    summary="Delete internal users and their keys (all or none); their events and spend history stay",
    **documented(*WRITE, 404),
)
async def delete_users(request: Request[Any, Any, Any], data: UserIds) -> Response[DeletedUsers]:
    await remove_users(services_of(request), caller_of(request).actor, data.user_ids)
    return json_response({"deleted_users": data.user_ids})


async def remove_users(services: Services, actor: str, user_ids: list[str]) -> None:
    """Delete internal users and their keys, all or none (/user/delete and the admin UI)."""
    if not user_ids:
        raise bad_request("user_ids must name at least one user", param="user_ids")
    async with services.pool.acquire() as conn, conn.transaction():
        await directory.delete_users(conn, user_ids, actor, datetime.now(UTC))


@get(
    "/user/info",
    guards=[requires(Permission.READ_OWN)],
    tags=_tags,
    summary="An internal user, its spend and its keys (an internal user's own: user_id may be left out)",
    **documented(*READ, 404),
)
async def user_info(
    request: Request[Any, Any, Any],
    user_id: str | None = OPTIONAL_ID_PARAM,
) -> Response[UserInfo]:
    pool = services_of(request).pool
    user_id = caller_of(request).user_scope(user_id, over=Permission.READ_ALL)
    if user_id is None:
        raise bad_request("Name the user: /user/info?user_id=…", param="user_id")
    view = await _user(pool, user_id)
    owned = await keys_of(pool, "user", user_id)
    keys = await key_views(pool, [r for r, _ in owned], {r.key_hash: spend for r, spend in owned})
    return json_response({"user_id": user_id, "user_info": view, "keys": keys})


@get(
    "/user/list",
    guards=[requires(Permission.READ_ALL)],
    tags=_tags,
    summary="Internal users, a page at a time",
    **documented(*READ),
)
async def user_list(
    request: Request[Any, Any, Any],
    role: str | None = None,
    user_ids: str | None = None,
    page: int = Parameter(default=1, ge=1),
    page_size: int = Parameter(default=25, ge=1, le=100),
) -> Response[UserList]:
    ids = [uid.strip() for uid in user_ids.split(",") if uid.strip()] if user_ids else None
    if ids is not None and not all(is_identifier(uid) for uid in ids):
        raise bad_request(f"user_ids: each id must be {ID_RULE}", param="user_ids")
    users, total = await list_users(services_of(request).pool, page, page_size, role=role, user_ids=ids)
    return json_response(
        {
            "users": users,
            "total": total,
            "page": page,
            "page_size": page_size,
            "total_pages": -(-total // page_size),
        }
    )


route_handlers = [new_user, update_user, delete_users, user_info, user_list]
