"""Commands on budgets (pricing tiers), customers, teams and internal users, and their projector.

Each command validates, appends its event and projects it, all in the caller's transaction; the
invariants (a customer has either its own budget or a tier, a tier in use cannot be deleted, ids
are unique, money is non-negative and finite) are checked here, not in the routes.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from spendledger.ledger import keys
from spendledger.ledger.connections import Connection
from spendledger.ledger.entities import (
    BUDGETS,
    CUSTOMERS,
    TEAMS,
    USERS,
    EntityTable,
    append_next,
    create,
    delete,
    fetch,
    project_create,
    project_delete,
    project_update,
    update,
    validate_budget_fields,
)
from spendledger.ledger.errors import InvalidCommand, NotFound
from spendledger.ledger.events import (
    BudgetDefined,
    BudgetDeleted,
    BudgetUpdated,
    CustomerBlocked,
    CustomerCreated,
    CustomerDeleted,
    CustomerUnblocked,
    CustomerUpdated,
    Event,
    TeamCreated,
    TeamDeleted,
    TeamUpdated,
    UserCreated,
    UserDeleted,
    UserUpdated,
    changed_fields,
)

BUDGET_FIELDS = (
    "max_budget",
    "soft_budget",
    "rpm_limit",
    "tpm_limit",
    "max_parallel_requests",
    "budget_duration",
)


def new_budget_id() -> str:
    return f"budget-{uuid.uuid4().hex[:16]}"


def own_budget_id(customer_id: str) -> str:
    """The budget that holds a customer's inline limits (`/customer/new` with `max_budget` …)."""
    return f"customer-budget:{customer_id}"


# --- budgets ---------------------------------------------------------------------------------


async def define_budget(conn: Connection, event: BudgetDefined, actor: str, now: datetime) -> None:
    validate_budget_fields({name: getattr(event, name) for name in BUDGET_FIELDS})
    await create(conn, BUDGETS, event, actor, now)


async def update_budget(conn: Connection, event: BudgetUpdated, actor: str, now: datetime) -> None:
    validate_budget_fields(changed_fields(event, "budget_id"))
    await update(conn, BUDGETS, event, actor, now)


async def delete_budget(conn: Connection, budget_id: str, actor: str) -> None:
    users = await conn.fetchval(
        "select (select count(*) from customers where budget_id = $1) + (select count(*) from keys where budget_id = $1)",
        budget_id,
    )
    if users:
        raise InvalidCommand(
            f"budget {budget_id!r} is in use by {users} customers or keys: move them first", param="id"
        )
    await delete(conn, BUDGETS, BudgetDeleted(budget_id=budget_id), actor)


async def require_budget(conn: Connection, budget_id: str | None) -> None:
    if budget_id is not None and await fetch(conn, BUDGETS, budget_id) is None:
        raise InvalidCommand(
            f"budget_id {budget_id!r} does not exist: create it with /budget/new", param="budget_id"
        )


# --- customers -------------------------------------------------------------------------------


def _inline_budget(fields: dict[str, Any]) -> dict[str, Any]:
    return {name: fields[name] for name in BUDGET_FIELDS if fields.get(name) is not None}


async def create_customer(
    conn: Connection, event: CustomerCreated, inline_budget: dict[str, Any], actor: str, now: datetime
) -> None:
    """A customer with a tier (`budget_id`), or with its own limits (`max_budget` …), not both."""
    limits = _inline_budget(inline_budget)
    if limits and event.budget_id is not None:
        raise InvalidCommand("Set either 'max_budget' or 'budget_id', not both.", param="budget_id")
    await require_budget(conn, event.budget_id)
    if limits:
        budget_id = own_budget_id(event.user_id)
        if await fetch(conn, BUDGETS, budget_id) is None:
            await define_budget(conn, BudgetDefined(budget_id=budget_id, **limits), actor, now)
        else:
            await update_budget(conn, BudgetUpdated(budget_id=budget_id, **limits), actor, now)
        event = CustomerCreated(**{**_fields(event), "budget_id": budget_id})
    await create(conn, CUSTOMERS, event, actor, now)


async def update_customer(
    conn: Connection, event: CustomerUpdated, inline_budget: dict[str, Any], actor: str, now: datetime
) -> None:
    limits = _inline_budget(inline_budget)
    changes = changed_fields(event, "user_id")
    if limits and changes.get("budget_id") is not None:
        raise InvalidCommand("Set either 'max_budget' or 'budget_id', not both.", param="budget_id")
    if await fetch(conn, CUSTOMERS, event.user_id) is None:
        raise NotFound(f"customer {event.user_id!r} does not exist", param="user_id")
    await require_budget(conn, changes.get("budget_id"))
    if limits:
        budget_id = own_budget_id(event.user_id)
        if await fetch(conn, BUDGETS, budget_id) is None:
            await define_budget(conn, BudgetDefined(budget_id=budget_id, **limits), actor, now)
        else:
            await update_budget(conn, BudgetUpdated(budget_id=budget_id, **limits), actor, now)
        event = CustomerUpdated(**{**_fields(event), "budget_id": budget_id})
    await update(conn, CUSTOMERS, event, actor, now)


