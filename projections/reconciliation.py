"""The reconciliation export, and the reconciliation of the ledger with what Lago acknowledged.

Both read the event log itself (`events` where type = 'UsageRecorded'), never a projection, and
the Lago outbox rows (`outbox` where sink = 'lago'; `dedupe_key` is the call id, unique per sink,
so a request joins at most one row).

`reconciliation_rows` groups the usage by customer, user or team (the id in the event) and by UTC
day or month of `ended_at`: requests, tokens, exact spend, and the state of each request's Lago
event — `delivered`, `pending`, `dead_lettered`, `unbillable` (no charge-by id, kept, never sent)
or `not_sent` (no Lago row at all: Lago was not configured when it was recorded) — and how many of
them Lago then rejected (`rejected_by_lago`: its events.errors webhook, a `LagoEventRejected`). Its `summary` is
one SQL sum over the same events in the same snapshot, not the rows added up, and the rows are
checked against it: a report whose rows and totals disagree is never handed out.

`reconcile` (projections/lago_reconcile.py) lists every difference between the ledger and the
Lago sink; projections/export_files.py writes the report as CSV or Parquet. Money stays exact
throughout: PostgreSQL numeric → Decimal → decimal strings or decimal128(38, 18).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Final, Literal

import asyncpg

from spendledger.ledger.money import MONEY_CONTEXT
from spendledger.ledger.tokens import PART_FIELDS

By = Literal["customer", "user", "team"]
Period = Literal["day", "month"]

BY_FIELD: Final = {"customer": "customer_id", "user": "user_id", "team": "team_id"}
PERIODS: Final = ("day", "month")
# LAGO_API_CHARGE_BY → the UsageRecorded field that holds the charge-by id.
CHARGE_BY_FIELD: Final = {"end_user_id": "customer_id", "user_id": "user_id", "team_id": "team_id"}

# The parts of the token totals billed apart (cached input, …; ledger/tokens.py) follow them.
COUNT_COLUMNS: Final = ("requests", "input_tokens", "output_tokens", *PART_FIELDS)
MONEY_COLUMN: Final = "spend"
# The first five partition the requests; `rejected_by_lago` counts those Lago accepted and then
# could not bill (its events.errors webhook: LagoEventRejected), a part of `delivered`.
STATE_COLUMNS: Final = ("delivered", "pending", "dead_lettered", "unbillable", "not_sent", "rejected_by_lago")
TOTAL_COLUMNS: Final = (*COUNT_COLUMNS, MONEY_COLUMN, *STATE_COLUMNS)
TOTAL_LABEL: Final = "TOTAL"

# Parquet money: 38 digits, 18 of them after the point.


class ReconciliationError(RuntimeError):
    """The report cannot be produced exactly (rows disagree with the totals, or a format would
    lose a digit): refused rather than handed out wrong."""


class PrecisionError(ReconciliationError):
    """A value that the asked format cannot hold exactly (Parquet decimal128(38, 18))."""


# --- the export ---


def _usage_in_range(start: str, end: str) -> str:
    """The UsageRecorded events that ended in [start, end) (SQL parameters; null: unbounded)."""
    return (
        f"e.type = 'UsageRecorded' "
        f"and ({start}::timestamptz is null or (e.data->>'ended_at')::timestamptz >= {start}) "
        f"and ({end}::timestamptz is null or (e.data->>'ended_at')::timestamptz < {end})"
    )


# The parts (PART_FIELDS, in its order): 0 in events written before they were recorded.
_PARTS_READ: Final = """
           coalesce((e.data->>'cached_input_tokens')::bigint, 0) as cached_input_tokens,
           coalesce((e.data->>'cache_creation_input_tokens')::bigint, 0) as cache_creation_input_tokens,
           coalesce((e.data->>'input_audio_tokens')::bigint, 0) as input_audio_tokens,
           coalesce((e.data->>'input_image_tokens')::bigint, 0) as input_image_tokens,
           coalesce((e.data->>'reasoning_tokens')::bigint, 0) as reasoning_tokens,
           coalesce((e.data->>'output_audio_tokens')::bigint, 0) as output_audio_tokens,
           coalesce((e.data->>'output_image_tokens')::bigint, 0) as output_image_tokens,"""
_PARTS_SUMMED: Final = " ".join(f"sum({f})::bigint as {f}," for f in PART_FIELDS)
_PARTS_TOTALLED: Final = """
           coalesce(sum((e.data->>'cached_input_tokens')::bigint), 0)::bigint as cached_input_tokens,
           coalesce(sum((e.data->>'cache_creation_input_tokens')::bigint), 0)::bigint as cache_creation_input_tokens,
           coalesce(sum((e.data->>'input_audio_tokens')::bigint), 0)::bigint as input_audio_tokens,
           coalesce(sum((e.data->>'input_image_tokens')::bigint), 0)::bigint as input_image_tokens,
           coalesce(sum((e.data->>'reasoning_tokens')::bigint), 0)::bigint as reasoning_tokens,
           coalesce(sum((e.data->>'output_audio_tokens')::bigint), 0)::bigint as output_audio_tokens,
           coalesce(sum((e.data->>'output_image_tokens')::bigint), 0)::bigint as output_image_tokens,"""

# The call ids Lago rejected after accepting them (few: joined by hash, not looked up per request).
_REJECTED: Final = """
    left join (select distinct data->>'transaction_id' as call_id from events
               where type = 'LagoEventRejected') r on r.call_id = e.data->>'call_id'"""

# The rows: each request with its Lago row, if any, grouped.
_ROWS_SQL: Final = f"""
with usage as (
    select e.data->>$1::text as grp,
           date_trunc($2::text, (e.data->>'ended_at')::timestamptz, 'UTC') as period_start,
           (e.data->>'input_tokens')::bigint as input_tokens,
           (e.data->>'output_tokens')::bigint as output_tokens,
           {_PARTS_READ}
           (e.data->>'cost')::numeric as cost,
           o.state as lago_state,
           o.id is not null as has_lago_row,
           r.call_id is not null as rejected
    from events e
    left join outbox o on o.sink = 'lago' and o.dedupe_key = e.data->>'call_id'{_REJECTED}
    where {_usage_in_range("$3", "$4")}
)
select grp, (period_start at time zone 'UTC')::date as period_start,
       count(*) as requests,
       sum(input_tokens)::bigint as input_tokens,
       sum(output_tokens)::bigint as output_tokens,
       {_PARTS_SUMMED}
       trim_scale(sum(cost)) as spend,
       count(*) filter (where lago_state = 'delivered') as delivered,
       count(*) filter (where lago_state = 'pending') as pending,
       count(*) filter (where lago_state = 'dead') as dead_lettered,
       count(*) filter (where lago_state = 'unbillable') as unbillable,
       count(*) filter (where not has_lago_row) as not_sent,
       count(*) filter (where rejected) as rejected_by_lago
