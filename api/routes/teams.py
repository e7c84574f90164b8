"""Teams: /team/new, /team/update, /team/delete, /team/info, /team/list, /team/block, /team/unblock."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec
from litestar import Request, Response, get, post
from msgspec import UNSET, UnsetType

from spendledger.api.auth import caller_of, requires
from spendledger.api.errors import bad_request
from spendledger.api.jsonio import json_response, sent_fields
from spendledger.api.params import ID_PARAM
from spendledger.api.roles import Permission
from spendledger.api.routes.keys import KeyView, key_views
from spendledger.api.schemas import GUARDED, READ, WRITE, documented
from spendledger.api.services import Services, services_of
from spendledger.ledger import directory
from spendledger.ledger.connections import Queryable
from spendledger.ledger.errors import NotFound
from spendledger.ledger.events import TeamCreated, TeamUpdated
from spendledger.ledger.identifiers import FreeText, Identifier
from spendledger.projections.directory import get_team, keys_of, list_teams


class NewTeamRequest(msgspec.Struct, kw_only=True):
    team_id: Identifier | None = None
    team_alias: FreeText | None = None
    max_budget: Decimal | None = None
    soft_budget: Decimal | None = None
    budget_duration: str | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    max_parallel_requests: int | None = None
    models: list[str] = []
    metadata: dict[str, Any] = {}
    blocked: bool = False


class UpdateTeamRequest(msgspec.Struct, kw_only=True):
    team_id: Identifier
    team_alias: FreeText | None | UnsetType = UNSET
    max_budget: Decimal | None | UnsetType = UNSET
    soft_budget: Decimal | None | UnsetType = UNSET
    budget_duration: str | None | UnsetType = UNSET
    rpm_limit: int | None | UnsetType = UNSET
    tpm_limit: int | None | UnsetType = UNSET
    max_parallel_requests: int | None | UnsetType = UNSET
    models: list[str] | UnsetType = UNSET
    metadata: dict[str, Any] | UnsetType = UNSET
    blocked: bool | UnsetType = UNSET


class TeamIds(msgspec.Struct, kw_only=True):
    team_ids: list[Identifier]


class TeamRef(msgspec.Struct, kw_only=True):
    team_id: Identifier


class TeamView(msgspec.Struct, kw_only=True):
    """A team as the routes answer it (projections/directory.py `team_view`)."""

    team_id: str
    team_alias: str | None
    blocked: bool
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


class UpdatedTeam(msgspec.Struct, kw_only=True):
    team_id: str
    data: TeamView


class DeletedTeams(msgspec.Struct, kw_only=True):
    deleted_teams: list[str]


class TeamInfo(msgspec.Struct, kw_only=True):
    team_id: str
    team_info: TeamView
    keys: list[KeyView]


_tags = ["teams"]


async def _team(conn: Queryable, team_id: str) -> dict[str, Any]:
    view = await get_team(conn, team_id)
    if view is None:
        raise NotFound(f"Team not found, passed team_id={team_id}", param="team_id")
    return view


async def _update(request: Request[Any, Any, Any], team_id: str, changes: dict[str, Any]) -> dict[str, Any]:
    return await change_team(services_of(request), caller_of(request).actor, team_id, changes)


async def change_team(services: Services, actor: str, team_id: str, changes: dict[str, Any]) -> dict[str, Any]:
    """Change a team's fields (/team/update|block|unblock and the admin UI); its view."""
    async with services.pool.acquire() as conn, conn.transaction():
        if changes:
            await directory.update_team(conn, TeamUpdated(team_id=team_id, **changes), actor, datetime.now(UTC))
        return await _team(conn, team_id)


@post(
    "/team/new",
    guards=[requires(Permission.MANAGE)],
    tags=_tags,
    status_code=200,
    summary="Create a team",
    **documented(*WRITE),
)
async def new_team(request: Request[Any, Any, Any], data: NewTeamRequest) -> Response[TeamView]:
    return json_response(await create_team(services_of(request), caller_of(request).actor, data))


