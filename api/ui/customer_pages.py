"""Customers: a searchable, paged list; a customer's page (spend per day and per model, its recent
requests from the audit log with their Lago delivery state); create, block and unblock."""

from __future__ import annotations

from typing import Any, Final

from litestar import Request, Response, get, post
from litestar.params import Parameter
from litestar.response import Redirect

from spendledger.api.routes.customers import NewCustomerRequest, create_customer, set_customers_blocked
from spendledger.api.services import services_of
from spendledger.api.ui.charts import stacked_days
from spendledger.api.ui.forms import (
    REFUSED,
    FormRefused,
    notice,
    posted_form,
    refusal,
    refusal_status,
    to_request,
)
from spendledger.api.ui.ranges import day_range
from spendledger.api.ui.render import page
from spendledger.api.ui.sessions import UiSession, current_session
from spendledger.projections.admin_views import (
    budget_tiers,
    customers_page,
    daily_series,
    lago_states,
    recent_requests,
    spend_by_model,
)
from spendledger.projections.audit import InvalidCursor
from spendledger.projections.customers import customer_info

PAGE_SIZE: Final = 50
REQUESTS_PAGE: Final = 25
LABELS: Final = {
    "user_id": "Customer ID",
    "alias": "Alias",
    "budget_id": "Budget ID",
    "max_budget": "Max Budget",
    "budget_duration": "Budget Duration",
}
TEXT: Final = Parameter(default=None, max_length=256)
_NOTICES: Final = {
    "created": "Customer {!r} created.",
    "blocked": "Customer {!r} blocked: the proxy refuses its requests.",
    "unblocked": "Customer {!r} unblocked.",
}


@get("/customers", include_in_schema=False)
async def customers_list(
    request: Request[Any, Any, Any], q: str | None = TEXT, after: str | None = TEXT, tier: str | None = TEXT
) -> Response[str]:
    session = await current_session(request)
    services = services_of(request)
    rows, next_after, total = await customers_page(
        services.pool, services.settings.max_end_user_budget_id, q or "", after, PAGE_SIZE, tier
    )
    return page(
        "customers.html", session, tab="customers", rows=rows, q=q or "", tier=tier or "", after=after,
        next_after=next_after, total=total, notice=notice(request, "Customer", ("created",)),
    )


async def _new_form(request: Request[Any, Any, Any], session: UiSession, values: dict[str, str],
                    error: str | None = None, status_code: int = 200) -> Response[str]:
    services = services_of(request)
    tiers = await budget_tiers(services.pool, services.settings.max_end_user_budget_id)
    return page("customer_form.html", session, status_code=status_code, tab="customers", labels=LABELS,
                values=values, tiers=[t["budget_id"] for t in tiers], error=error)


@get("/customers/new", include_in_schema=False)
async def new_customer_form(request: Request[Any, Any, Any]) -> Response[str]:
    return await _new_form(request, await current_session(request), {})


@post("/customers/new", include_in_schema=False, status_code=303)
async def create_customer_from_form(request: Request[Any, Any, Any]) -> Response[str]:
    session, fields = await posted_form(request)
    try:
        data = to_request(fields, NewCustomerRequest, LABELS)
        await create_customer(services_of(request), session.caller.actor, data)
    except REFUSED as exc:
        return await _new_form(request, session, fields, refusal(exc), refusal_status(exc))
    return Redirect("/ui/customer", query_params={"id": data.user_id, "done": "created"}, status_code=303)


@get("/customer", include_in_schema=False)
async def customer_page(
    request: Request[Any, Any, Any],
    id: str = Parameter(max_length=256),
    start: str | None = TEXT,
    end: str | None = TEXT,
    before: str | None = TEXT,
) -> Response[str]:
    session = await current_session(request)
    services = services_of(request)
    info = await customer_info(services.pool, id, services.settings.max_end_user_budget_id)
    if info is None:
        return page("refused.html", session, status_code=404, tab="customers", title="No such customer",
                    message=f"Customer {id!r} does not exist.")
    days = day_range(start, end)
    series = await daily_series(services.pool, "customer", days.start, days.end, scope_id=id, drawn=1, listed=1)
    models = await spend_by_model(services.pool, id, *days.instants)
    try:
        requests, older = await recent_requests(services.pool, id, before, REQUESTS_PAGE)
    except InvalidCursor:
        raise FormRefused("That page of requests does not exist (a cursor this page did not make)") from None
    done = _NOTICES.get(request.query_params.get("done") or "")
    return page(
        "customer.html", session, tab="customers", customer=info, range=days,
        chart=stacked_days(days.days, series.days), range_total=series.total,
        models=models, requests=requests, older=older, before=before,
        lago=services.settings.lago is not None, lago_counts=lago_states(requests),
        notice=done.format(id) if done is not None else None,
    )


@post("/customers/block", include_in_schema=False, status_code=303)
async def block_customer_from_form(request: Request[Any, Any, Any]) -> Response[str]:
    session, fields = await posted_form(request)
    user_id = fields.get("user_id", "")
    blocked = fields.get("blocked") == "true"
    try:
        await set_customers_blocked(services_of(request), session.caller.actor, [user_id], blocked)
    except REFUSED as exc:
        return page("refused.html", session, status_code=refusal_status(exc), tab="customers",
                    title="Not changed", message=refusal(exc))
    done = "blocked" if blocked else "unblocked"
    return Redirect("/ui/customer", query_params={"id": user_id, "done": done}, status_code=303)


route_handlers = [
    customers_list, new_customer_form, create_customer_from_form, customer_page, block_customer_from_form,
]
