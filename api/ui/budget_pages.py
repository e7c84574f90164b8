"""The Budgets tab (seed 002): pricing tiers, their customers and spend; create, edit, delete."""

from __future__ import annotations

from typing import Any, Final

from litestar import Request, Response, get, post
from litestar.response import Redirect

from spendledger.api.routes.budgets import (
    NewBudgetRequest,
    UpdateBudgetRequest,
    change_budget,
    create_budget,
    remove_budget,
)
from spendledger.api.services import services_of
from spendledger.api.ui.forms import REFUSED, notice, posted_form, refusal, refusal_status, to_request
from spendledger.api.ui.render import page
from spendledger.api.ui.sessions import current_session
from spendledger.projections.admin_views import budget_tiers
from spendledger.projections.directory import get_budget

LABELS: Final = {
    "budget_id": "Budget ID",
    "max_budget": "Max Budget",
    "soft_budget": "Soft Budget",
    "budget_duration": "Budget Duration",
    "rpm_limit": "RPM Limit",
    "tpm_limit": "TPM Limit",
    "max_parallel_requests": "Max Parallel Requests",
}


async def _list(request: Request[Any, Any, Any], error: str | None = None, status_code: int = 200) -> Response[str]:
    session = await current_session(request)
    services = services_of(request)
    tiers = await budget_tiers(services.pool, services.settings.max_end_user_budget_id)
    return page(
        "budgets.html", session, status_code=status_code, tab="budgets", tiers=tiers, error=error,
        notice=notice(request, "Budget", ("created", "updated", "deleted")), default_tier=services.settings.max_end_user_budget_id,
    )


@get("/budgets", include_in_schema=False)
async def budgets_tab(request: Request[Any, Any, Any]) -> Response[str]:
    return await _list(request)


def _form(request: Request[Any, Any, Any], session: Any, values: dict[str, Any], editing: bool,
          error: str | None = None, status_code: int = 200) -> Response[str]:
    return page("budget_form.html", session, status_code=status_code, tab="budgets", labels=LABELS,
                values=values, editing=editing, error=error)


@get("/budgets/new", include_in_schema=False)
async def new_budget_form(request: Request[Any, Any, Any]) -> Response[str]:
    return _form(request, await current_session(request), {}, editing=False)


@post("/budgets/new", include_in_schema=False, status_code=303)
async def create_budget_from_form(request: Request[Any, Any, Any]) -> Response[str]:
    session, fields = await posted_form(request)
    try:
        data = to_request(fields, NewBudgetRequest, LABELS)
        view = await create_budget(services_of(request), session.caller.actor, data)
    except REFUSED as exc:
        return _form(request, session, fields, editing=False, error=refusal(exc), status_code=400)
    return Redirect("/ui/budgets", query_params={"created": view["budget_id"]}, status_code=303)


@get("/budgets/edit", include_in_schema=False)
async def edit_budget_form(request: Request[Any, Any, Any], id: str) -> Response[str]:
    session = await current_session(request)
    view = await get_budget(services_of(request).pool, id)
    if view is None:
        return await _list(request, f"budget {id!r} does not exist", 404)
    values = {name: "" if view[name] is None else str(view[name]) for name in LABELS}
    return _form(request, session, values, editing=True)


@post("/budgets/edit", include_in_schema=False, status_code=303)
async def update_budget_from_form(request: Request[Any, Any, Any]) -> Response[str]:
    session, fields = await posted_form(request)
    budget_id = fields.get("budget_id", "")
    editable = {name: label for name, label in LABELS.items() if name != "budget_id"}
    try:
        data = to_request(fields, UpdateBudgetRequest, editable, {"budget_id": budget_id}, cleared=True)
        await change_budget(services_of(request), session.caller.actor, data)
    except REFUSED as exc:
        return _form(request, session, fields, editing=True, error=refusal(exc), status_code=400)
    return Redirect("/ui/budgets", query_params={"updated": budget_id}, status_code=303)


@post("/budgets/delete", include_in_schema=False, status_code=303)
async def delete_budget_from_form(request: Request[Any, Any, Any]) -> Response[str]:
    session, fields = await posted_form(request)
    budget_id = fields.get("budget_id", "")
    try:
        await remove_budget(services_of(request), session.caller.actor, budget_id)
    except REFUSED as exc:
        return await _list(request, refusal(exc), refusal_status(exc))
    return Redirect("/ui/budgets", query_params={"deleted": budget_id}, status_code=303)


route_handlers = [
    budgets_tab, new_budget_form, create_budget_from_form, edit_budget_form, update_budget_from_form,
    delete_budget_from_form,
]