async def create_team(services: Services, actor: str, data: NewTeamRequest) -> dict[str, Any]:
    """Create a team (/team/new and the admin UI); its view."""
    team_id = str(uuid.uuid4()) if data.team_id is None else data.team_id
    if not team_id.strip():
        raise bad_request("team_id must not be empty", param="team_id")
    event = TeamCreated(
        team_id=team_id,
        team_alias=data.team_alias,
        blocked=data.blocked,
        max_budget=data.max_budget,
        soft_budget=data.soft_budget,
        budget_duration=data.budget_duration,
        rpm_limit=data.rpm_limit,
        tpm_limit=data.tpm_limit,
        max_parallel_requests=data.max_parallel_requests,
        models=tuple(data.models),
        metadata=data.metadata,
    )
    async with services.pool.acquire() as conn, conn.transaction():
        await directory.create_team(conn, event, actor, datetime.now(UTC))
        return await _team(conn, team_id)


@post(
    "/team/update",
    guards=[requires(Permission.MANAGE)],
    tags=_tags,
    status_code=200,
    summary="Change a team (only the fields sent)",
    **documented(*WRITE, 404),
)
async def update_team(request: Request[Any, Any, Any], data: UpdateTeamRequest) -> Response[UpdatedTeam]:
    changes = sent_fields(data, "team_id")
    view = await _update(request, data.team_id, changes)
    return json_response({"team_id": data.team_id, "data": view})


@post(
    "/team/delete",
    guards=[requires(Permission.MANAGE)],
    tags=_tags,
    status_code=200,
    summary="Delete teams and their keys (all or none); their events and spend history stay",
    **documented(*WRITE, 404),
)
async def delete_teams(request: Request[Any, Any, Any], data: TeamIds) -> Response[DeletedTeams]:
    await remove_teams(services_of(request), caller_of(request).actor, data.team_ids)
    return json_response({"deleted_teams": data.team_ids})


async def remove_teams(services: Services, actor: str, team_ids: list[str]) -> None:
    """Delete teams and their keys, all or none (/team/delete and the admin UI)."""
    if not team_ids:
        raise bad_request("team_ids must name at least one team", param="team_ids")
    async with services.pool.acquire() as conn, conn.transaction():
        await directory.delete_teams(conn, team_ids, actor, datetime.now(UTC))


@get(
    "/team/info",
    guards=[requires(Permission.READ_ALL)],
    tags=_tags,
    summary="A team, its spend and its keys",
    **documented(*READ, 404),
)
async def team_info(request: Request[Any, Any, Any], team_id: str = ID_PARAM) -> Response[TeamInfo]:
    pool = services_of(request).pool
    view = await _team(pool, team_id)
    owned = await keys_of(pool, "team", team_id)
    keys = await key_views(pool, [r for r, _ in owned], {r.key_hash: spend for r, spend in owned})
    return json_response({"team_id": team_id, "team_info": view, "keys": keys})


@get(
    "/team/list",
    guards=[requires(Permission.READ_ALL)],
    tags=_tags,
    summary="Every team",
    **documented(*GUARDED),
)
async def team_list(request: Request[Any, Any, Any]) -> Response[list[TeamView]]:
    return json_response(await list_teams(services_of(request).pool))


@post(
    "/team/block",
    guards=[requires(Permission.MANAGE)],
    tags=_tags,
    status_code=200,
    summary="Block a team: every key of the team is refused",
    **documented(*WRITE, 404),
)
async def block_team(request: Request[Any, Any, Any], data: TeamRef) -> Response[TeamView]:
    return json_response(await _update(request, data.team_id, {"blocked": True}))


@post(
    "/team/unblock",
    guards=[requires(Permission.MANAGE)],
    tags=_tags,
    status_code=200,
    summary="Unblock a team",
    **documented(*WRITE, 404),
)
async def unblock_team(request: Request[Any, Any, Any], data: TeamRef) -> Response[TeamView]:
    return json_response(await _update(request, data.team_id, {"blocked": False}))


route_handlers = [new_team, update_team, delete_teams, team_info, team_list, block_team, unblock_team]
