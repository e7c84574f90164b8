"""Who may do what: LiteLLM's roles, and the one table that says what each of them may do.

A caller's role: the master key is `proxy_admin`; a generated key inherits the `user_role` of its
internal user (as LiteLLM's `effective_user_role`: a user with no role, or one this proxy does not
know, is an `internal_user`); a key with no user, or whose user does not exist, has no management
role — it may call the models and read its own `/key/info`, nothing else. Each route declares the
permission it needs (`api.auth.requires`); which role holds which permission is said only here.

"Own" is the caller's internal user: an `internal_user` manages the keys of its own user and reads
its own user's keys and spend; the routes ask `Caller.user_scope` / `Caller.check_owner`, which
answer from this table too. Keys with `metadata.role` `read_only` / `auditor` read the audit log of
their own key whatever their role (`api.routes.audit`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final


class Role(enum.StrEnum):
    PROXY_ADMIN = "proxy_admin"
    PROXY_ADMIN_VIEWER = "proxy_admin_viewer"
    INTERNAL_USER = "internal_user"
    INTERNAL_USER_VIEWER = "internal_user_viewer"


class Permission(enum.Enum):
    """What a route needs; the value completes "may not …" in a 403's message."""

    CALL_MODELS = "call the LLM routes"
    READ_ALL = "read every object"
    MANAGE = "change customers, budgets, teams, users or other users' keys"
    READ_OWN = "read its own user's keys and spend"
    MANAGE_OWN_KEYS = "generate, update or delete its own user's keys"


_ALL: Final = frozenset(Permission)

# What a caller without an "every …" permission may still do with its own user's objects.
OWN: Final[Mapping[Permission, Permission]] = {
    Permission.READ_ALL: Permission.READ_OWN,
    Permission.MANAGE: Permission.MANAGE_OWN_KEYS,
}

RULES: Final[Mapping[Role | None, frozenset[Permission]]] = {
    Role.PROXY_ADMIN: _ALL,
    # LiteLLM: every read, no change, and no LLM route (those spend money).
    Role.PROXY_ADMIN_VIEWER: frozenset({Permission.READ_ALL, Permission.READ_OWN}),
    Role.INTERNAL_USER: frozenset({Permission.CALL_MODELS, Permission.READ_OWN, Permission.MANAGE_OWN_KEYS}),
    Role.INTERNAL_USER_VIEWER: frozenset({Permission.CALL_MODELS, Permission.READ_OWN}),
    None: frozenset({Permission.CALL_MODELS}),  # a key without an (existing) internal user
}


# LiteLLM's other roles: an org_admin (no organisations here) keeps what an internal user has; the
# JWT `team` and end-user `customer` roles reach no management route in LiteLLM, nor here.
_OTHER_LITELLM_ROLES: Final[Mapping[str, Role | None]] = {
    "org_admin": Role.INTERNAL_USER,
    "team": None,
    "customer": None,
}


def effective_role(user_exists: bool, user_role: str | None) -> Role | None:
    """The role a key inherits from its internal user."""
    if not user_exists:
        return None
    if user_role is not None and user_role in _OTHER_LITELLM_ROLES:
        return _OTHER_LITELLM_ROLES[user_role]
    try:
        return Role(user_role or "")
    except ValueError:  # no role, or one LiteLLM does not know
        return Role.INTERNAL_USER


def may(role: Role | None, permission: Permission) -> bool:
    return permission in RULES[role]