async def set_customer_blocked(
    conn: Connection, user_id: str, blocked: bool, actor: str, now: datetime
) -> None:
    event: Event = CustomerBlocked(user_id=user_id) if blocked else CustomerUnblocked(user_id=user_id)
    if await fetch(conn, CUSTOMERS, user_id) is None:
        # Blocking someone never seen yet is legitimate: create them blocked.
        if not blocked:
            raise NotFound(f"customer {user_id!r} does not exist", param="user_ids")
        await create(conn, CUSTOMERS, CustomerCreated(user_id=user_id), actor, now)
    await append_next(conn, CUSTOMERS, user_id, event, actor, now)
    await apply_directory_event(conn, event, now)


async def delete_customers(conn: Connection, user_ids: list[str], actor: str) -> None:
    for user_id in sorted(set(user_ids)):
        await delete(conn, CUSTOMERS, CustomerDeleted(user_id=user_id), actor)


# --- teams and internal users ------------------------------------------------------------------


async def create_team(conn: Connection, event: TeamCreated, actor: str, now: datetime) -> None:
    validate_budget_fields(_fields(event))
    await create(conn, TEAMS, event, actor, now)


async def update_team(conn: Connection, event: TeamUpdated, actor: str, now: datetime) -> None:
    validate_budget_fields(changed_fields(event, "team_id"))
    await update(conn, TEAMS, event, actor, now)


async def delete_teams(conn: Connection, team_ids: list[str], actor: str, now: datetime) -> None:
    """Delete teams and their keys (all or none): a key must not outlive its team's budget."""
    for team_id in sorted(set(team_ids)):
        await delete(conn, TEAMS, TeamDeleted(team_id=team_id), actor)
    await _delete_keys_of(conn, "team_id", team_ids, actor, now)


async def create_user(conn: Connection, event: UserCreated, actor: str, now: datetime) -> None:
    validate_budget_fields(_fields(event))
    await create(conn, USERS, event, actor, now)


async def update_user(conn: Connection, event: UserUpdated, actor: str, now: datetime) -> None:
    validate_budget_fields(changed_fields(event, "user_id"))
    await update(conn, USERS, event, actor, now)


async def delete_users(conn: Connection, user_ids: list[str], actor: str, now: datetime) -> None:
    """Delete internal users and their keys (all or none), as LiteLLM does."""
    for user_id in sorted(set(user_ids)):
        await delete(conn, USERS, UserDeleted(user_id=user_id), actor)
    await _delete_keys_of(conn, "user_id", user_ids, actor, now)


async def _delete_keys_of(
    conn: Connection, owner: str, owner_ids: list[str], actor: str, now: datetime
) -> None:
    rows = await conn.fetch(f"select key_hash from keys where {owner} = any($1::text[])", owner_ids)
    if rows:
        await keys.delete_keys(conn, [row["key_hash"] for row in rows], actor, now)


def _fields(event: Event) -> dict[str, Any]:
    return {name: getattr(event, name) for name in event.__struct_fields__}


# --- the projector (live and for rebuilds) ------------------------------------------------------

_CREATES: dict[type[Event], EntityTable] = {
    BudgetDefined: BUDGETS,
    CustomerCreated: CUSTOMERS,
    TeamCreated: TEAMS,
    UserCreated: USERS,
}
_UPDATES: dict[type[Event], EntityTable] = {
    BudgetUpdated: BUDGETS,
    CustomerUpdated: CUSTOMERS,
    TeamUpdated: TEAMS,
    UserUpdated: USERS,
}
_DELETES: dict[type[Event], EntityTable] = {
    BudgetDeleted: BUDGETS,
    CustomerDeleted: CUSTOMERS,
    TeamDeleted: TEAMS,
    UserDeleted: USERS,
}


async def apply_directory_event(conn: Connection, event: Event, at: datetime) -> bool:
    """Project one directory event; False if the event is not a directory event."""
    kind = type(event)
    if kind in _CREATES:
        await project_create(conn, _CREATES[kind], event, at)
    elif kind in _UPDATES:
        await project_update(conn, _UPDATES[kind], event, at)
    elif kind in _DELETES:
        table = _DELETES[kind]
        await project_delete(conn, table, getattr(event, table.id_field))
    elif isinstance(event, CustomerBlocked | CustomerUnblocked):
        await conn.execute(
            "update customers set blocked = $2, updated_at = $3 where user_id = $1",
            event.user_id,
            isinstance(event, CustomerBlocked),
            at,
        )
    else:
        return False
    return True
