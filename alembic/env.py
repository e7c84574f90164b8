"""Alembic environment: async engine on asyncpg; the URL comes from `spendledger.database_url`."""

from __future__ import annotations

import asyncio

import asyncpg
from sqlalchemy import pool
from sqlalchemy.ext.asyncio import create_async_engine

from alembic import context


def _asyncpg_url(url: str) -> str:
    """The URL as asyncpg takes it: asyncpg connects (SQLAlchemy would hand its query parameters,
    such as a search_path server setting, to asyncpg as keyword arguments it does not have)."""
    for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url.removeprefix(prefix)
    raise ValueError("database URL must start with postgresql://")


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(connection=connection, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


async def _migrate() -> None:
    url = context.config.attributes.get("database_url") or context.config.get_main_option("sqlalchemy.url")
    dsn = _asyncpg_url(url)
    engine = create_async_engine(
        "postgresql+asyncpg://", async_creator=lambda: asyncpg.connect(dsn), poolclass=pool.NullPool
    )
    async with engine.connect() as connection:
        await connection.run_sync(_run)
        await connection.commit()
    await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported: run `spendledger migrate`")
asyncio.run(_migrate())