from usage
group by grp, period_start
order by period_start, grp nulls last
"""

# The summary: the ledger's sums straight from the events (no join, no grouping), and each Lago
# state counted over the same events.
_SUMMARY_SQL: Final = f"""
with ledger as (
    select count(*) as requests,
           coalesce(sum((e.data->>'input_tokens')::bigint), 0)::bigint as input_tokens,
           coalesce(sum((e.data->>'output_tokens')::bigint), 0)::bigint as output_tokens,
           {_PARTS_TOTALLED}
           trim_scale(coalesce(sum((e.data->>'cost')::numeric), 0)) as spend
    from events e
    where {_usage_in_range("$1", "$2")}
), lago as (
    select count(*) filter (where o.state = 'delivered') as delivered,
           count(*) filter (where o.state = 'pending') as pending,
           count(*) filter (where o.state = 'dead') as dead_lettered,
           count(*) filter (where o.state = 'unbillable') as unbillable,
           count(*) filter (where o.id is null) as not_sent,
           count(*) filter (where r.call_id is not null) as rejected_by_lago
    from events e
    left join outbox o on o.sink = 'lago' and o.dedupe_key = e.data->>'call_id'{_REJECTED}
    where {_usage_in_range("$1", "$2")}
)
select * from ledger, lago
"""


@dataclass(frozen=True)
class ReconciliationReport:
    """Rows per group and period, and the ledger's totals over the same events."""

    by: str
    period: str
    start: datetime | None
    end: datetime | None
    rows: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def group_column(self) -> str:
        return BY_FIELD[self.by]

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.group_column, "period", *TOTAL_COLUMNS)

    def describe(self) -> dict[str, str | None]:
        return {
            "by": self.by,
            "period": self.period,
            # The half-open range [start, end) of `ended_at`; None: unbounded.
            "start": self.start.isoformat() if self.start else None,
            "end": self.end.isoformat() if self.end else None,
        }

    def as_json(self) -> dict[str, Any]:
        return {**self.describe(), "rows": self.rows, "summary": self.summary}


