"""Budgets (pricing tiers): /budget/new, /budget/info, /budget/update, /budget/delete, /budget/list."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec
from litestar import Request, Response, get, post
from msgspec import UNSET, UnsetType

from spendledger.api.auth import caller_of, requires
from spendledger.api.errors import bad_request
from spendledger.api.jsonio import json_response, sent_fields
from spendledger.api.roles import Permission
from spendledger.api.schemas import BODY, GUARDED, WRITE, documented
from spendledger.api.services import Services, services_of
from spendledger.ledger import directory
from spendledger.ledger.errors import NotFound
from spendledger.ledger.events import BudgetDefined, BudgetUpdated
from spendledger.ledger.identifiers import Identifier
from spendledger.projections.directory import get_budget, get_budgets, list_budgets


class NewBudgetRequest(msgspec.Struct, kw_only=True):
    budget_id: Identifier | None = None
    max_budget: Decimal | None = None
    soft_budget: Decimal | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    max_parallel_requests: int | None = None
    budget_duration: str | None = None


class UpdateBudgetRequest(msgspec.Struct, kw_only=True):
    budget_id: Identifier
    max_budget: Decimal | None | UnsetType = UNSET
    soft_budget: Decimal | None | UnsetType = UNSET
    rpm_limit: int | None | UnsetType = UNSET
    tpm_limit: int | None | UnsetType = UNSET
    max_parallel_requests: int | None | UnsetType = UNSET
    budget_duration: str | None | UnsetType = UNSET


class BudgetIds(msgspec.Struct, kw_only=True):
    budgets: list[Identifier]


class BudgetRef(msgspec.Struct, kw_only=True):
    id: Identifier


class BudgetView(msgspec.Struct, kw_only=True):
    """A budget tier as the routes answer it (projections/directory.py `budget_view`)."""

    budget_id: str
    max_budget: Decimal | None
    soft_budget: Decimal | None
    rpm_limit: int | None
    tpm_limit: int | None
    max_parallel_requests: int | None
    budget_duration: str | None
    created_at: datetime
    updated_at: datetime


_tags = ["budgets"]


def _missing(budget_id: str, param: str = "budget_id") -> NotFound:
    return NotFound(f"budget {budget_id!r} does not exist", param=param)


@post(
    "/budget/new",
    guards=[requires(Permission.MANAGE)],
    tags=_tags,
    status_code=200,
    summary="Create a budget tier",
    **documented(*WRITE),
)
async def new_budget(request: Request[Any, Any, Any], data: NewBudgetRequest) -> Response[BudgetView]:
    return json_response(await create_budget(services_of(request), caller_of(request).actor, data))


async def create_budget(services: Services, actor: str, data: NewBudgetRequest) -> dict[str, Any]:
    """Define a tier (the API's /budget/new and the admin UI's form); its view."""
    budget_id = directory.new_budget_id() if data.budget_id is None else data.budget_id
    if not budget_id.strip():
        raise bad_request("budget_id must not be empty", param="budget_id")
    event = BudgetDefined(
        budget_id=budget_id,
        max_budget=data.max_budget,
        soft_budget=data.soft_budget,
        rpm_limit=data.rpm_limit,
        tpm_limit=data.tpm_limit,
        max_parallel_requests=data.max_parallel_requests,
        budget_duration=data.budget_duration,
    )
    async with services.pool.acquire() as conn, conn.transaction():
        await directory.define_budget(conn, event, actor, datetime.now(UTC))
        view = await get_budget(conn, budget_id)
    assert view is not None
    return view


@post(
    "/budget/info",
    guards=[requires(Permission.READ_ALL)],
    tags=_tags,
    status_code=200,
    summary="Budgets by id",
    **documented(*BODY, 404),
)
async def budget_info(request: Request[Any, Any, Any], data: BudgetIds) -> Response[list[BudgetView]]:
    if not data.budgets:
        raise bad_request("Name the budgets to read: {'budgets': [...]}", param="budgets")
    found = await get_budgets(services_of(request).pool, data.budgets)
    known = {budget["budget_id"] for budget in found}
    for budget_id in data.budgets:
        if budget_id not in known:
            raise _missing(budget_id, param="budgets")
    return json_response(found)


@post(
    "/budget/update",
    guards=[requires(Permission.MANAGE)],
    tags=_tags,
    status_code=200,
    summary="Change a budget tier (only the fields sent)",
    **documented(*WRITE, 404),
)
async def update_budget(request: Request[Any, Any, Any], data: UpdateBudgetRequest) -> Response[BudgetView]:
    return json_response(await change_budget(services_of(request), caller_of(request).actor, data))


async def change_budget(services: Services, actor: str, data: UpdateBudgetRequest) -> dict[str, Any]:
    """Change the fields sent of a tier (/budget/update and the admin UI); its view."""
    changes = sent_fields(data, "budget_id")
    async with services.pool.acquire() as conn, conn.transaction():
        if changes:
            await directory.update_budget(
                conn, BudgetUpdated(budget_id=data.budget_id, **changes), actor, datetime.now(UTC)
            )
        view = await get_budget(conn, data.budget_id)
    if view is None:
        raise _missing(data.budget_id)
    return view


@post(
    "/budget/delete",
    guards=[requires(Permission.MANAGE)],
    tags=_tags,
    status_code=200,
    summary="Delete a budget tier that no customer or key uses",
    **documented(*WRITE, 404),
)
async def delete_budget(request: Request[Any, Any, Any], data: BudgetRef) -> Response[BudgetView]:
    return json_response(await remove_budget(services_of(request), caller_of(request).actor, data.id))


async def remove_budget(services: Services, actor: str, budget_id: str) -> dict[str, Any]:
    """Delete a tier no customer or key uses (/budget/delete and the admin UI); the view it had."""
    async with services.pool.acquire() as conn, conn.transaction():
        view = await get_budget(conn, budget_id)
        if view is None:
            raise _missing(budget_id, param="id")
        await directory.delete_budget(conn, budget_id, actor)
    return view


@get(
    "/budget/list",
    guards=[requires(Permission.READ_ALL)],
    tags=_tags,
    summary="Every budget tier",
    **documented(*GUARDED),
)
async def budget_list(request: Request[Any, Any, Any]) -> Response[list[BudgetView]]:
    return json_response(await list_budgets(services_of(request).pool))


route_handlers = [new_budget, budget_info, update_budget, delete_budget, budget_list]
