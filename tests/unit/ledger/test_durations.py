"""`ledger.durations`: LiteLLM's duration strings, calendar months clamped to the month's end."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from spendledger.ledger.durations import Duration, DurationError, add_months, parse_duration

START = datetime(2026, 3, 15, 12, 30, 45, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "amount", "unit", "delta"),
    [
        ("30s", 30, "s", timedelta(seconds=30)),
        ("10m", 10, "m", timedelta(minutes=10)),
        ("24h", 24, "h", timedelta(hours=24)),
        ("7d", 7, "d", timedelta(days=7)),
        ("2w", 2, "w", timedelta(weeks=2)),
        ("1s", 1, "s", timedelta(seconds=1)),
        ("90d", 90, "d", timedelta(days=90)),
    ],
)
def test_fixed_units(text: str, amount: int, unit: str, delta: timedelta) -> None:
    duration = parse_duration(text)
    assert duration == Duration(text=text, amount=amount, unit=unit)
    assert duration.after(START) == START + delta


def test_month_unit_is_calendar_months() -> None:
    duration = parse_duration("1mo")
    assert duration.unit == "mo" and duration.amount == 1
    assert duration.after(START) == datetime(2026, 4, 15, 12, 30, 45, tzinfo=UTC)
    assert parse_duration("3mo").after(START) == datetime(2026, 6, 15, 12, 30, 45, tzinfo=UTC)
    assert parse_duration("12mo").after(START) == datetime(2027, 3, 15, 12, 30, 45, tzinfo=UTC)


def test_m_is_minutes_and_mo_is_months() -> None:
    assert parse_duration("1m").after(START) == START + timedelta(minutes=1)
    assert parse_duration("1mo").after(START) != START + timedelta(minutes=1)


def test_surrounding_and_inner_spaces_are_accepted_and_trimmed() -> None:
    duration = parse_duration(" 30 d ")
    assert duration.amount == 30 and duration.unit == "d"
    assert duration.text == "30 d"


@pytest.mark.parametrize(
    ("start", "months", "expected"),
    [
        (datetime(2026, 1, 31), 1, datetime(2026, 2, 28)),
        (datetime(2028, 1, 31), 1, datetime(2028, 2, 29)),  # leap year
        (datetime(2026, 1, 30), 1, datetime(2026, 2, 28)),
        (datetime(2026, 1, 29), 1, datetime(2026, 2, 28)),
        (datetime(2028, 1, 29), 1, datetime(2028, 2, 29)),
        (datetime(2026, 3, 31), 1, datetime(2026, 4, 30)),
        (datetime(2026, 5, 31), 1, datetime(2026, 6, 30)),
        (datetime(2026, 1, 31), 2, datetime(2026, 3, 31)),  # not compounded through Feb 28
        (datetime(2026, 8, 31), 6, datetime(2027, 2, 28)),
        (datetime(2026, 12, 31), 1, datetime(2027, 1, 31)),
        (datetime(2026, 12, 15), 13, datetime(2028, 1, 15)),
        (datetime(2026, 11, 30), 3, datetime(2027, 2, 28)),
        (datetime(2026, 6, 15), 0, datetime(2026, 6, 15)),
        (datetime(2026, 3, 31), -1, datetime(2026, 2, 28)),
        (datetime(2026, 1, 15), -1, datetime(2025, 12, 15)),
    ],
)
def test_add_months_clamps_to_the_last_day(start: datetime, months: int, expected: datetime) -> None:
    assert add_months(start, months) == expected


def test_add_months_keeps_time_and_timezone() -> None:
    tz = timezone(timedelta(hours=2))
    start = datetime(2026, 1, 31, 23, 59, 59, 999999, tzinfo=tz)
    result = parse_duration("1mo").after(start)
    assert result == datetime(2026, 2, 28, 23, 59, 59, 999999, tzinfo=tz)
    assert result.tzinfo is tz


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "30",
        "d",
        "0s",
        "0mo",
        "-1d",
        "+1d",
        "1.5h",
        "1y",
        "1D",
        "1 day",
        "1dd",
        "1mon",
        "1ms",
        "s30",
        "1d2h",
        "366001d",  # longer than 1000 years
        "11807mo",
        "9" * 5000 + "d",  # more digits than Python's int() reads: still a DurationError
        "\u0667d",  # an Arabic-Indic seven: ASCII digits only, as in SQL (sl_duration_parts)
        "7\u00a0d",  # a no-break space: ASCII white space only
        "7d\x1c",
    ],
)
def test_bad_strings_are_refused(text: str) -> None:
    with pytest.raises(DurationError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize("value", [None, 30, 1.5, b"1d"])
def test_non_strings_are_refused(value: object) -> None:
    with pytest.raises(DurationError):
        parse_duration(value)  # type: ignore[arg-type]


def test_duration_error_is_a_value_error() -> None:
    assert issubclass(DurationError, ValueError)
