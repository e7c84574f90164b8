"""Spend reports: /spend/logs and /global/spend/report, in LiteLLM's shapes."""

from __future__ import annotations

import re
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Literal

import msgspec
from litestar import Request, Response, get
from litestar.params import Parameter

from spendledger.api.auth import caller_of, requires
from spendledger.api.jsonio import json_response
from spendledger.api.params import OPTIONAL_ID_PARAM
from spendledger.api.roles import Permission
from spendledger.api.schemas import READ, documented
from spendledger.api.services import services_of
from spendledger.ledger.keys import hash_key
from spendledger.projections import daily
from spendledger.projections.spend_logs import daily_spend, day_range, global_spend_report, spend_logs

_HASH = re.compile(r"^[0-9a-f]{64}$")


class SpendLog(msgspec.Struct, kw_only=True):
    """One request as /spend/logs shows it (projections/spend_logs.py `log_view`), LiteLLM's names."""

    request_id: str
    call_type: str
    api_key: str  # the key's SHA-256 (hex)
    spend: Decimal
    total_tokens: int
    prompt_tokens: int
    completion_tokens: int
    startTime: datetime
    endTime: datetime
    model: str | None
    model_id: str | None
    model_group: str | None
    user: str  # the internal user, "" for none
    team_id: str | None
    end_user: str  # the customer, "" for none
    status: str
    usage_estimated: bool
    metadata: dict[str, Any]


class DaySpend(msgspec.Struct, kw_only=True):
    """One day's spend, by model group and by internal user ("" for none): /spend/logs with dates only."""

    startTime: date
    spend: Decimal
    models: dict[str, Decimal]
    users: dict[str, Decimal]


class ModelSpend(msgspec.Struct, kw_only=True):
    model: str | None
    spend: Decimal
    total_tokens: int


class GroupSpend(msgspec.Struct, kw_only=True):
    """One team, customer or key on one day: its name under `team_name`, `customer` or `api_key`."""

    team_name: str | None | msgspec.UnsetType = msgspec.UNSET
    customer: str | None | msgspec.UnsetType = msgspec.UNSET
    api_key: str | None | msgspec.UnsetType = msgspec.UNSET
    total_spend: Decimal
    metadata: list[ModelSpend]


class SpendReportDay(msgspec.Struct, kw_only=True):
    """One day of /global/spend/report: its groups under `teams`, `customers` or `api_keys` (group_by)."""

    group_by_day: date
    teams: list[GroupSpend] | msgspec.UnsetType = msgspec.UNSET
    customers: list[GroupSpend] | msgspec.UnsetType = msgspec.UNSET
    api_keys: list[GroupSpend] | msgspec.UnsetType = msgspec.UNSET


class DailyRow(msgspec.Struct, kw_only=True):
    """One scope on one day; the scope's id is under the scope's own name (`customer`, `user` …)."""

    day: date
    customer: str | msgspec.UnsetType = msgspec.UNSET
    user: str | msgspec.UnsetType = msgspec.UNSET
    team: str | msgspec.UnsetType = msgspec.UNSET
    key: str | msgspec.UnsetType = msgspec.UNSET
    model: str | msgspec.UnsetType = msgspec.UNSET
    requests: int
    input_tokens: int
    output_tokens: int
    spend: Decimal


class Checkpoint(msgspec.Struct, kw_only=True):
    """How far the daily projection has followed the log."""

    txid: str
    position: int
    updated_at: datetime


class DailySpend(msgspec.Struct, kw_only=True):
    rows: list[DailyRow]
    checkpoint: Checkpoint


@get(
    "/spend/logs",
    guards=[requires(Permission.READ_OWN)],
    tags=["spend"],
    summary="Spend logs by key, user or request; per-day totals when only dates are given",
    **documented(*READ),
)
async def get_spend_logs(
    request: Request[Any, Any, Any],
    api_key: str | None = None,
    user_id: str | None = OPTIONAL_ID_PARAM,
    request_id: str | None = OPTIONAL_ID_PARAM,
    start_date: date | None = None,
    end_date: date | None = None,
    limit: int = Parameter(default=1000, ge=1, le=100_000),
) -> Response[list[SpendLog | DaySpend]]:  # all SpendLog, or (dates only) all DaySpend
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
    **documented(*READ),
)
async def get_global_spend_report(
    request: Request[Any, Any, Any],
    start_date: date | None = None,
    end_date: date | None = None,
    group_by: Literal["team", "customer", "api_key"] = "team",
) -> Response[list[SpendReportDay]]:
    services = services_of(request)
    start, end = day_range(start_date, end_date)
    return json_response(await global_spend_report(services.pool, start, end, group_by))


@get(
    "/spend/daily",
    guards=[requires(Permission.READ_ALL)],
    tags=["spend"],
    summary="Daily spend per customer, user, team, key or model (a projection that follows the log)",
    **documented(*READ),
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
) -> Response[DailySpend]:
    services = services_of(request)
    rows = await daily.daily_spend(services.pool, scope_, start_date, end_date, scope_id)
    return json_response({"rows": rows, "checkpoint": await daily.checkpoint(services.pool)})


route_handlers = [get_spend_logs, get_global_spend_report, get_daily_spend]
