"""The range of days a page shows: `start` and `end` (inclusive, UTC days) from its query, else the
last 30 days; a range the log cannot hold or longer than a year is refused with a clear message."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Final

import msgspec

from spendledger.api.ui.forms import FormRefused
from spendledger.projections.spend_logs import day_range as report_range

DEFAULT_DAYS: Final = 30
MAX_DAYS: Final = 366


class DayRange(msgspec.Struct, frozen=True, kw_only=True):
    start: date
    end: date

    @property
    def days(self) -> list[date]:
        return [self.start + timedelta(days=n) for n in range((self.end - self.start).days + 1)]

    @property
    def instants(self) -> tuple[datetime, datetime]:
        """[start, end) as instants, as every report reads its days (projections/spend_logs.py)."""
        start, end = report_range(self.start, self.end)
        assert start is not None and end is not None  # both days given, the last before date.max
        return start, end


def day_range(start: str | None, end: str | None, today: date | None = None) -> DayRange:
    today = today or datetime.now(UTC).date()
    try:
        last = date.fromisoformat(end) if end else today
        first = date.fromisoformat(start) if start else last - timedelta(days=DEFAULT_DAYS - 1)
    except ValueError:
        raise FormRefused("Dates are written YYYY-MM-DD") from None
    if first > last:
        raise FormRefused("The range's start is after its end")
    if (last - first).days >= MAX_DAYS or last >= date.max - timedelta(days=1):
        raise FormRefused(f"A range is at most {MAX_DAYS} days")
    return DayRange(start=first, end=last)
