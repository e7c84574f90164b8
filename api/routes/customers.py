"""Customers (end users): /customer/new|info|update|delete|block|unblock|list, also under /end_user/*."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec
from litestar import Request, Response, get, post
from msgspec import UNSET, UnsetType

from spendledger.api.auth import caller_of, requires
from spendledger.api.errors import bad_request
from spendledger.api.jsonio import json_response
from spendledger.api.params import ID_PARAM
from spendledger.api.roles import Permission
from spendledger.api.schemas import GUARDED, READ, WRITE, documented
from spendledger.api.services import Services, services_of
from spendledger.ledger import directory
from spendledger.ledger.errors import NotFound
from spendledger.ledger.events import CustomerCreated, CustomerUpdated
from spendledger.ledger.identifiers import FreeText, Identifier
from spendledger.projections.customers import customer_info, list_customers


class NewCustomerRequest(msgspec.Struct, kw_only=True):
    user_id: Identifier
    alias: FreeText | None = None
    blocked: bool = False
    budget_id: Identifier | None = None
    allowed_model_region: FreeText | None = None
    default_model: FreeText | None = None
    max_budget: Decimal | None = None
    soft_budget: Decimal | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    max_parallel_requests: int | None = None
    budget_duration: str | None = None


class UpdateCustomerRequest(msgspec.Struct, kw_only=True):
    user_id: Identifier
    alias: FreeText | None | UnsetType = UNSET
    blocked: bool | UnsetType = UNSET
    budget_id: Identifier | None | UnsetType = UNSET
    allowed_model_region: FreeText | None | UnsetType = UNSET
    default_model: FreeText | None | UnsetType = UNSET
    max_budget: Decimal | None = None
    soft_budget: Decimal | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    max_parallel_requests: int | None = None
    budget_duration: str | None = None


class CustomerIds(msgspec.Struct, kw_only=True):
    user_ids: list[Identifier]


class CustomerBudget(msgspec.Struct, kw_only=True):
    """The budget tier that governs a customer (its own, or the default tier)."""

    budget_id: str
    max_budget: Decimal | None
    soft_budget: Decimal | None
    rpm_limit: int | None
    tpm_limit: int | None
    max_parallel_requests: int | None
    budget_duration: str | None
    budget_reset_at: datetime | None  # the end of the current budget period


class CustomerInfo(msgspec.Struct, kw_only=True):
    """A customer as the routes answer it (projections/customers.py)."""

    user_id: str
    blocked: bool
    alias: str | None
    spend: Decimal  # of the current budget period (lifetime, without a limit or duration)
    allowed_model_region: str | None
    default_model: str | None
    litellm_budget_table: CustomerBudget | None


class DeletedCustomers(msgspec.Struct, kw_only=True):
    deleted_customers: list[str]


class BlockedCustomers(msgspec.Struct, kw_only=True):
    blocked_users: list[str]


class UnblockedCustomers(msgspec.Struct, kw_only=True):
    unblocked_users: list[str]


_BUDGET_FIELDS = directory.BUDGET_FIELDS
_tags = ["customers"]


async def _info(services: Services, user_id: str) -> dict[str, Any]:
    info = await customer_info(services.pool, user_id, services.settings.max_end_user_budget_id)
    if info is None:
        raise NotFound(f"End User Id={user_id} does not exist in the ledger", param="end_user_id")
    return info


@post(
    ["/customer/new", "/end_user/new"],
    guards=[requires(Permission.MANAGE)],
    tags=_tags,
    status_code=200,
    summary="Create a customer with a budget tier (budget_id) or its own limits",
    **documented(*WRITE, 404),
)
async def new_customer(request: Request[Any, Any, Any], data: NewCustomerRequest) -> Response[CustomerInfo]:
    return json_response(await create_customer(services_of(request), caller_of(request).actor, data))


async def create_customer(services: Services, actor: str, data: NewCustomerRequest) -> dict[str, Any]:
    """Create a customer (/customer/new and the admin UI); its view."""
    if not data.user_id.strip():
        raise bad_request("user_id must not be empty", param="user_id")
    event = CustomerCreated(
        user_id=data.user_id,
        alias=data.alias,
        blocked=data.blocked,
        budget_id=data.budget_id,
        allowed_model_region=data.allowed_model_region,
        default_model=data.default_model,
    )
    inline = {name: getattr(data, name) for name in _BUDGET_FIELDS}
    async with services.pool.acquire() as conn, conn.transaction():
        await directory.create_customer(conn, event, inline, actor, datetime.now(UTC))
    return await _info(services, data.user_id)


@get(
    ["/customer/info", "/end_user/info"],
    guards=[requires(Permission.READ_ALL)],
    tags=_tags,
    summary="A customer's status, budget tier and spend in the current budget period",
    **documented(*READ, 404),
)
async def get_customer_info(
    request: Request[Any, Any, Any], end_user_id: str = ID_PARAM
) -> Response[CustomerInfo]:
    return json_response(await _info(services_of(request), end_user_id))


@post(
    ["/customer/update", "/end_user/update"],
    guards=[requires(Permission.MANAGE)],
    tags=_tags,
    status_code=200,
    summary="Change a customer's alias, tier or own limits",
    **documented(*WRITE, 404),
)
async def update_customer(
    request: Request[Any, Any, Any], data: UpdateCustomerRequest
) -> Response[CustomerInfo]:
    services = services_of(request)
    changes = {
        name: getattr(data, name)
        for name in ("alias", "budget_id", "allowed_model_region", "default_model")
        if getattr(data, name) is not UNSET
    }
    inline = {name: getattr(data, name) for name in _BUDGET_FIELDS}
    now = datetime.now(UTC)
    async with services.pool.acquire() as conn, conn.transaction():
        if changes or any(v is not None for v in inline.values()):
            await directory.update_customer(
                conn, CustomerUpdated(user_id=data.user_id, **changes), inline, caller_of(request).actor, now
            )
        if data.blocked is not UNSET:
            await directory.set_customer_blocked(
                conn, data.user_id, data.blocked, caller_of(request).actor, now
            )
    return json_response(await _info(services, data.user_id))


@post(
    ["/customer/delete", "/end_user/delete"],
    guards=[requires(Permission.MANAGE)],
    tags=_tags,
    status_code=200,
    summary="Delete customers (all or none); their events and spend history stay",
    **documented(*WRITE, 404),
)
async def delete_customers(request: Request[Any, Any, Any], data: CustomerIds) -> Response[DeletedCustomers]:
    services = services_of(request)
    async with services.pool.acquire() as conn, conn.transaction():
        await directory.delete_customers(conn, data.user_ids, caller_of(request).actor)
    return json_response({"deleted_customers": data.user_ids})


async def _set_blocked(request: Request[Any, Any, Any], user_ids: list[str], blocked: bool) -> Response[Any]:
    await set_customers_blocked(services_of(request), caller_of(request).actor, user_ids, blocked)
    return json_response({"blocked_users" if blocked else "unblocked_users": user_ids})


async def set_customers_blocked(services: Services, actor: str, user_ids: list[str], blocked: bool) -> None:
    """Block or unblock customers, all or none (/customer/block|unblock and the admin UI)."""
    if not user_ids:
        raise bad_request("user_ids must name at least one customer", param="user_ids")
    now = datetime.now(UTC)
    async with services.pool.acquire() as conn, conn.transaction():
        for user_id in sorted(set(user_ids)):
            await directory.set_customer_blocked(conn, user_id, blocked, actor, now)


@post(
    ["/customer/block", "/end_user/block"],
    guards=[requires(Permission.MANAGE)],
    tags=_tags,
    status_code=200,
    summary="Block customers: their requests get 403 whatever key they use",
    **documented(*WRITE),
)
async def block_customers(request: Request[Any, Any, Any], data: CustomerIds) -> Response[BlockedCustomers]:
    return await _set_blocked(request, data.user_ids, blocked=True)


@post(
    ["/customer/unblock", "/end_user/unblock"],
    guards=[requires(Permission.MANAGE)],
    tags=_tags,
    status_code=200,
    summary="Unblock customers",
    **documented(*WRITE, 404),
)
async def unblock_customers(
    request: Request[Any, Any, Any], data: CustomerIds
) -> Response[UnblockedCustomers]:
    return await _set_blocked(request, data.user_ids, blocked=False)


@get(
    ["/customer/list", "/end_user/list"],
    guards=[requires(Permission.READ_ALL)],
    tags=_tags,
    summary="Every customer",
    **documented(*GUARDED),
)
async def get_customer_list(request: Request[Any, Any, Any]) -> Response[list[CustomerInfo]]:
    services = services_of(request)
    return json_response(await list_customers(services.pool, services.settings.max_end_user_budget_id))


route_handlers = [
    new_customer,
    get_customer_info,
    update_customer,
    delete_customers,
    block_customers,
    unblock_customers,
    get_customer_list,
]
