"""The zone budget periods begin at midnight in (`litellm_settings.timezone`), kept in the database.

Every period is computed in SQL (`sl_period_start` / `sl_period_end`, ledger/sql/periods.sql), by
admissions, leases, the webhook follower and the info routes alike, from the one `budget_calendar`
row. The serving process writes the configured zone there at start. A zone that changes moves the
boundaries from the next admission: a budget whose period then begins elsewhere starts that period
empty (its row is keyed by the period's start), so the change is logged.
"""

from __future__ import annotations

from typing import Final

import asyncpg
import structlog

log = structlog.get_logger(__name__)

_SET: Final = """
with before as (select timezone from budget_calendar)
update budget_calendar set timezone = $1
where timezone is distinct from $1 and now() at time zone $1 is not null
returning (select timezone from before)
"""


class UnknownTimezone(ValueError):
    """PostgreSQL does not know the configured zone."""


async def set_budget_timezone(pool: asyncpg.Pool, zone: str) -> None:
    """Make `zone` the one budget periods are counted in (no-op when it already is)."""
    try:
        before = await pool.fetchval(_SET, zone)
    except asyncpg.InvalidParameterValueError:
        raise UnknownTimezone(
            f"litellm_settings.timezone {zone!r}: PostgreSQL does not know this time zone"
        ) from None
    if before is not None:
        log.warning("budget_timezone_changed", before=before, after=zone)
