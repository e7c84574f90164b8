"""The connection types the ledger's functions take.

asyncpg hands out a pool's connections as `PoolConnectionProxy`, which forwards every call to its
`Connection`; its type stubs keep the two apart, so a function that runs statements on "a
connection" names both.
"""

from __future__ import annotations

from typing import Final, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

# One connection: acquired from a pool (`async with pool.acquire() as conn`) or connected alone.
Connection: TypeAlias = asyncpg.Connection | PoolConnectionProxy
# Where a single statement may run: a connection, or the pool (which acquires one for it).
Queryable: TypeAlias = Connection | asyncpg.Pool

# What a statement raises when the database cannot take it: unreachable (OSError), refusing
# (PostgresError) or a connection or pool that is closed (InterfaceError).
DATABASE_ERRORS: Final = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)
