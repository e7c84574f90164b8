"""Calendar budget periods at the SQL boundary (ledger/sql/periods.sql): `sl_budget_period_start` /
`sl_budget_period_end` against a reference written here with Python's `zoneinfo`, across DST changes.

The rule (docs/budgets.md, "Budget periods"), LiteLLM's: periods begin at midnight in the configured
zone — `Nd` every N days from the anchor's day, `7d` on Mondays, `30d` and `Nmo` on the 1st (every N
months from the anchor's month), seconds to hours fixed windows from the anchor's midnight. A day's
first instant is its midnight read with `fold=0` (in a gap: the offset before it, the instant the
clocks jump; where midnight occurs twice: the first). A budget anchored before `aligned_from` keeps
its anchored period (tests/integration/sql/test_periods.py) until the one holding `aligned_from`
ends, then has a short period to the next calendar boundary, then calendar periods.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from spendledger.ledger.durations import Duration, parse_duration
from tests.integration.sql.test_periods import window as anchored_window

# Zones whose clocks change at 02:00, by half an hour (Lord Howe), at midnight forward and back
# (Santiago, Beirut), with a midnight that occurs twice (Havana), and across the date line.
ZONES = (
    "UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "America/Santiago",
    "Asia/Beirut", "America/Havana", "Pacific/Chatham", "Asia/Kolkata",
)  # fmt: skip
MICROSECOND = timedelta(microseconds=1)

_SQL = """
select sl_budget_period_start($1, $2, $3, $4, $5) as start, sl_budget_period_end($1, $2, $3, $4, $5) as end_
"""


# --- the reference ------------------------------------------------------------------------------


def midnight(day: date, zone: ZoneInfo) -> datetime:
    """The first instant of `day` in `zone`."""
    return datetime(day.year, day.month, day.day, tzinfo=zone, fold=0).astimezone(UTC)


def months_on(day: date, months: int) -> date:
    index = day.year * 12 + day.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


def calendar(anchor: datetime, duration: Duration, at: datetime, zone: ZoneInfo) -> tuple[datetime, datetime]:
    a, t = anchor.astimezone(zone), at.astimezone(zone)
    seconds = None if duration.unit == "mo" else int((duration.after(datetime(2000, 1, 1, tzinfo=UTC))
                                                      - datetime(2000, 1, 1, tzinfo=UTC)).total_seconds())  # fmt: skip
    months = duration.amount if duration.unit == "mo" else (1 if seconds == 30 * 86400 else None)
    if months is not None:
        k = ((t.year * 12 + t.month) - (a.year * 12 + a.month)) // months * months
        first = months_on(date(a.year, a.month, 1), k)
        return midnight(first, zone), midnight(months_on(first, months), zone)
    assert seconds is not None
    if seconds == 7 * 86400:
        monday = t.date() - timedelta(days=t.weekday())
        return midnight(monday, zone), midnight(monday + timedelta(days=7), zone)
    if seconds % 86400 == 0:
        days = seconds // 86400
        first_day = a.date() + timedelta(days=(t.date() - a.date()).days // days * days)
        return midnight(first_day, zone), midnight(first_day + timedelta(days=days), zone)
    origin = midnight(a.date(), zone)
    length = timedelta(seconds=seconds)
    start = origin + (at - origin) // length * length
    return start, start + length


def budget_period(
    anchor: datetime, duration: Duration, at: datetime, zone: ZoneInfo, aligned_from: datetime
) -> tuple[datetime, datetime]:
    if anchor < aligned_from:
        _, _, anchored_end = anchored_window(anchor, duration, aligned_from)
        if at < anchored_end:
            return anchored_window(anchor, duration, at)[1:]
        start, end = calendar(anchor, duration, at, zone)
        return max(start, anchored_end), end
    return calendar(anchor, duration, at, zone)


# --- what to try --------------------------------------------------------------------------------

instants = st.datetimes(
    min_value=datetime(1990, 1, 1), max_value=datetime(2060, 12, 31), timezones=st.just(UTC)
)
durations = st.one_of(
    st.sampled_from(["1d", "7d", "30d", "1mo", "1w", "24h", "1h", "2d", "14d", "2w", "3mo", "12mo", "90m",
                     "30s", "36h", "5d"]),
    st.builds(lambda n, unit: f"{n}{unit}", st.integers(1, 400), st.sampled_from(["s", "m", "h", "d", "mo"])),
).map(parse_duration)  # fmt: skip


@st.composite
def near_a_change(draw: st.DrawFn, zone: ZoneInfo) -> datetime:
    """An instant within a day of one of the zone's clock changes (or of a midnight, in UTC)."""
    year = draw(st.integers(1995, 2045))
    day = datetime(year, 1, 1, tzinfo=UTC) + timedelta(days=draw(st.integers(0, 364)))
    probe = day
    for _ in range(366):  # walk forward day by day to the next change of offset
        if probe.astimezone(zone).utcoffset() != (probe + timedelta(days=1)).astimezone(zone).utcoffset():
            break
        probe += timedelta(days=1)
    moment: datetime = probe + timedelta(seconds=draw(st.integers(-86_400, 2 * 86_400)))
    return moment


