"""When budget periods end, for views that show `budget_reset_at` (the rule is SQL's: sl_period_end)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Final

import asyncpg

_ENDS: Final = """
select sl_period_end(anchor, duration, now()) as reset_at
from unnest($1::timestamptz[], $2::text[]) with ordinality as b(anchor, duration, i)
order by i
"""


async def period_ends(
    conn: asyncpg.Connection | asyncpg.Pool, budgets: Sequence[tuple[datetime, str | None]]
) -> list[datetime | None]:
    """For each (anchor, budget_duration): the end of its current period (None without a duration)."""
    if not budgets:
        return []
    rows = await conn.fetch(_ENDS, [anchor for anchor, _ in budgets], [duration for _, duration in budgets])
    return [row["reset_at"] for row in rows]
