"""A DATABASE_URL as LiteLLM deployments write it, made one asyncpg takes.

LiteLLM reaches PostgreSQL through Prisma, whose URLs carry Prisma's own query parameters
(`?schema=public&connection_limit=5&pgbouncer=true`). asyncpg takes any query parameter it does not
know as a server setting, so `schema=public` would fail the connection. Here `schema` becomes
`search_path` (the same meaning), `connection_limit` the pool's size, the other Prisma-only
parameters are dropped with a warning naming them, and libpq's own (`sslmode`, `sslrootcert`, …,
`application_name`, or a server setting such as `search_path`) are kept.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec

# Prisma's parameters with no asyncpg meaning (https://www.prisma.io/docs, "PostgreSQL connection URL").
PRISMA_ONLY: Final = frozenset(
    {"pgbouncer", "pool_timeout", "connect_timeout", "socket_timeout", "statement_cache_size",
     "sslaccept", "sslidentity", "single_use_connections"}
)  # fmt: skip


class DatabaseUrl(msgspec.Struct, frozen=True, kw_only=True):
    url: str  # what asyncpg is given
    pool_limit: int | None = None  # Prisma's connection_limit, when it had one
    dropped: tuple[str, ...] = ()  # Prisma-only parameters left out (for one warning)


def from_prisma(url: str) -> DatabaseUrl:
    """The URL without Prisma's own parameters; `schema` as `search_path`."""
    parts = urlsplit(url)
    if not parts.query:
        return DatabaseUrl(url=url)
    kept: list[tuple[str, str]] = []
    dropped: list[str] = []
    pool_limit: int | None = None
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "schema":
            kept.append(("search_path", value))
        elif name == "connection_limit" and value.isdigit() and int(value) >= 1:
            pool_limit = max(2, int(value))
        elif name in PRISMA_ONLY or name == "connection_limit":
            dropped.append(name)
        else:
            kept.append((name, value))
    query = urlencode(kept)
    return DatabaseUrl(
        url=urlunsplit(parts._replace(query=query)), pool_limit=pool_limit, dropped=tuple(dict.fromkeys(dropped))
    )