# 800 examples: planted bugs (a doubled or skipped midnight read with fold=1, weeks from Sunday,
# fixed windows from the anchor instead of its midnight, Nd counted in UTC, the short period
# missing or the anchored one ending a microsecond late) each failed within 266 examples for each of
# 8 seeds (most within 100), generation alone; 800 is three times the worst case. (Was 2500: ~30 s more.)
SETTINGS = settings(max_examples=800, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip


@SETTINGS
@given(data=st.data(), anchor=instants, duration=durations, zone_name=st.sampled_from(ZONES))
async def test_calendar_periods_match_zoneinfo_across_clock_changes(
    zoned: dict[str, asyncpg.Connection], data: st.DataObject, anchor: datetime, duration: Duration, zone_name: str
) -> None:
    zone = ZoneInfo(zone_name)
    at = data.draw(st.one_of(instants, near_a_change(zone)), label="at")
    edge = data.draw(st.sampled_from(["at", "start", "just before the end"]), label="where")
    start, end = calendar(anchor, duration, at, zone)
    at = {"at": at, "start": start, "just before the end": end - MICROSECOND}[edge]
    start, end = calendar(anchor, duration, at, zone)
    assert start <= at < end
    row = await zoned["UTC"].fetchrow(_SQL, anchor, duration.text, at, zone_name, datetime(1900, 1, 1, tzinfo=UTC))
    assert row is not None
    assert (row["start"], row["end_"]) == (start, end), (anchor, duration.text, at, zone_name)


@SETTINGS
@given(data=st.data(), anchor=instants, duration=durations, zone_name=st.sampled_from(ZONES))
async def test_a_budget_older_than_the_calendar_keeps_its_period_then_aligns(
    zoned: dict[str, asyncpg.Connection], data: st.DataObject, anchor: datetime, duration: Duration, zone_name: str
) -> None:
    zone = ZoneInfo(zone_name)
    aligned_from = data.draw(st.one_of(instants, st.just(anchor + timedelta(days=40))), label="aligned_from")
    assume(anchor < aligned_from)
    try:  # the end of the anchored period that holds aligned_from, where the short period begins
        _, _, anchored_end = anchored_window(anchor, duration, aligned_from)
    except (OverflowError, ValueError):
        assume(False)
    at = data.draw(st.one_of(instants, st.sampled_from([aligned_from, aligned_from + timedelta(days=45),
                                                        anchored_end - MICROSECOND, anchored_end])), label="at")  # fmt: skip
    try:
        start, end = budget_period(anchor, duration, at, zone, aligned_from)
    except (OverflowError, ValueError):
        assume(False)
    assert start <= at < end
    row = await zoned["Europe/Berlin"].fetchrow(_SQL, anchor, duration.text, at, zone_name, aligned_from)
    assert row is not None
    assert (row["start"], row["end_"]) == (start, end), (anchor, duration.text, at, zone_name, aligned_from)


def local(text: str, zone: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).astimezone(UTC)


@pytest.mark.parametrize(
    ("duration", "at", "zone", "start", "end"),
    [
        ("1d", "2026-12-07 15:00", "UTC", "2026-12-07 00:00", "2026-12-08 00:00"),
        ("24h", "2026-12-07 15:00", "Asia/Kolkata", "2026-12-07 00:00", "2026-12-08 00:00"),
        ("7d", "2026-12-10 09:00", "UTC", "2026-12-07 00:00", "2026-12-14 00:00"),  # Monday to Monday
        ("1w", "2026-12-06 23:59", "Europe/Berlin", "2026-11-30 00:00", "2026-12-07 00:00"),
        ("30d", "2026-02-14 12:00", "America/New_York", "2026-02-01 00:00", "2026-03-01 00:00"),
        ("1mo", "2026-12-31 23:00", "UTC", "2026-12-01 00:00", "2027-01-01 00:00"),
        # the day the clocks go forward is 23 hours long, the day they go back 25
        ("1d", "2026-03-29 12:00", "Europe/Berlin", "2026-03-29 00:00", "2026-03-30 00:00"),
        ("1d", "2026-10-25 12:00", "Europe/Berlin", "2026-10-25 00:00", "2026-10-26 00:00"),
        ("1h", "2026-12-07 15:30", "Asia/Kolkata", "2026-12-07 15:00", "2026-12-07 16:00"),
    ],
)
async def test_litellm_s_boundaries(
    zoned: dict[str, asyncpg.Connection], duration: str, at: str, zone: str, start: str, end: str
) -> None:
    anchor = local("2026-01-15 10:17", zone)
    row = await zoned["UTC"].fetchrow(_SQL, anchor, duration, local(at, zone), zone, anchor)
    assert row is not None and (row["start"], row["end_"]) == (local(start, zone), local(end, zone))
    hours = (row["end_"] - row["start"]) / timedelta(hours=1)
    assert hours == {"2026-03-29 12:00": 23, "2026-10-25 12:00": 25}.get(at, hours)


async def test_a_midnight_that_occurs_twice_begins_the_day_the_first_time(
    zoned: dict[str, asyncpg.Connection],
) -> None:
    """Havana's clocks went back from 01:00 to 00:00 on 2023-11-05: 00:30 came twice, both on the 5th."""
    first_pass = datetime(2023, 11, 5, 4, 30, tzinfo=UTC)  # 00:30 at -04:00
    row = await zoned["UTC"].fetchrow(_SQL, first_pass, "1d", first_pass, "America/Havana", first_pass)
    assert row is not None and row["start"] == datetime(2023, 11, 5, 4, 0, tzinfo=UTC) <= first_pass


async def test_the_database_s_calendar_is_what_sl_period_start_uses(
    pool: asyncpg.Pool,
) -> None:
    anchor, at = datetime(2026, 12, 2, 10, tzinfo=UTC), datetime(2026, 12, 9, 3, tzinfo=UTC)
    await pool.execute("update budget_calendar set timezone = 'America/New_York', aligned_from = $1", anchor)
    start = await pool.fetchval("select sl_period_start($1, '1d', $2)", anchor, at)
    assert start == local("2026-12-08 00:00", "America/New_York")  # 03:00 UTC is the evening before there
    await pool.execute("update budget_calendar set timezone = 'UTC'")
    assert await pool.fetchval("select sl_period_start($1, '1d', $2)", anchor, at) == datetime(2026, 12, 9, tzinfo=UTC)
