"""Spend reports: /spend/logs and /global/spend/report, in LiteLLM's shapes."""

from __future__ import annotations

import re
from datetime import date
from typing import Any, Literal

from litestar import Request, Response, get
from litestar.params import Parameter

from api.auth import caller_of, requires
from api.jsonio import json_response
from api.params import OPTIONAL_ID_PARAM
from api.roles import Permission
from api.services import services_of
from ledger.keys import hash_key
from projections import daily
from projections.spend_logs import daily_spend, day_range, global_spend_report, spend_logs

_HASH = re.compile(r"^[0-9a-f]{64}$")


@get(
    "/spend/logs",
    guards=[requires(Permission.READ_OWN)],
    tags=["spend"],
    summary="Spend logs by key, user or request; per-day totals when only dates are given",
)
async def get_spend_logs(
    request: Request[Any, Any, Any],
    api_key: str | None = None,
    user_id: str | None = OPTIONAL_ID_PARAM,
    request_id: str | None = OPTIONAL_ID_PARAM,
    start_date: date | None = None,
    end_date: date | None = None,
    limit: int = Parameter(default=1000, ge=1, le=100_000),
) -> Response[Any]:
    services = services_of(request)
    # An internal user's logs are its own user's: its filter always holds (and never widens).
    user_id = caller_of(request).user_scope(user_id, over=Permission.READ_ALL)
    start, end = day_range(start_date, end_date)
    if api_key is None and user_id is None and request_id is None and (start or end):
        return json_response(await daily_spend(services.pool, start, end))
    key_hash = api_key if api_key is None or _HASH.match(api_key) else hash_key(api_key)
    rows = await spend_logs(
        services.pool,
        api_key=key_hash,
        user_id=user_id,
        request_id=request_id,
        start=start,
        end=end,
        limit=limit,
    )
    return json_response(rows)


@get(
    "/global/spend/report",
    guards=[requires(Permission.READ_ALL)],
    tags=["spend"],
    summary="Spend per day per team (or customer, or key), by model",
)
async def get_global_spend_report(
    request: Request[Any, Any, Any],
    start_date: date | None = None,
    end_date: date | None = None,
    group_by: Literal["team", "customer", "api_key"] = "team",
) -> Response[Any]:
    services = services_of(request)
    start, end = day_range(start_date, end_date)
    return json_response(await global_spend_report(services.pool, start, end, group_by))


@get(
    "/spend/daily",
    guards=[requires(Permission.READ_ALL)],
    tags=["spend"],
    summary="Daily spend per customer, user, team, key or model (a projection that follows the log)",
)
async def get_daily_spend(
    request: Request[Any, Any, Any],
    # Not named `scope` in Python: Litestar injects the ASGI scope into a parameter of that name.
    scope_: Literal["customer", "user", "team", "key", "model"] = Parameter(
        query="scope", default="customer"
    ),
    scope_id: str | None = OPTIONAL_ID_PARAM,
    start_date: date | None = None,
    end_date: date | None = None,
) -> Response[Any]:
    services = services_of(request)
    rows = await daily.daily_spend(services.pool, scope_, start_date, end_date, scope_id)
    return json_response({"rows": rows, "checkpoint": await daily.checkpoint(services.pool)})


route_handlers = [get_spend_logs, get_global_spend_report, get_daily_spend]
