"""Anchored budget periods at the SQL boundary (ledger/sql/periods.sql): `sl_anchored_period_start`
/ `sl_anchored_period_end` — the rule every budget followed before calendar periods, and a budget
created before them follows until its period then current ends — against Python's calendar
arithmetic, and the duration grammar that `sl_duration_parts` and `ledger.durations.parse_duration`
must both speak (tests/integration/sql/test_calendar_periods.py tests the calendar rule).

The rule (docs/budgets.md, "Budget periods"): windows are counted from the scope's anchor — window
n starts at anchor + n durations, never compounded from the window before — calendar months in UTC
with the day clamped (Jan 31 → Feb 28 → Mar 31), seconds to weeks as fixed windows. Python has no
period function of its own, so the reference is written here from that rule with
`ledger.durations.add_months` (the clamp) and `Duration`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from spendledger.ledger.durations import MAX_SECONDS, Duration, DurationError, add_months, parse_duration
from tests.integration.sql.conftest import ZONES

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)
# 1000 examples: planted bugs (months compounded from the window before, months as 30 days, a
# boundary counted in the window before it, windows before the anchor counted by truncation) each
# failed within 301 examples for each of 8 seeds (most within 100), generation alone; 1000 is over
# three times the worst case. (Was 3000: ~15 s more.)
SETTINGS = settings(
    max_examples=1000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

_PERIOD_SQL = """
select sl_anchored_period_start($1, $2, $3) as start, sl_anchored_period_end($1, $2, $3) as end_,
       sl_anchored_period_start($1, $2, sl_anchored_period_end($1, $2, $3)) as next_start,
       sl_anchored_period_end($1, $2, sl_anchored_period_start($1, $2, $3) - interval '1 microsecond') as previous_end
