"""Charts as SVG geometry, computed here and drawn by the templates (no script, no chart library).

Only the drawing uses floats (a bar's height in pixels); every amount a chart shows — its bars'
titles, its legend, the table beside it — is the ledger's Decimal, shown exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date
from decimal import Decimal
from typing import Final

import msgspec

from spendledger.api.ui.render import money

WIDTH: Final = 720
HEIGHT: Final = 200
COLOURS: Final = 7  # classes c0 … c6 in ui.css; a chart shows at most this many series


class Bar(msgspec.Struct, frozen=True, kw_only=True):
    x: float
    y: float
    width: float
    height: float
    colour: int
    title: str


class Chart(msgspec.Struct, frozen=True, kw_only=True):
    bars: list[Bar]
    legend: list[tuple[int, str, str]]  # (colour, series, its exact total)
    first_day: str
    last_day: str
    peak: str  # the tallest day's exact total
    width: int = WIDTH
    height: int = HEIGHT

    @property
    def empty(self) -> bool:
        return not self.bars


def stacked_days(days: Sequence[date], series: Mapping[str, Mapping[date, Decimal]]) -> Chart:
    """One bar per day, stacked by series (in the order given; the caller folds the rest into one)."""
    names = list(series)[:COLOURS]
    totals = {day: sum((series[name].get(day, Decimal(0)) for name in names), Decimal(0)) for day in days}
    peak = max(totals.values(), default=Decimal(0))
    slot = WIDTH / max(len(days), 1)
    bars: list[Bar] = []
    for index, day in enumerate(days):
        base = float(HEIGHT)
        for colour, name in enumerate(names):
            amount = series[name].get(day, Decimal(0))
            if amount <= 0 or peak <= 0:
                continue
            height = float(amount / peak) * (HEIGHT - 4)
            base -= height
            bars.append(
                Bar(
                    x=round(index * slot + slot * 0.1, 2),
                    y=round(base, 2),
                    width=round(slot * 0.8, 2),
                    height=round(max(height, 0.5), 2),
                    colour=colour,
                    title=f"{day.isoformat()} · {name}: {money(amount)}",
                )
            )
    legend = [
        (colour, name, money(sum(series[name].values(), Decimal(0)))) for colour, name in enumerate(names)
    ]
    return Chart(
        bars=bars,
        legend=legend,
        first_day=days[0].isoformat() if days else "",
        last_day=days[-1].isoformat() if days else "",
        peak=money(peak),
    )
