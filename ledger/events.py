"""Every event of the ledger: frozen msgspec Structs in one tagged union, decoded in one pass.

Events are facts in the past tense and carry everything a replay needs (prices and cost included:
a replay never re-prices). The `type` tag is stored in the event's JSON and in its own column.
Money is encoded as a JSON number with its exact digits; PostgreSQL's jsonb keeps them exactly.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Final

import msgspec
from msgspec import UNSET, UnsetType


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag=True):
    """Base of every event; the tag is the class name."""


class UsageRecorded(Event, frozen=True, kw_only=True):
    """The terminal event of a proxied request: what was used and what it cost."""

    call_id: str
    route: str  # "chat.completions" | "completions" | "embeddings"
    model_group: str
    deployment_id: str
    provider: str
    upstream_model: str
    key_hash: str
    key_alias: str | None = None
    user_id: str | None = None
    team_id: str | None = None
    customer_id: str | None = None
    status: str  # "success" | "failure"
    http_status: int
    error_type: str | None = None
    stream: bool = False
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    usage_estimated: bool = False  # true when the upstream never reported usage (e.g. a client hung up)
    input_cost_per_token: Decimal | None = None
    output_cost_per_token: Decimal | None = None
    cost: Decimal
    priced: bool
    started_at: datetime
    ended_at: datetime


class KeyGenerated(Event, frozen=True, kw_only=True):
    key_hash: str
    key_name: str  # "sk-...abcd": enough to recognise a key, never enough to use it
    key_alias: str | None = None
    user_id: str | None = None
    team_id: str | None = None
    models: tuple[str, ...] = ()
    metadata: dict[str, Any] = {}
    max_budget: Decimal | None = None
    budget_duration: str | None = None
    budget_id: str | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    max_parallel_requests: int | None = None
    expires: datetime | None = None
    blocked: bool = False


class KeyUpdated(Event, frozen=True, kw_only=True):
    """Only the fields that changed are present."""

    key_hash: str
    key_alias: str | UnsetType | None = UNSET
    user_id: str | UnsetType | None = UNSET
    team_id: str | UnsetType | None = UNSET
    models: tuple[str, ...] | UnsetType = UNSET
    metadata: dict[str, Any] | UnsetType = UNSET
    max_budget: Decimal | UnsetType | None = UNSET
    budget_duration: str | UnsetType | None = UNSET
    budget_id: str | UnsetType | None = UNSET
    rpm_limit: int | UnsetType | None = UNSET
    tpm_limit: int | UnsetType | None = UNSET
    max_parallel_requests: int | UnsetType | None = UNSET
    expires: datetime | UnsetType | None = UNSET


class KeyBlocked(Event, frozen=True, kw_only=True):
    key_hash: str


class KeyUnblocked(Event, frozen=True, kw_only=True):
    key_hash: str


class KeyDeleted(Event, frozen=True, kw_only=True):
    key_hash: str


class CustomerCreated(Event, frozen=True, kw_only=True):
    user_id: str
    alias: str | None = None
    blocked: bool = False
    budget_id: str | None = None
    source: str = "api"  # "api" or "first_sight" (created by the request that first named it)


AnyEvent = (
    UsageRecorded | KeyGenerated | KeyUpdated | KeyBlocked | KeyUnblocked | KeyDeleted | CustomerCreated
)

_encoder: Final = msgspec.json.Encoder(decimal_format="number")
_decoder: Final = msgspec.json.Decoder(AnyEvent)


def event_type(event: Event) -> str:
    return type(event).__name__


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


def decode_event(data: bytes | str) -> AnyEvent:
    return _decoder.decode(data)


def changed_fields(update: KeyUpdated) -> dict[str, Any]:
    """The fields an update sets, by name (UNSET ones left out)."""
    return {
        name: getattr(update, name)
        for name in update.__struct_fields__
        if name != "key_hash" and getattr(update, name) is not UNSET
    }
