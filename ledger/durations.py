"""LiteLLM durations: "30s", "10m", "24h", "7d", "2w", "1mo" (months are calendar months)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

_PATTERN: Final = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w|mo)\s*$")
_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


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
    match = _PATTERN.match(text) if isinstance(text, str) else None
    if match is None:
        raise DurationError(
            f"invalid duration {text!r}: use a number and a unit, e.g. '30s', '10m', '24h', '7d', '1mo'"
        )
    amount = int(match.group(1))
    if amount <= 0:
        raise DurationError(f"invalid duration {text!r}: must be positive")
    if amount * _SECONDS.get(match.group(2), 31 * 86400) > 1000 * 366 * 86400:
        # Beyond this, datetime arithmetic overflows (year 9999): refuse it here, with a message.
        raise DurationError(f"invalid duration {text!r}: longer than 1000 years")
    return Duration(text=text.strip(), amount=amount, unit=match.group(2))


def add_months(start: datetime, months: int) -> datetime:
    month_index = start.month - 1 + months
    year = start.year + month_index // 12
    month = month_index % 12 + 1
    # Clamp the day: Jan 31 + 1mo is the last day of February.
    for day in (start.day, 30, 29, 28):
        try:
            return start.replace(year=year, month=month, day=min(start.day, day))
        except ValueError:
            continue
    raise AssertionError("unreachable: every month has 28 days")


def utcnow() -> datetime:
    return datetime.now(UTC)
