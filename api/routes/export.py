"""The reconciliation export over HTTP: `GET /export/reconciliation` as JSON, CSV or Parquet."""

from __future__ import annotations

import asyncio
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Literal

import msgspec
from litestar import Request, Response, get
from litestar.params import Parameter

from spendledger.api.auth import requires
from spendledger.api.errors import ApiError, bad_request
from spendledger.api.jsonio import json_response
from spendledger.api.roles import Permission
from spendledger.api.schemas import READ, documented, text
from spendledger.api.services import services_of
from spendledger.projections.export_files import PARQUET_MEDIA_TYPE, csv_bytes, parquet_bytes
from spendledger.projections.reconciliation import (
    PrecisionError,
    ReconciliationError,
    ReconciliationReport,
    reconciliation_rows,
)
from spendledger.projections.spend_logs import day_range

_FROM = Parameter(query="from", default=None, description="first UTC day, YYYY-MM-DD (inclusive)")
_TO = Parameter(query="to", default=None, description="last UTC day, YYYY-MM-DD (inclusive)")


class ReconciliationTotals(msgspec.Struct, kw_only=True):
    """Requests, tokens and exact spend, and how many of the requests Lago has, awaits or refused."""

    requests: int
    input_tokens: int
    output_tokens: int
    # Parts of the two totals, billed apart (docs/ledger.md, "How a request is priced").
    cached_input_tokens: int
    cache_creation_input_tokens: int
    input_audio_tokens: int
    input_image_tokens: int
    reasoning_tokens: int
    output_audio_tokens: int
    output_image_tokens: int
    spend: Decimal
    delivered: int
    pending: int
    dead_lettered: int
    unbillable: int
    not_sent: int
    rejected_by_lago: int  # of `delivered`: Lago then could not bill it (its events.errors webhook)


class ReconciliationRow(ReconciliationTotals, kw_only=True):
    """One group in one period: its id under `customer_id`, `user_id` or `team_id` (`by`)."""

    customer_id: str | None | msgspec.UnsetType = msgspec.UNSET
    user_id: str | None | msgspec.UnsetType = msgspec.UNSET
    team_id: str | None | msgspec.UnsetType = msgspec.UNSET
    period: str  # YYYY-MM-DD, or YYYY-MM by month


class Reconciliation(msgspec.Struct, kw_only=True):
    by: Literal["customer", "user", "team"]
    period: Literal["day", "month"]
    start: datetime | None  # the half-open range [start, end) of the requests' end; null: unbounded
    end: datetime | None
    rows: list[ReconciliationRow]
    summary: ReconciliationTotals  # the ledger's own sums over the same requests


_FILES = {
    "text/csv": text("format=csv: the rows, then a TOTAL row"),
    PARQUET_MEDIA_TYPE: text("format=parquet: the rows, money as decimal128(38, 18)", binary=True),
}


def _day(value: str | None, param: str) -> date | None:
    """A day named by its wire name when it is not one (Litestar would name the Python argument,
    and would read the text `null` as no day at all)."""
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise bad_request(
            f"{param} must be a day, YYYY-MM-DD, from 0001-01-01 to 9999-12-31; got {value[:40]!r}", param
        ) from None


def export_filename(
    report: ReconciliationReport, extension: str, first: date | None, last: date | None
) -> str:
    span = f"{first.isoformat() if first else 'start'}_{last.isoformat() if last else 'now'}"
    return f"reconciliation-{report.by}-{report.period}-{span}.{extension}"


@get(
    "/export/reconciliation",
    guards=[requires(Permission.READ_ALL)],
    tags=["export"],
    summary="Requests, tokens, exact spend and Lago delivery per customer/user/team and day/month",
    **documented(*READ, 422, also=_FILES),
)
async def get_reconciliation(
    request: Request[Any, Any, Any],
    by: Literal["customer", "user", "team"] = "customer",
    period: Literal["day", "month"] = "day",
    from_text: str | None = _FROM,
    to_text: str | None = _TO,
    format_: Literal["json", "csv", "parquet"] = Parameter(query="format", default="json"),
) -> Response[Reconciliation]:
    first, last = _day(from_text, "from"), _day(to_text, "to")
    if first and last and first > last:
        raise bad_request("'from' is after 'to'", "from")
    services = services_of(request)
    start, end = day_range(first, last)
    try:
        report = await reconciliation_rows(services.pool, by, period, start, end)
        if format_ == "json":
            return json_response(report.as_json())
        if format_ == "csv":
            content, media_type = csv_bytes(report), "text/csv; charset=utf-8"
        else:
            content, media_type = await asyncio.to_thread(parquet_bytes, report), PARQUET_MEDIA_TYPE
    except PrecisionError as exc:
        raise ApiError(422, str(exc), "invalid_request_error", "not_representable", "format") from exc
    except ReconciliationError as exc:
        raise ApiError(500, str(exc), "reconciliation_error") from exc
    filename = export_filename(report, format_, first, last)
    # CSV or Parquet bytes, where the annotation documents the JSON report (api/schemas.py).
    response: Response[Any] = Response(
        content=content,
        media_type=media_type,
        headers={"content-disposition": f'attachment; filename="{filename}"'},
    )
    return response


route_handlers = [get_reconciliation]
