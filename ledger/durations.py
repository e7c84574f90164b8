"""LiteLLM durations: "30s", "10m", "24h", "7d", "2w", "1mo" (months are calendar months)."""

from __future__ import annotations

import re
from calendar import monthrange
from dataclasses import dataclass
from datetime import MAXYEAR, MINYEAR, UTC, datetime, timedelta
from typing import Final

# The grammar, as `sl_duration_parts` (ledger/sql/periods.sql) has it too: a whole number of
# seconds, minutes, hours, days, weeks or calendar months — ASCII digits, ASCII white space around
# and between — positive, and at most 1000 years long (a year counted as 366 days, a month as 31).
# tests/integration/sql/test_periods.py checks that the two accept the same strings and give them
# the same length: change both, or neither.
_SPACE: Final = r"[ \t\n\r\f\v]*"
_PATTERN: Final = re.compile(rf"{_SPACE}([0-9]+){_SPACE}(s|m|h|d|w|mo){_SPACE}")
_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_MONTH_AT_MOST: Final = 31 * 86400
MAX_SECONDS: Final = 1000 * 366 * 86400


class DurationError(ValueError):
    """A duration string that is not one of LiteLLM's forms."""


@dataclass(frozen=True, slots=True)
class Duration:
    text: str
    amount: int
    unit: str  # one of s, m, h, d, w, mo

    def after(self, start: datetime) -> datetime:
        """The instant one duration after `start`."""
        if self.unit == "mo":
            return add_months(start, self.amount)
        return start + timedelta(seconds=self.amount * _SECONDS[self.unit])


def parse_duration(text: str) -> Duration:
    match = _PATTERN.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise DurationError(
            f"invalid duration {_shown(text)}: use a number and a unit, e.g. '30s', '10m', '24h', '7d', '1mo'"
        )
    digits, unit = match.group(1).lstrip("0"), match.group(2)
    if not digits:  # a window of no length would hold no instant
        raise DurationError(f"invalid duration {_shown(text)}: must be positive")
    # More digits than MAX_SECONDS has are longer whatever the unit (and int() of thousands of
    # digits is refused by Python itself). Beyond the bound, datetime arithmetic overflows (year
    # 9999): refuse it here, with a message.
    if len(digits) > len(str(MAX_SECONDS)) or int(digits) * _SECONDS.get(unit, _MONTH_AT_MOST) > MAX_SECONDS:
        raise DurationError(f"invalid duration {_shown(text)}: longer than 1000 years")
    return Duration(text=text.strip(), amount=int(digits), unit=unit)


def _shown(text: object) -> str:
    """The refused value as a message quotes it: whole when short, cut when it is not."""
    shown = repr(text)
    return shown if len(shown) <= 40 else f"{shown[:37]}..."


def add_months(start: datetime, months: int) -> datetime:
    """`start` moved by whole calendar months, the day clamped to the month's end (Jan 31 + 1mo
    is the last day of February); OverflowError beyond the years a datetime holds."""
    month_index = start.month - 1 + months
    year = start.year + month_index // 12
    month = month_index % 12 + 1
    if not MINYEAR <= year <= MAXYEAR:
        raise OverflowError(f"year {year} is beyond the years a datetime holds")
    return start.replace(year=year, month=month, day=min(start.day, monthrange(year, month)[1]))


def utcnow() -> datetime:
    return datetime.now(UTC)
