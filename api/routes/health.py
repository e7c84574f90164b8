"""Health and metrics: no auth, cheap, and honest about the database."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, get
from litestar.openapi.datastructures import ResponseSpec
from prometheus_client import CONTENT_TYPE_LATEST

from spendledger.api.jsonio import json_response
from spendledger.api.metrics import latest
from spendledger.api.services import services_of
from spendledger.ledger.connections import DATABASE_ERRORS
from spendledger.ledger.db import current_revision, head_revision
from spendledger.ledger.master_key import master_key_verdict


class Ready(msgspec.Struct, kw_only=True):
    status: str  # "healthy", or "degraded" while a sink is not ok or no publisher reports on it
    db: str  # "connected"
    migration: str
    publisher: dict[str, str]  # each sink's state: ok, failing, unauthorized or not_running
    auth: str  # "master_key", or whether the server runs open or with a weak key (by permission)


class Unready(msgspec.Struct, kw_only=True):
    """503: the database is unreachable, or not migrated to this version's head."""

    status: str  # "unhealthy"
    db: str
    migration: str | None | msgspec.UnsetType = msgspec.UNSET
    expected_migration: str | msgspec.UnsetType = msgspec.UNSET


@get("/health/liveliness", tags=["health"], summary="The process is up")
async def liveliness() -> Response[str]:
    return json_response("I'm alive!")


@get("/health/liveness", tags=["health"], summary="The process is up (LiteLLM's other spelling)")
async def liveness() -> Response[str]:
    return json_response("I'm alive!")


@get(
    "/health/readiness",
    tags=["health"],
    summary="The database is reachable and migrated",
    responses={503: ResponseSpec(data_container=Unready, description="Not ready", generate_examples=False)},
)
async def readiness(request: Request[Any, Any, Any]) -> Response[Ready]:
    services = services_of(request)
    try:
        revision = await current_revision(services.pool)
    except DATABASE_ERRORS as exc:
        return json_response({"status": "unhealthy", "db": f"unreachable ({type(exc).__name__})"}, 503)
    head = head_revision()
    if revision != head:
        return json_response(
            {"status": "unhealthy", "db": "connected", "migration": revision, "expected_migration": head}, 503
        )
    publisher = {name: report.state for name, report in (await services.publisher.health()).items()}
    status = "healthy" if all(state == "ok" for state in publisher.values()) else "degraded"
    # An operator sees here whether the server runs without a master key of its own (permitted only).
    auth = master_key_verdict(services.settings).auth_state()
    return json_response(
        {"status": status, "db": "connected", "migration": revision, "publisher": publisher, "auth": auth}
    )


@get(
    "/metrics",
    tags=["health"],
    summary="Prometheus metrics",
    include_in_schema=True,
    media_type=CONTENT_TYPE_LATEST,  # for the document; the response sets its own
)
async def metrics() -> Response[str]:
    # The exposition text comes encoded: sent as bytes, documented as the text it is (api/schemas.py).
    response: Response[Any] = Response(content=latest(), media_type=CONTENT_TYPE_LATEST)
    return response


route_handlers = [liveliness, liveness, readiness, metrics]
