"""Fixtures shared by every test layer: a real PostgreSQL and fresh databases."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from tests.support import PostgresForTests


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresForTests]:
    server = PostgresForTests()
    yield server
    server.close()


@pytest.fixture
def database_url(postgres: PostgresForTests) -> Iterator[str]:
    """A freshly migrated database of this test's own."""
    url = postgres.new_database()
    yield url
    postgres.drop_database(url)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    db_pool = await asyncpg.create_pool(database_url, min_size=1, max_size=10)
    assert db_pool is not None
    yield db_pool
    await db_pool.close()