@asynccontextmanager
async def read_snapshot(
    conn: asyncpg.Connection | asyncpg.Pool,
) -> AsyncIterator[asyncpg.Connection | asyncpg.pool.PoolConnectionProxy[Any]]:
    """One read-only REPEATABLE READ snapshot, so queries made one after the other see the same
    ledger while requests keep being recorded."""
    if isinstance(conn, asyncpg.Pool):
        async with (
            conn.acquire() as acquired,
            acquired.transaction(isolation="repeatable_read", readonly=True),
        ):
            yield acquired
    elif conn.is_in_transaction():
        yield conn  # the caller's transaction is the snapshot
    else:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            yield conn


def period_label(period_start: date, period: str) -> str:
    return period_start.isoformat() if period == "day" else period_start.strftime("%Y-%m")


def _totals(record: asyncpg.Record) -> dict[str, Any]:
    totals = {column: record[column] for column in TOTAL_COLUMNS}
    # asyncpg gives 10^20 as Decimal('1E+20'): the same value, written out in plain digits.
    totals[MONEY_COLUMN] = Decimal(format(totals[MONEY_COLUMN], "f"))
    return totals


async def reconciliation_rows(
    conn: asyncpg.Connection | asyncpg.Pool,
    by: str = "customer",
    period: str = "day",
    start: datetime | None = None,
    end: datetime | None = None,
) -> ReconciliationReport:
    """Usage per `by` id and UTC `period` of `ended_at` in [start, end), with Lago delivery counts,
    and the summary computed separately by SQL; raises ReconciliationError if they disagree."""
    if by not in BY_FIELD:
        raise ValueError(f"by must be one of {', '.join(BY_FIELD)}, got {by!r}")
    if period not in PERIODS:
        raise ValueError(f"period must be one of {', '.join(PERIODS)}, got {period!r}")
    async with read_snapshot(conn) as snapshot:
        records = await snapshot.fetch(_ROWS_SQL, BY_FIELD[by], period, start, end)
        summary_record = await snapshot.fetchrow(_SUMMARY_SQL, start, end)
    assert summary_record is not None
    group_column = BY_FIELD[by]
    rows = [
        {group_column: r["grp"], "period": period_label(r["period_start"], period), **_totals(r)}
        for r in records
    ]
    report = ReconciliationReport(
        by=by, period=period, start=start, end=end, rows=rows, summary=_totals(summary_record)
    )
    check_totals(report)
    return report


def check_totals(report: ReconciliationReport) -> None:
    """The rows, added up exactly, must give the ledger's totals to the last digit."""
    added: dict[str, Any] = {column: 0 for column in TOTAL_COLUMNS}
    added[MONEY_COLUMN] = Decimal(0)
    for row in report.rows:
        for column in TOTAL_COLUMNS:
            added[column] = (
                MONEY_CONTEXT.add(added[column], row[column])
                if column == MONEY_COLUMN
                else added[column] + row[column]
            )
    wrong = {
        column: (added[column], report.summary[column])
        for column in TOTAL_COLUMNS
        if added[column] != report.summary[column]
    }
    if wrong:
        detail = ", ".join(
            f"{column}: rows add up to {a}, ledger has {b}" for column, (a, b) in wrong.items()
        )
        raise ReconciliationError(f"reconciliation rows disagree with the ledger's totals: {detail}")


# --- CSV ---