"""


# --- the reference ------------------------------------------------------------------------------


def boundary(anchor: datetime, duration: Duration, n: int) -> datetime:
    """Where window n starts: anchor + n durations, counted from the anchor."""
    if duration.unit == "mo":
        return add_months(anchor, n * duration.amount)
    return anchor + n * (duration.after(EPOCH) - EPOCH)


def window(anchor: datetime, duration: Duration, at: datetime) -> tuple[int, datetime, datetime]:
    """The window containing `at`: (n, its start, its end), the n with boundary(n) <= at < boundary(n + 1)."""
    if duration.unit == "mo":
        n = ((at.year - anchor.year) * 12 + at.month - anchor.month) // duration.amount
    else:
        n = (at - anchor) // (duration.after(EPOCH) - EPOCH)
    # boundary(n) is increasing in n: step to the one window that holds `at` (months clamp the day,
    # so the month count can be one window off)
    while boundary(anchor, duration, n) > at:
        n -= 1
    while boundary(anchor, duration, n + 1) <= at:
        n += 1
    return n, boundary(anchor, duration, n), boundary(anchor, duration, n + 1)


# --- what to try --------------------------------------------------------------------------------


@st.composite
def anchors(draw: st.DrawFn) -> datetime:
    """Instants from 1970 to 2200, mostly on the days that clamp (28th-31st, Feb 29 of leap years)."""
    year = draw(
        st.one_of(st.sampled_from([1970, 2000, 2023, 2024, 2025, 2028, 2100]), st.integers(1970, 2200))
    )
    month = draw(st.integers(1, 12))
    last = (datetime(year + month // 12, month % 12 + 1, 1) - timedelta(days=1)).day
    day = min(draw(st.one_of(st.sampled_from([28, 29, 30, 31]), st.integers(1, 31))), last)
    moment = draw(st.one_of(
        st.just((0, 0, 0, 0)),
        st.tuples(st.integers(0, 23), st.integers(0, 59), st.integers(0, 59), st.integers(0, 999_999)),
    ))  # fmt: skip
    return datetime(year, month, day, *moment, tzinfo=UTC)


durations = st.one_of(
    st.builds(
        lambda n: f"{n}mo", st.one_of(st.sampled_from([1, 2, 3, 6, 12, 13, 24]), st.integers(1, 11_806))
    ),
    st.builds(
        lambda n: f"{n}d", st.one_of(st.sampled_from([1, 7, 28, 29, 30, 31, 365]), st.integers(1, 366_000))
    ),
    st.builds(
        lambda n: f"{n}s", st.one_of(st.sampled_from([1, 30, 59, 86_399]), st.integers(1, 31_622_400_000))
    ),
    st.builds(lambda n, unit: f"{n}{unit}", st.integers(1, 1000), st.sampled_from(["m", "h", "w"])),
).map(parse_duration)


@st.composite
def instants(draw: st.DrawFn, anchor: datetime, duration: Duration) -> datetime:
    """Around a window boundary (on it, a microsecond either side, inside it), up to a few hundred
    windows (or a few thousand years) after the anchor, and some before it."""
    length = timedelta(days=31 * duration.amount) if duration.unit == "mo" else duration.after(EPOCH) - EPOCH
    reach = max(3, min(400, timedelta(days=3000 * 365) // length))
    n = draw(st.one_of(st.integers(-3, 3), st.integers(-reach // 10, reach)))
    try:
        edge = boundary(anchor, duration, n)
        following = boundary(anchor, duration, n + 1)
    except (OverflowError, ValueError):  # before year 1 or after 9999: Python's datetime cannot say
        assume(False)
    inside = edge + (following - edge) * draw(st.floats(0, 1, exclude_max=True))
    at: datetime = draw(st.sampled_from([edge, edge - MICROSECOND, edge + MICROSECOND, inside]))
    return at


# --- periods ------------------------------------------------------------------------------------


@SETTINGS
@given(data=st.data(), anchor=anchors(), duration=durations, zone=st.sampled_from(ZONES))
async def test_each_period_holds_at_and_ends_where_the_next_begins(
    zoned: dict[str, asyncpg.Connection], data: st.DataObject, anchor: datetime, duration: Duration, zone: str
) -> None:
    at = data.draw(instants(anchor, duration), label="at")
    try:
        n, start, end = window(anchor, duration, at)
    except (OverflowError, ValueError):  # its neighbours' years are beyond Python's datetime
        assume(False)
    row = await zoned[zone].fetchrow(_PERIOD_SQL, anchor, duration.text, at)
    assert row is not None
    assert (row["start"], row["end_"]) == (start, end), (
        f"window {n} from {anchor} of {duration.text} at {at} ({zone})"
    )
    assert row["start"] <= at < row["end_"]
    assert row["next_start"] == row["end_"]  # the end of one period is the start of the next
    assert row["previous_end"] == row["start"], (anchor, duration.text, at, zone, dict(row))


@pytest.mark.parametrize(
    ("anchor", "duration", "at", "start", "end"),
    [
        # calendar months, the day clamped but never compounded: Jan 31 → Feb 28 → Mar 31
        ("2025-01-31", "1mo", "2025-02-28", "2025-02-28", "2025-03-31"),
        ("2025-01-31", "1mo", "2025-02-27 23:59:59.999999", "2025-01-31", "2025-02-28"),
        ("2025-01-31", "1mo", "2025-03-30", "2025-02-28", "2025-03-31"),
        ("2025-01-31", "1mo", "2025-04-30", "2025-04-30", "2025-05-31"),
        ("2024-01-31", "1mo", "2024-02-29", "2024-02-29", "2024-03-31"),  # leap year
        ("2024-02-29", "12mo", "2025-03-01", "2025-02-28", "2026-02-28"),
        ("2024-02-29", "12mo", "2028-02-29", "2028-02-29", "2029-02-28"),
        ("2025-08-31", "6mo", "2026-03-01", "2026-02-28", "2026-08-31"),
        ("2025-03-30", "1mo", "2025-02-27", "2025-01-30", "2025-02-28"),  # before the anchor
        ("2025-03-30", "1mo", "2025-02-28", "2025-02-28", "2025-03-30"),
        # 02:00 UTC on Jan 31 is still Jan 30 in New York: months are counted in UTC all the same
        ("2024-01-31 02:00", "1mo", "2024-03-01", "2024-02-29 02:00", "2024-03-31 02:00"),
        ("2025-03-31 01:30", "1mo", "2025-10-31", "2025-09-30 01:30", "2025-10-31 01:30"),
        # fixed windows
        ("2025-01-31 10:00", "1d", "2025-02-01 09:59:59", "2025-01-31 10:00", "2025-02-01 10:00"),
        ("2025-01-31 10:00", "1d", "2025-02-01 10:00", "2025-02-01 10:00", "2025-02-02 10:00"),
        ("2025-01-31 10:00", "30s", "2025-01-31 10:01:15", "2025-01-31 10:01:00", "2025-01-31 10:01:30"),
        ("2025-03-29", "1w", "2025-03-31", "2025-03-29", "2025-04-05"),
    ],
)
async def test_periods_on_the_clamping_days(
    zoned: dict[str, asyncpg.Connection], anchor: str, duration: str, at: str, start: str, end: str
) -> None:
    def utc(text: str) -> datetime:
        return datetime.fromisoformat(text).replace(tzinfo=UTC)

    for zone, conn in zoned.items():
        row = await conn.fetchrow(_PERIOD_SQL, utc(anchor), duration, utc(at))
        assert row is not None and (row["start"], row["end_"]) == (utc(start), utc(end)), zone
    assert window(utc(anchor), parse_duration(duration), utc(at))[1:] == (utc(start), utc(end))


async def test_without_a_duration_there_is_one_period_for_ever(zoned: dict[str, asyncpg.Connection]) -> None:
    now = datetime.now(UTC)
    row = await zoned["UTC"].fetchrow(_PERIOD_SQL, now, None, now)
    assert row is not None and (row["start"], row["end_"]) == (EPOCH, None)


# --- the duration grammar, in Python and in SQL -------------------------------------------------

SPACE = st.sampled_from([" ", "\t", "\n", "\r", "\f", "\v"])
UNITS = ["s", "m", "h", "d", "w", "mo"]
# Each unit's largest amount inside 1000 years (a year of 366 days, a month of 31).
LIMITS = {unit: MAX_SECONDS // seconds for unit, seconds in
          {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "mo": 31 * 86400}.items()}  # fmt: skip

well_formed = st.builds(
    lambda before, zeros, amount, between, unit, after: f"{before}{zeros}{amount}{between}{unit}{after}",
    st.text(SPACE, max_size=2),
    st.sampled_from(["", "0", "000"]),
    st.one_of(
        st.integers(0, 100),
        st.integers(0, 10**30),
        st.sampled_from([v + d for v in LIMITS.values() for d in (-1, 0, 1)]),
        st.sampled_from([2**31 - 1, 2**31, 2**63 - 1, 2**63, 10**19, 99_999_999_999_999_999_999]),
    ),
    st.text(SPACE, max_size=2),
    st.sampled_from(UNITS),
    st.text(SPACE, max_size=2),
)
# Near misses: the grammar's own characters and what looks like them (upper case, signs, points,
# Unicode digits and spaces, control characters), in any order.
near_misses = st.lists(
    st.sampled_from(
        [*"0123456789smhdwo SMHDWOy+-.,_e\t\n\x1c\x85", "\u00a0", "\u2003", "\u0667", "\uff17", "mo"]
    ),
    max_size=12,
).map("".join)
DURATION_TEXTS = st.one_of(well_formed, near_misses, st.text(max_size=8)).filter(lambda t: "\x00" not in t)


def python_parts(text: str) -> tuple[int | None, int | None] | None:
    """(seconds, months) as Python reads `text`; None where it refuses it."""
    try:
        duration = parse_duration(text)
    except DurationError:
        return None
    if duration.unit == "mo":
        return None, duration.amount
    return (duration.after(EPOCH) - EPOCH) // timedelta(seconds=1), None


async def sql_parts(conn: asyncpg.Connection, text: str) -> tuple[int | None, int | None] | None:
    """(seconds, months) as `sl_duration_parts` reads `text`; None where it refuses it — with
    22023 invalid_parameter_value, never another error (an overflow, a division by zero)."""
    try:
        row = await conn.fetchrow("select * from sl_duration_parts($1)", text)
    except asyncpg.InvalidParameterValueError:
        return None
    assert row is not None
    return row["seconds"], row["months"]


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(text=DURATION_TEXTS)
@example(text="0s")
@example(text="0mo")
@example(text="99999999999999999999d")
@example(text="100000000000s")
@example(text="9" * 5000 + "d")
@example(text="\t7d")
@example(text="7d\n")
@example(text="7\td")
@example(text="\u0667d")  # an Arabic-Indic seven
@example(text="7\u00a0d")
async def test_python_and_sql_accept_the_same_durations_with_the_same_length(
    zoned: dict[str, asyncpg.Connection], text: str
) -> None:
    assert await sql_parts(zoned["UTC"], text) == python_parts(text), repr(text)


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("30s", (30, None)),
        (" 30 d ", (30 * 86400, None)),
        ("007d", (7 * 86400, None)),
        ("10m", (600, None)),
        ("1mo", (None, 1)),
        ("11806mo", (None, 11_806)),  # 1000 years, a month counted as 31 days
        ("366000d", (31_622_400_000, None)),
        ("0s", None),  # a window of no length holds no instant
        ("000mo", None),
        ("11807mo", None),
        ("366001d", None),
        ("99999999999999999999d", None),
        ("1D", None),
        ("\u0667d", None),
        ("7\u00a0d", None),
    ],
)
async def test_the_grammar_by_example(
    zoned: dict[str, asyncpg.Connection], text: str, parts: tuple[int | None, int | None] | None
) -> None:
    assert await sql_parts(zoned["UTC"], text) == parts
    assert python_parts(text) == parts
