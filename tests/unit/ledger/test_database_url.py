"""LiteLLM deployments' Prisma-style DATABASE_URL made one asyncpg takes."""

from __future__ import annotations

from spendledger.ledger.database_url import from_prisma


def test_schema_is_the_search_path_and_connection_limit_the_pool() -> None:
    found = from_prisma("postgresql://u:p%40ss@db:5432/litellm?schema=billing&connection_limit=5&sslmode=require")
    assert found.url == "postgresql://u:p%40ss@db:5432/litellm?search_path=billing&sslmode=require"
    assert found.pool_limit == 5 and found.dropped == ()


def test_prisma_only_parameters_are_dropped_and_named() -> None:
    found = from_prisma("postgres://u@h/d?pgbouncer=true&connect_timeout=10&pool_timeout=0&connection_limit=x")
    assert found.url == "postgres://u@h/d"
    assert found.dropped == ("pgbouncer", "connect_timeout", "pool_timeout", "connection_limit")
    assert found.pool_limit is None


def test_a_url_without_parameters_is_unchanged() -> None:
    url = "postgresql://u:secret@h:6543/d"
    assert from_prisma(url).url == url
    assert from_prisma("postgresql://u@h/d?connection_limit=1").pool_limit == 2  # a pool needs two
