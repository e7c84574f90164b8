"""Spend: daily spend by model group, by team and of the top customers over a chosen range, the
exact totals beside each chart, and the reconciliation export of the same range as CSV."""

from __future__ import annotations

from typing import Any, Final, Literal

from litestar import Request, Response, get

from spendledger.api.routes.export import export_filename
from spendledger.api.services import services_of
from spendledger.api.ui.charts import stacked_days
from spendledger.api.ui.forms import FormRefused
from spendledger.api.ui.ranges import day_range
from spendledger.api.ui.render import SECURITY_HEADERS, page
from spendledger.api.ui.sessions import current_session
from spendledger.projections.admin_views import daily_series
from spendledger.projections.export_files import csv_bytes
from spendledger.projections.reconciliation import ReconciliationError, reconciliation_rows

TOP: Final = 6  # series drawn per chart (ui.css has as many colours); the rest is "other"
# (daily_spend's scope, the heading, how many spenders the table lists)
SECTIONS: Final = (("model", "By model group", 20), ("team", "By team", 20), ("customer", "Top customers", 20))


@get("/spend", include_in_schema=False)
async def spend_tab(request: Request[Any, Any, Any], start: str | None = None, end: str | None = None) -> Response[str]:
    session = await current_session(request)
    pool = services_of(request).pool
    days = day_range(start, end)
    sections = []
    for scope, heading, listed in SECTIONS:
        series = await daily_series(pool, scope, days.start, days.end, drawn=TOP, listed=listed)
        sections.append({"scope": scope, "heading": heading, "chart": stacked_days(days.days, series.days),
                         "total": series.total, "rows": series.ranked})
    grand_total = sections[0]["total"]  # every request has a model group: the whole range's spend
    return page("spend.html", session, tab="spend", range=days, sections=sections, grand_total=grand_total)


@get("/spend/export.csv", include_in_schema=False)
async def spend_export(
    request: Request[Any, Any, Any],
    by: Literal["customer", "user", "team"] = "customer",
    start: str | None = None,
    end: str | None = None,
) -> Response[bytes]:
    await current_session(request)
    days = day_range(start, end)
    try:
        report = await reconciliation_rows(services_of(request).pool, by, "day", *days.instants)
    except ReconciliationError as exc:
        raise FormRefused(str(exc)) from exc
    filename = export_filename(report, "csv", days.start, days.end)
    return Response(
        content=csv_bytes(report),
        media_type="text/csv; charset=utf-8",
        headers={**SECURITY_HEADERS, "content-disposition": f'attachment; filename="{filename}"'},
    )


route_handlers = [spend_tab, spend_export]
