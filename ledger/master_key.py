"""Whether a server may start with its master key: LiteLLM's start-up rule, as spendledger applies it.

The master key is `general_settings.master_key`, else env `LITELLM_MASTER_KEY` (`ledger.config`
resolves it). A key that is unset (an `os.environ/` reference to an unset variable included),
empty, or publicly known (LiteLLM's list, kept as SHA-256 digests: `sk-1234`) refuses to start —
without a key every caller is the admin, and a known key is no key — unless the operator permits it:
`general_settings.dangerously_permit_weak_or_unset_master_key: true` or env
`LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY=true`. Nothing here ever repeats the key.
"""

from __future__ import annotations

import enum
import hashlib
from typing import Final

import msgspec

from spendledger.ledger.config import PERMIT_WEAK_MASTER_KEY_ENV, PERMIT_WEAK_MASTER_KEY_SETTING, Settings

# LiteLLM's PUBLICLY_KNOWN_MASTER_KEY_SHA256_DIGESTS (master_key_boot_check.py): sk-1234.
PUBLICLY_KNOWN_DIGESTS: Final = frozenset(
    {"88dc28d0f030c55ed4ab77ed8faf098196cb1c05df778539800c9f1243fe6b4b"}
)
FIX: Final = (
    "set LITELLM_MASTER_KEY to a secret (sk- followed by the output of `openssl rand -hex 32`) and "
    "read it with general_settings.master_key: os.environ/LITELLM_MASTER_KEY, or, for local development "
    f"only, set {PERMIT_WEAK_MASTER_KEY_ENV}=true or general_settings.{PERMIT_WEAK_MASTER_KEY_SETTING}: true"
)


class Weakness(enum.Enum):
    NOT_SET = "not set"
    EMPTY = "empty"
    PUBLICLY_KNOWN = "publicly known"


class MasterKeyVerdict(msgspec.Struct, frozen=True, kw_only=True):
    weakness: Weakness | None  # None: a key of the operator's own
    source: str  # where the key was looked for, for the messages
    permitted_by: str | None  # the setting that lets a weak or unset key serve

    @property
    def refused(self) -> bool:
        return self.weakness is not None and self.permitted_by is None

    @property
    def open(self) -> bool:
        """No key at all: every caller is the admin (only ever when permitted)."""
        return self.weakness in (Weakness.NOT_SET, Weakness.EMPTY)

    def refusal(self) -> str:
        """The one line `spendledger serve` prints before it exits with code 2."""
        return f"spendledger: refusing to start: the master key is {self._what()}; {FIX}"

    def warning(self) -> str | None:
        if self.weakness is None:
            return None
        consequence = "every caller is the admin" if self.open else "anyone who knows it is the admin"
        return (
            f"the master key is {self._what()} and {self.permitted_by} permits it: {consequence}; "
            "never run this outside local development"
        )

    def auth_state(self) -> str:
        """What GET /health/readiness shows an operator."""
        if self.weakness is None:
            return "master_key"
        if self.open:
            return f"open: no master key (permitted by {self.permitted_by})"
        return f"weak: {self.weakness.value} master key (permitted by {self.permitted_by})"

    def _what(self) -> str:
        assert self.weakness is not None
        return f"{self.weakness.value} ({self.source})"


def weakness_of(master_key: str | None) -> Weakness | None:
    if master_key is None:
        return Weakness.NOT_SET
    stripped = master_key.strip()
    if not stripped:
        return Weakness.EMPTY
    if hashlib.sha256(stripped.encode()).hexdigest() in PUBLICLY_KNOWN_DIGESTS:
        return Weakness.PUBLICLY_KNOWN
    return None


def master_key_verdict(settings: Settings) -> MasterKeyVerdict:
    return MasterKeyVerdict(
        weakness=weakness_of(settings.master_key),
        source=settings.master_key_source,
        permitted_by=settings.weak_master_key_permitted_by,
    )


def serving_master_key(settings: Settings) -> str | None:
    """The key callers must present; None when there is none (empty counts as none)."""
    key = settings.master_key
    return key if key is not None and key.strip() else None
