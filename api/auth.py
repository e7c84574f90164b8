"""Who is calling (the master key, a generated key, or nobody), and what they may do.

Keys arrive as `Authorization: Bearer sk-…` (also `x-litellm-api-key` or `api-key`, as LiteLLM
accepts). Only the SHA-256 of a key is ever compared, cached or logged. Each management route names
the permission it needs with `requires(...)` as its guard; `api.roles` says which role has which.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Guard

from spendledger.api.errors import ApiError, auth_error
from spendledger.api.roles import OWN, Permission, Role, effective_role, may
from spendledger.api.services import Services, services_of
from spendledger.ledger.keys import KeyRecord, hash_key
from spendledger.ledger.master_key import serving_master_key


def forbidden(message: str, param: str | None = None) -> ApiError:
    """The caller is known, but its role may not do this (401 is for missing or unknown keys)."""
    return ApiError(403, message, "permission_denied", "403", param)


class Caller(msgspec.Struct, frozen=True, kw_only=True):
    key_hash: str
    is_master: bool
    key: KeyRecord | None = None
    role: Role | None = None
    actor: str  # who management events name: "master_key", or "key:<sha256>" (never the key)

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

    def may(self, permission: Permission) -> bool:
        return may(self.role, permission)

    def require(self, permission: Permission, doing: str | None = None) -> None:
        if not self.may(permission):
            raise forbidden(f"{self._who()} may not {permission.value}" + (f": {doing}" if doing else ""))

    def user_scope(self, asked: str | None, over: Permission) -> str | None:
        """Whose rows an answer shows, or a change touches: `asked` (None: everyone's) for a caller
        that may `over` every user's; else its own user's — naming another user is refused."""
        if self.may(over):
            return asked
        own = self.user_id
        if own is None or not self.may(OWN[over]) or (asked is not None and asked != own):
            raise forbidden(f"{self._who()} may only {OWN[over].value}", param="user_id")
        return own

    def check_key(self, record: KeyRecord | None, over: Permission) -> None:
        """A key the caller may read (`over` READ_ALL) or change (MANAGE): any for those who may
        `over`; else a key of its own user, and for reads the caller's own key. A key it may not
        see is refused whether or not it exists, so the answer tells nothing about other keys."""
        if self.may(over):
            return
        if record is not None and over is Permission.READ_ALL and record.key_hash == self.key_hash:
            return
        own = self.user_id
        if record is not None and own is not None and record.user_id == own and self.may(OWN[over]):
            return
        if self.role is None:
            raise forbidden(f"{self._who()} may only read its own /key/info", param="key")
        raise forbidden(f"{self._who()} may only {OWN[over].value}", param="key")

    def customer_for(self, named: str | None) -> str | None:
        """The customer a proxied request is billed to. A key with `allowed_customers` serves only
        those: another one is refused; with exactly one, a request naming nobody is billed to it."""
        allowed = self.key.allowed_customers if self.key is not None else ()
        if not allowed or named in allowed:
            return named
        label = self._key_label()
        if named is None:
            if len(allowed) == 1:
                return allowed[0]
            raise forbidden(
                f"Key {label} may serve several customers: name one in the body's 'user' or the "
                "x-litellm-customer-id header",
                param="user",
            )
        raise forbidden(f"Key {label} may not be used for customer {named!r}", param="user")

    def _key_label(self) -> str:
        assert self.key is not None
        return repr(self.key.key_alias) if self.key.key_alias else self.key.key_name

    def _who(self) -> str:
        if self.key is None:
            return "the master key"
        if self.role is None:
            return f"Key {self._key_label()} (of no internal user)"
        return f"Key {self._key_label()} (role {self.role})"


def presented_key(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    headers = connection.headers
    value = headers.get("authorization") or headers.get("x-litellm-api-key") or headers.get("api-key")
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else value.strip()
    return token or None


async def authenticate(connection: ASGIConnection[Any, Any, Any, Any]) -> Caller:
    return await caller_for_token(services_of(connection), presented_key(connection))


def _open_caller(token: str | None) -> Caller:
    # Only when the operator permitted it (`spendledger serve` refuses otherwise): as LiteLLM,
    # everyone is the admin; the start-up log and /health/readiness say so.
    return Caller(key_hash=hash_key(token or "anonymous"), is_master=True, role=Role.PROXY_ADMIN, actor="anonymous")


def _master_caller(services: Services) -> Caller:
    return Caller(key_hash=services.master_key_hash, is_master=True, role=Role.PROXY_ADMIN, actor="master_key")


async def caller_for_token(services: Services, token: str | None) -> Caller:
    """Who presents `token` (a key's plaintext, or None); 401 for a missing, unknown or unusable key."""
    master_key = serving_master_key(services.settings)
    if master_key is None:
        return _open_caller(token)
    if token is None:
        raise auth_error("No API key provided: send 'Authorization: Bearer <key>'")
    if hmac.compare_digest(token.encode(), master_key.encode()):
        return _master_caller(services)
    return await _generated_key_caller(services, hash_key(token))


async def caller_for_hash(services: Services, key_hash: str, is_master: bool) -> Caller:
    """Who signed in earlier with the key of this hash (the admin UI keeps no plaintext): checked
    again now, so a key blocked, deleted or expired since, or a master key changed, is refused."""
    if serving_master_key(services.settings) is None:
        return _open_caller(None)
    if is_master:
        if not hmac.compare_digest(key_hash, services.master_key_hash):
            raise auth_error("The master key has changed since this sign-in")
        return _master_caller(services)
    return await _generated_key_caller(services, key_hash)


async def _generated_key_caller(services: Services, key_hash: str) -> Caller:
    key = await services.keys.get(key_hash)
    if key is None:
        raise auth_error("Invalid API key: unknown or deleted key")
    if key.blocked:
        raise auth_error("API key is blocked")
    if key.expired(datetime.now(UTC)):
        raise auth_error(f"API key expired at {key.expires.isoformat() if key.expires else ''}")
    role = effective_role(key.user_exists, key.user_role)
    return Caller(key_hash=key_hash, is_master=False, key=key, role=role, actor=f"key:{key_hash}")


_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def json_bodies_only(connection: ASGIConnection[Any, Any, Any, Any]) -> None:
    """Management changes come as JSON only. A cross-site HTML form can send text/plain, urlencoded
    or multipart bodies without a CORS preflight, never application/json: so no form can drive them."""
    if connection.scope.get("method") not in _BODY_METHODS:
        return
    headers = connection.headers
    content_type = headers.get("content-type")
    length = (headers.get("content-length") or "").strip()
    has_body = "transfer-encoding" in headers or length not in ("", "0")
    if content_type is None and not has_body:
        return
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        sent = f"{media[:80]!r}" if media else "no Content-Type"
        raise ApiError(
            415,
            f"Management requests take a JSON body sent as 'Content-Type: application/json', not {sent}",
            "invalid_request_error",
            "unsupported_media_type",
        )


def requires(permission: Permission | None) -> Guard:
    """The guard of a management route: a known caller (401), a JSON body (415), and `permission`
    (403; None: any caller, the route scopes its answer itself). The caller goes to `caller_of`."""

    async def guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        caller = await authenticate(connection)
        json_bodies_only(connection)
        if permission is not None:
            caller.require(permission, f"{connection.scope.get('method')} {connection.url.path}")
        connection.state.caller = caller

    return guard


def caller_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Caller:
    """The caller a `requires` guard authenticated."""
    caller: Caller = connection.state.caller
    return caller
