"""Customers (end users): /customer/info, also under /end_user/*."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get
from litestar.params import Parameter

from api.auth import master_key_only
from api.jsonio import json_response
from api.services import Services
from ledger.errors import NotFound
from projections.customers import customer_info


@get(
    ["/customer/info", "/end_user/info"],
    guards=[master_key_only],
    tags=["customers"],
    summary="A customer's status, budget tier and spend",
)
async def get_customer_info(
    request: Request[Any, Any, Any],
    end_user_id: str = Parameter(query="end_user_id", min_length=1),
) -> Response[Any]:
    services: Services = request.app.state.services
    info = await customer_info(services.pool, end_user_id)
    if info is None:
        raise NotFound(f"End User Id={end_user_id} does not exist in the ledger", param="end_user_id")
    return json_response(info)


route_handlers = [get_customer_info]
