"""Who is calling: the master key, a generated key, or nobody.

Keys arrive as `Authorization: Bearer sk-…` (also `x-litellm-api-key` or `api-key`, as LiteLLM
accepts). Only the SHA-256 of a key is ever compared, cached or logged.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from typing import Any

import msgspec
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from api.errors import auth_error
from api.services import services_of
from ledger.keys import KeyRecord, hash_key


class Caller(msgspec.Struct, frozen=True, kw_only=True):
    key_hash: str
    is_master: bool
    key: KeyRecord | None = None

    @property
    def user_id(self) -> str | None:
        return self.key.user_id if self.key else None

    @property
    def team_id(self) -> str | None:
        return self.key.team_id if self.key else None

    @property
    def key_alias(self) -> str | None:
        return self.key.key_alias if self.key else None

    def allows_model(self, model: str) -> bool:
        return self.key is None or self.key.allows_model(model)


def presented_key(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    headers = connection.headers
    value = headers.get("authorization") or headers.get("x-litellm-api-key") or headers.get("api-key")
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else value.strip()
    return token or None


async def authenticate(connection: ASGIConnection[Any, Any, Any, Any]) -> Caller:
    services = services_of(connection)
    master_key = services.settings.master_key
    token = presented_key(connection)
    if master_key is None:
        # LiteLLM without a master key serves everyone as the admin; we do the same, and say so at start-up.
        return Caller(key_hash=hash_key(token or "anonymous"), is_master=True)
    if token is None:
        raise auth_error("No API key provided: send 'Authorization: Bearer <key>'")
    if hmac.compare_digest(token.encode(), master_key.encode()):
        return Caller(key_hash=services.master_key_hash, is_master=True)
    key_hash = hash_key(token)
    key = await services.keys.get(key_hash)
    if key is None:
        raise auth_error("Invalid API key: unknown or deleted key")
    if key.blocked:
        raise auth_error("API key is blocked")
    if key.expired(datetime.now(UTC)):
        raise auth_error(f"API key expired at {key.expires.isoformat() if key.expires else ''}")
    return Caller(key_hash=key_hash, is_master=False, key=key)


async def master_key_only(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard of the management API."""
    caller = await authenticate(connection)
    if not caller.is_master:
        raise auth_error("This route needs the master key")
    connection.state.caller = caller
