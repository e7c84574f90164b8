"""Delivery: the outbox as an operator watches it — Lago and webhook rows waiting or dead, the
oldest wait, the webhook follower's lag, each publisher's health — and a retry of dead letters."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get, post
from litestar.response import Redirect

from spendledger.api.services import services_of
from spendledger.api.ui.forms import posted_form
from spendledger.api.ui.render import page
from spendledger.api.ui.sessions import current_session
from spendledger.ledger.lago_webhooks import rejections_status
from spendledger.ledger.outbox import outbox_status, retry_dead_letters
from spendledger.ledger.webhook_rows import webhook_follower_lag


@get("/delivery", include_in_schema=False)
async def delivery_tab(request: Request[Any, Any, Any]) -> Response[str]:
    session = await current_session(request)
    services = services_of(request)
    # Waiting rows only: delivered rows are kept and grow with every request (outbox_status).
    status = await outbox_status(services.pool, delivered=False)
    follower = await webhook_follower_lag(services.pool) if services.settings.webhook is not None else None
    rejections = await rejections_status(services.pool) if services.settings.lago is not None else None
    notice = None
    if (count := request.query_params.get("requeued")) is not None:
        notice = f"{count} dead letter(s) sent back to the queue."
    return page(
        "delivery.html", session, tab="delivery", sinks=status["sinks"], dead=status["dead_letters"],
        follower=follower, rejections=rejections, publisher=await services.publisher.health(),
        lago=services.settings.lago is not None, webhook=services.settings.webhook is not None, notice=notice,
    )


@post("/delivery/retry", include_in_schema=False, status_code=303)
async def retry_from_form(request: Request[Any, Any, Any]) -> Response[str]:
    _, fields = await posted_form(request)
    row = fields.get("id", "")
    ids = [int(row)] if row.isdigit() and len(row) < 19 else None
    sink = fields.get("sink") or None
    count = await retry_dead_letters(services_of(request).pool, ids, sink)
    return Redirect("/ui/delivery", query_params={"requeued": str(count)}, status_code=303)


route_handlers = [delivery_tab, retry_from_form]
