"""Fixtures of the SQL-boundary tests: tests that only read (pure functions such as the budget
periods) share one migrated database per module, so parametrized cases and property tests do not
pay for a database each."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from tests.support import PostgresForTests

# The session time zones a period must not depend on (docs/budgets.md: calendar months are UTC's).
ZONES = ("UTC", "America/New_York", "Europe/Berlin", "Asia/Kolkata", "Australia/Lord_Howe", "Pacific/Chatham")


@pytest.fixture(scope="module")
def shared_database_url(postgres: PostgresForTests) -> Iterator[str]:
    """A migrated database for the module's read-only tests (they must change nothing in it)."""
    url = postgres.new_database()
    yield url
    postgres.drop_database(url)


@pytest.fixture(scope="module")
async def zoned(shared_database_url: str) -> AsyncIterator[dict[str, asyncpg.Connection]]:
    """A connection to the shared database in each of ZONES, by zone."""
    connections = {
        zone: await asyncpg.connect(shared_database_url, server_settings={"timezone": zone}) for zone in ZONES
    }
    try:
        yield connections
    finally:
        for conn in connections.values():
            await conn.close()
