"""The reconciliation export, and the reconciliation of the ledger with what Lago acknowledged.

Both read the event log itself (`events` where type = 'UsageRecorded'), never a projection, and
the Lago outbox rows (`outbox` where sink = 'lago'; `dedupe_key` is the call id, unique per sink,
so a request joins at most one row).

`reconciliation_rows` groups the usage by customer, user or team (the id in the event) and by UTC
day or month of `ended_at`: requests, tokens, exact spend, and the state of each request's Lago
event — `delivered`, `pending`, `dead_lettered`, `unbillable` (no charge-by id, kept, never sent)
or `not_sent` (no Lago row at all: Lago was not configured when it was recorded). Its `summary` is
one SQL sum over the same events in the same snapshot, not the rows added up, and the rows are
checked against it: a report whose rows and totals disagree is never handed out.

`reconcile` lists every difference between the ledger and the Lago sink: billable usage with no
Lago row, Lago rows with no usage, Lago events still pending or dead, and delivered events whose
payload is not the usage's.

Money stays exact throughout: PostgreSQL numeric → Decimal → decimal strings (CSV) or
decimal128(38, 18) (Parquet, refused loudly if a value does not fit without losing a digit).
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import IO, Any, Final, Literal

import asyncpg
import msgspec

from ledger.money import MONEY_CONTEXT

By = Literal["customer", "user", "team"]
Period = Literal["day", "month"]

BY_FIELD: Final = {"customer": "customer_id", "user": "user_id", "team": "team_id"}
PERIODS: Final = ("day", "month")
# LAGO_API_CHARGE_BY → the UsageRecorded field that holds the charge-by id.
CHARGE_BY_FIELD: Final = {"end_user_id": "customer_id", "user_id": "user_id", "team_id": "team_id"}

COUNT_COLUMNS: Final = ("requests", "input_tokens", "output_tokens")
MONEY_COLUMN: Final = "spend"
STATE_COLUMNS: Final = ("delivered", "pending", "dead_lettered", "unbillable", "not_sent")
TOTAL_COLUMNS: Final = (*COUNT_COLUMNS, MONEY_COLUMN, *STATE_COLUMNS)
TOTAL_LABEL: Final = "TOTAL"

# Parquet money: 38 digits, 18 of them after the point.
PARQUET_PRECISION: Final = 38
PARQUET_SCALE: Final = 18
PARQUET_MEDIA_TYPE: Final = "application/vnd.apache.parquet"
METADATA_PREFIX: Final = "spendledger."


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


# The rows: each request with its Lago row, if any, grouped.
_ROWS_SQL: Final = f"""
with usage as (
    select e.data->>$1::text as grp,
           date_trunc($2::text, (e.data->>'ended_at')::timestamptz, 'UTC') as period_start,
           (e.data->>'input_tokens')::bigint as input_tokens,
           (e.data->>'output_tokens')::bigint as output_tokens,
           (e.data->>'cost')::numeric as cost,
           o.state as lago_state,
           o.id is not null as has_lago_row
    from events e
    left join outbox o on o.sink = 'lago' and o.dedupe_key = e.data->>'call_id'
    where {_usage_in_range("$3", "$4")}
)
select grp, (period_start at time zone 'UTC')::date as period_start,
       count(*) as requests,
       sum(input_tokens)::bigint as input_tokens,
       sum(output_tokens)::bigint as output_tokens,
       trim_scale(sum(cost)) as spend,
       count(*) filter (where lago_state = 'delivered') as delivered,
       count(*) filter (where lago_state = 'pending') as pending,
       count(*) filter (where lago_state = 'dead') as dead_lettered,
       count(*) filter (where lago_state = 'unbillable') as unbillable,
       count(*) filter (where not has_lago_row) as not_sent
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
           trim_scale(coalesce(sum((e.data->>'cost')::numeric), 0)) as spend
    from events e
    where {_usage_in_range("$1", "$2")}
), lago as (
    select count(*) filter (where o.state = 'delivered') as delivered,
           count(*) filter (where o.state = 'pending') as pending,
           count(*) filter (where o.state = 'dead') as dead_lettered,
           count(*) filter (where o.state = 'unbillable') as unbillable,
           count(*) filter (where o.id is null) as not_sent
    from events e
    left join outbox o on o.sink = 'lago' and o.dedupe_key = e.data->>'call_id'
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
async def _snapshot(
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
    totals[MONEY_COLUMN] = Decimal(money_text(totals[MONEY_COLUMN]))
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
    async with _snapshot(conn) as snapshot:
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


def money_text(amount: Decimal) -> str:
    """Exact decimal digits, never an exponent (str(Decimal('1E-7')) would be '1E-7')."""
    return format(amount, "f")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, Decimal):
        return money_text(value)
    return str(value)


def write_csv(report: ReconciliationReport, stream: IO[str]) -> None:
    """Header, one line per row, and a final TOTAL line from the ledger's summary. A row with no
    id (usage without a customer, user or team) has an empty first cell; the TOTAL line is the one
    with an empty period."""
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(report.columns)
    for row in report.rows:
        writer.writerow([_cell(row[column]) for column in report.columns])
    writer.writerow([TOTAL_LABEL, "", *(_cell(report.summary[column]) for column in TOTAL_COLUMNS)])


def csv_bytes(report: ReconciliationReport) -> bytes:
    buffer = io.StringIO()
    write_csv(report, buffer)
    return buffer.getvalue().encode()


# --- Parquet ---


def _fits_decimal128(amount: Decimal) -> bool:
    if not amount.is_finite():
        return False
    if amount == 0:
        return True
    _, digits, exponent = amount.as_tuple()
    assert isinstance(exponent, int)
    # Trailing zeros after the point are not digits lost.
    significant = list(digits)
    while exponent < 0 and len(significant) > 1 and significant[-1] == 0:
        significant.pop()
        exponent += 1
    if exponent < -PARQUET_SCALE:
        return False
    integer_digits = len(significant) + exponent
    return integer_digits <= PARQUET_PRECISION - PARQUET_SCALE


def _money_array(values: list[Decimal], column: str) -> Any:
    import pyarrow as pa

    for value in values:
        if not _fits_decimal128(value):
            raise PrecisionError(
                f"{column} {money_text(value)} does not fit Parquet decimal128({PARQUET_PRECISION}, "
                f"{PARQUET_SCALE}) without losing a digit: export it as CSV instead"
            )
    array = pa.array(values, type=pa.decimal128(PARQUET_PRECISION, PARQUET_SCALE))
    for value, stored in zip(values, array.to_pylist(), strict=True):
        if stored != value:  # Decimal equality is exact
            raise PrecisionError(f"{column} {money_text(value)} became {stored} in Parquet")
    return array


def parquet_metadata(report: ReconciliationReport) -> dict[str, str]:
    """The file's key-value metadata: what was asked, and the ledger's totals as exact strings."""
    metadata = {f"{METADATA_PREFIX}{k}": v for k, v in report.describe().items() if v is not None}
    for column in TOTAL_COLUMNS:
        metadata[f"{METADATA_PREFIX}summary.{column}"] = _cell(report.summary[column])
    return metadata


def parquet_table(report: ReconciliationReport) -> Any:
    """A pyarrow Table of the rows, money as decimal128(38, 18), the summary in its metadata."""
    import pyarrow as pa

    columns: dict[str, Any] = {
        report.group_column: pa.array([row[report.group_column] for row in report.rows], type=pa.string()),
        "period": pa.array([row["period"] for row in report.rows], type=pa.string()),
    }
    for column in TOTAL_COLUMNS:
        values = [row[column] for row in report.rows]
        columns[column] = (
            _money_array(values, column) if column == MONEY_COLUMN else pa.array(values, type=pa.int64())
        )
    table = pa.table(columns)
    # The summary too must fit the file's money type (a reader may load it as one).
    _money_array([report.summary[MONEY_COLUMN]], f"summary {MONEY_COLUMN}")
    return table.replace_schema_metadata(parquet_metadata(report))


def write_parquet(report: ReconciliationReport, sink: str | IO[bytes]) -> None:
    import pyarrow.parquet as pq

    pq.write_table(parquet_table(report), sink)


def parquet_bytes(report: ReconciliationReport) -> bytes:
    buffer = io.BytesIO()
    write_parquet(report, buffer)
    return buffer.getvalue()


# --- reconciliation with Lago ---

_decoder: Final = msgspec.json.Decoder(float_hook=Decimal)

# Lago payload field → how the ledger's UsageRecorded gives it (compared for delivered events).
_PROPERTIES: Final = {
    "input_tokens": "input_tokens",
    "output_tokens": "output_tokens",
    "total_tokens": "total_tokens",
    "model": "model_group",
    "response_cost": "cost",
}

_RECONCILE_SQL: Final = """
select e.data::text as data, o.id, o.dedupe_key, o.state, o.payload::text as payload, o.attempts,
       o.last_error
from (select data from events where type = 'UsageRecorded') e
full join (select * from outbox where sink = 'lago') o on o.dedupe_key = e.data->>'call_id'
where (o.id is null and e.data->>$1::text is not null)
   or e.data is null
   or o.state in ('pending', 'dead')
   or (o.state = 'unbillable' and e.data->>$1::text is not null)
   or (o.state = 'delivered' and (
          o.payload->'transaction_id' is distinct from e.data->'call_id'
       or nullif(o.payload->'external_subscription_id', 'null') is distinct from nullif(e.data->$1::text, 'null')
       or nullif(o.payload->'external_customer_id', 'null') is distinct from nullif(e.data->$1::text, 'null')
       or o.payload->'properties'->'input_tokens' is distinct from e.data->'input_tokens'
       or o.payload->'properties'->'output_tokens' is distinct from e.data->'output_tokens'
       or o.payload->'properties'->'total_tokens' is distinct from e.data->'total_tokens'
       or o.payload->'properties'->'model' is distinct from e.data->'model_group'
       or o.payload->'properties'->'response_cost' is distinct from e.data->'cost'))
order by coalesce(e.data->>'call_id', o.dedupe_key), o.id
"""


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON values: numbers by value (0.10 = 0.1), but a string is never a number."""
    numbers = (int, Decimal)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, numbers) and isinstance(b, numbers):
        return Decimal(a) == Decimal(b)
    return type(a) is type(b) and a == b


def _ledger_side(data: dict[str, Any], charge_field: str) -> dict[str, Any]:
    return {
        "external_subscription_id": data.get(charge_field),
        "input_tokens": data.get("input_tokens"),
        "output_tokens": data.get("output_tokens"),
        "total_tokens": data.get("total_tokens"),
        "model": data.get("model_group"),
        "response_cost": data.get("cost"),
        "ended_at": data.get("ended_at"),
    }


def _lago_side(record: asyncpg.Record, payload: dict[str, Any]) -> dict[str, Any]:
    properties = payload.get("properties") or {}
    side = {
        "state": record["state"],
        "transaction_id": payload.get("transaction_id"),
        "external_subscription_id": payload.get("external_subscription_id"),
        **{name: properties.get(name) for name in _PROPERTIES},
    }
    if record["state"] in ("pending", "dead"):
        side |= {"attempts": record["attempts"], "last_error": record["last_error"]}
    return side


def _payload_differences(
    data: dict[str, Any], payload: dict[str, Any], charge_field: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fields of a delivered Lago event that are not the usage's: (ledger's, Lago's)."""
    properties = payload.get("properties") or {}
    expected = {
        "transaction_id": (data.get("call_id"), payload.get("transaction_id")),
        "external_subscription_id": (data.get(charge_field), payload.get("external_subscription_id")),
        "external_customer_id": (data.get(charge_field), payload.get("external_customer_id")),
        **{name: (data.get(field), properties.get(name)) for name, field in _PROPERTIES.items()},
    }
    ledger: dict[str, Any] = {}
    lago: dict[str, Any] = {}
    for name, (ours, theirs) in expected.items():
        if not _same(ours, theirs):
            ledger[name], lago[name] = ours, theirs
    return ledger, lago


async def reconcile(
    conn: asyncpg.Connection | asyncpg.Pool, charge_by: str = "end_user_id"
) -> list[dict[str, Any]]:
    """Every difference between the ledger and the Lago sink, by call id:

    - `missing_in_lago`: usage with a charge-by id and no Lago row;
    - `unbillable_with_charge_by_id`: usage with a charge-by id whose Lago row was kept unbillable;
    - `not_in_ledger`: a Lago row with no UsageRecorded;
    - `pending` / `dead`: a Lago event not (yet) acknowledged, or rejected by Lago;
    - `payload_mismatch`: a delivered event whose payload is not the usage's (only the differing
      fields are listed, on both sides).

    `charge_by` is LAGO_API_CHARGE_BY (end_user_id, user_id or team_id).
    """
    if charge_by not in CHARGE_BY_FIELD:
        raise ValueError(f"charge_by must be one of {', '.join(CHARGE_BY_FIELD)}, got {charge_by!r}")
    charge_field = CHARGE_BY_FIELD[charge_by]
    async with _snapshot(conn) as snapshot:
        records = await snapshot.fetch(_RECONCILE_SQL, charge_field)
    differences: list[dict[str, Any]] = []
    for record in records:
        data: dict[str, Any] | None = _decoder.decode(record["data"]) if record["data"] is not None else None
        payload: dict[str, Any] = _decoder.decode(record["payload"]) if record["payload"] is not None else {}
        call_id = data["call_id"] if data is not None else record["dedupe_key"]
        ledger = _ledger_side(data, charge_field) if data is not None else None
        state = record["state"]
        if data is None:
            kind, lago = "not_in_ledger", _lago_side(record, payload)
        elif state is None:
            kind, lago = "missing_in_lago", None
        elif state in ("pending", "dead"):
            kind, lago = state, _lago_side(record, payload)
        elif state == "unbillable":
            kind, lago = "unbillable_with_charge_by_id", _lago_side(record, payload)
        else:
            ours, theirs = _payload_differences(data, payload, charge_field)
            if not ours:
                continue
            kind, ledger, lago = "payload_mismatch", ours, theirs
        differences.append({"call_id": call_id, "kind": kind, "ledger": ledger, "lago": lago})
    return differences
