"""The reconciliation export as files: CSV (money as exact decimal strings, a TOTAL line) and
Parquet (money as decimal128(38, 18), refused loudly if a value does not fit; the summary in the
file's metadata as exact strings)."""

from __future__ import annotations

import csv
import io
from decimal import Decimal
from typing import IO, Any, Final

from spendledger.projections.reconciliation import (
    MONEY_COLUMN,
    TOTAL_COLUMNS,
    TOTAL_LABEL,
    PrecisionError,
    ReconciliationReport,
)

PARQUET_PRECISION: Final = 38
PARQUET_SCALE: Final = 18
PARQUET_MEDIA_TYPE: Final = "application/vnd.apache.parquet"
METADATA_PREFIX: Final = "spendledger."


def money_text(amount: Decimal) -> str:
    """Exact decimal digits, never an exponent (str(Decimal('1E-7')) would be '1E-7')."""
    return format(amount, "f")


# A spreadsheet runs a cell that starts with one of these as a formula (`=HYPERLINK(…)` in a
# customer id would be a live link in the accountant's Excel): OWASP's CSV injection advice.
FORMULA_PREFIXES: Final = ("=", "+", "-", "@", "\t", "\r")


def text_cell(text: str) -> str:
    """Text as a spreadsheet shows it, never runs it: a leading formula character gets a `'` before it."""
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, Decimal):
        return money_text(value)  # numbers (a negative one too) stay numbers
    if isinstance(value, str):
        return text_cell(value)  # ids and names come from clients
    return str(value)


def write_csv(report: ReconciliationReport, stream: IO[str]) -> None:
    """Header, one line per row, and a final TOTAL line from the ledger's summary. A row with no
    id (usage without a customer, user or team) has an empty first cell; the TOTAL line is the one
    with an empty period. Text cells that start like a formula are escaped (`text_cell`)."""
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
