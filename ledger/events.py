"""Every event of the ledger: frozen msgspec Structs in one tagged union, decoded in one pass.

Events are facts in the past tense and carry everything a replay needs (prices and cost included:
a replay never re-prices). The `type` tag is stored in the event's JSON and in its own column.
Money is encoded as a JSON number with its exact digits; PostgreSQL's jsonb keeps them exactly.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Final, Literal, TypeAlias

import msgspec
from msgspec import UNSET, UnsetType

from spendledger.ledger.scopes import Scopes
from spendledger.ledger.tokens import TokenKind

# The values the request events take. Every value ever written is one of these (the proxy's three
# routes and two outcomes, and the refusals `sl_admit` builds), so events in any database decode.
Route: TypeAlias = Literal["chat.completions", "completions", "embeddings"]
UsageStatus: TypeAlias = Literal["success", "failure"]
RefusalReason: TypeAlias = Literal[
    "budget_exceeded", "rate_limit_exceeded", "customer_blocked", "scope_blocked", "model_access_denied"
]


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag=True):
    """Base of every event; the tag is the class name."""


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    """One call the router made to a provider for a request (api/attempts.py): the deployment,
    how it ended (the provider's HTTP status; 502 unreachable or broken, 504 timed out, 429 when the
    deployment's own rpm / tpm had no room and it was not called) and how long it took. A failed
    call the provider billed (it reported usage) carries its tokens and cost, which the request's
    totals include; the answering call's are the request's own fields."""

    deployment_id: str
    model_group: str
    upstream_model: str
    http_status: int
    latency_ms: int
    error_type: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost: Decimal = Decimal(0)


class UsageRecorded(Event, frozen=True, kw_only=True):
    """The terminal event of a proxied request: what was used and what it cost."""

    call_id: str
    route: Route
    model_group: str
    deployment_id: str
    provider: str
    upstream_model: str
    key_hash: str
    key_alias: str | None = None
    user_id: str | None = None
    team_id: str | None = None
    customer_id: str | None = None
    status: UsageStatus
    http_status: int
    error_type: str | None = None
    stream: bool = False
    input_tokens: int = 0  # every input token, those of the kinds below included
    output_tokens: int = 0  # every output token, reasoning and audio included
    total_tokens: int = 0
    # The kinds of token billed apart (ledger/tokens.py), parts of the totals above; 0 in events
    # older than them.
    cached_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    input_audio_tokens: int = 0
    input_image_tokens: int = 0
    output_audio_tokens: int = 0
    output_image_tokens: int = 0
    reasoning_tokens: int = 0
    usage_estimated: bool = False  # true when the upstream never reported usage (e.g. a client hung up)
    input_cost_per_token: Decimal | None = None
    output_cost_per_token: Decimal | None = None
    # What it was charged, by kind of token used (`input` and `output`: their plain-text parts):
    # the per-token price (its tier's, if it passed one) and the cost. Empty in older events and
    # for an unpriced model.
    unit_prices: dict[TokenKind, Decimal] = {}
    costs: dict[TokenKind, Decimal] = {}
    unpriced_kinds: tuple[TokenKind, ...] = ()  # used, with no price of their own (audio, image)
    cost: Decimal
    priced: bool
    started_at: datetime
    ended_at: datetime
    # The budget periods the request was admitted under, as (scope, scope_id, period start):
    # its cost is added to exactly these, live and on replay.
    budget_periods: tuple[tuple[str, str, str], ...] = ()
    # The worst case held for it at admission (ledger/holds.py); None in events older than it.
    # A settle gives back at most this much of a lease, whatever the request cost.
    hold: Decimal | None = None
    # Every call made for it, in order, the answering one last (empty in events older than the
    # router, and for a request answered at the first call: then the fields above say it all).
    attempts: tuple[Attempt, ...] = ()

    @property
    def scopes(self) -> Scopes:
        return Scopes(self.key_hash, self.user_id, self.team_id, self.customer_id)


class HoldExceeded(Event, frozen=True, kw_only=True):
    """A request cost more than the hold admitted for it (appended after its UsageRecorded, on its
    stream). It was billed in full, and the excess may have taken a budget past its limit. The
    hold bounds every request shape the gateway forwards, so this is never expected: the event
    makes a miss visible (the audit log, a metric and a warning) instead of silent."""

    call_id: str
    route: Route
    model_group: str
    deployment_id: str
    key_hash: str
    user_id: str | None = None
    team_id: str | None = None
    customer_id: str | None = None
    hold: Decimal
    cost: Decimal
    excess: Decimal
    input_tokens: int
    output_tokens: int

    @property
    def scopes(self) -> Scopes:
        return Scopes(self.key_hash, self.user_id, self.team_id, self.customer_id)


class RequestRefused(Event, frozen=True, kw_only=True):
    """The terminal event of a request refused at admission (budget, rate limit, blocked …)."""

    call_id: str
    route: Route
    model_group: str
    key_hash: str
    key_alias: str | None = None
    user_id: str | None = None
    team_id: str | None = None
    customer_id: str | None = None
    reason: RefusalReason
    scope: str
    scope_id: str
    detail: dict[str, Any] = {}
    refused_at: datetime

    @property
    def scopes(self) -> Scopes:
        return Scopes(self.key_hash, self.user_id, self.team_id, self.customer_id)


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
    # The customers the key may bill (empty: any). Added with issue 15; older events have none.
    allowed_customers: tuple[str, ...] = ()


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
    allowed_customers: tuple[str, ...] | UnsetType = UNSET


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
    allowed_model_region: str | None = None
    default_model: str | None = None
    source: str = "api"  # "api" or "first_sight" (created by the request that first named it)


class CustomerUpdated(Event, frozen=True, kw_only=True):
    user_id: str
    alias: str | None | UnsetType = UNSET
    budget_id: str | None | UnsetType = UNSET
    allowed_model_region: str | None | UnsetType = UNSET
    default_model: str | None | UnsetType = UNSET


class CustomerBlocked(Event, frozen=True, kw_only=True):
    user_id: str


class CustomerUnblocked(Event, frozen=True, kw_only=True):
    user_id: str


class CustomerDeleted(Event, frozen=True, kw_only=True):
    user_id: str


class BudgetDefined(Event, frozen=True, kw_only=True):
    budget_id: str
    max_budget: Decimal | None = None
    soft_budget: Decimal | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    max_parallel_requests: int | None = None
    budget_duration: str | None = None


class BudgetUpdated(Event, frozen=True, kw_only=True):
    budget_id: str
    max_budget: Decimal | None | UnsetType = UNSET
    soft_budget: Decimal | None | UnsetType = UNSET
    rpm_limit: int | None | UnsetType = UNSET
    tpm_limit: int | None | UnsetType = UNSET
    max_parallel_requests: int | None | UnsetType = UNSET
    budget_duration: str | None | UnsetType = UNSET


class BudgetDeleted(Event, frozen=True, kw_only=True):
    budget_id: str


class TeamCreated(Event, frozen=True, kw_only=True):
    team_id: str
    team_alias: str | None = None
    blocked: bool = False
    max_budget: Decimal | None = None
    soft_budget: Decimal | None = None
    budget_duration: str | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    max_parallel_requests: int | None = None
    models: tuple[str, ...] = ()
    metadata: dict[str, Any] = {}


class TeamUpdated(Event, frozen=True, kw_only=True):
    team_id: str
    team_alias: str | None | UnsetType = UNSET
    blocked: bool | UnsetType = UNSET
    max_budget: Decimal | None | UnsetType = UNSET
    soft_budget: Decimal | None | UnsetType = UNSET
    budget_duration: str | None | UnsetType = UNSET
    rpm_limit: int | None | UnsetType = UNSET
    tpm_limit: int | None | UnsetType = UNSET
    max_parallel_requests: int | None | UnsetType = UNSET
    models: tuple[str, ...] | UnsetType = UNSET
    metadata: dict[str, Any] | UnsetType = UNSET


class TeamDeleted(Event, frozen=True, kw_only=True):
    team_id: str


class UserCreated(Event, frozen=True, kw_only=True):
    user_id: str
    user_email: str | None = None
    user_alias: str | None = None
    user_role: str | None = None
    max_budget: Decimal | None = None
    soft_budget: Decimal | None = None
    budget_duration: str | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    max_parallel_requests: int | None = None
    models: tuple[str, ...] = ()
    metadata: dict[str, Any] = {}


class UserUpdated(Event, frozen=True, kw_only=True):
    user_id: str
    user_email: str | None | UnsetType = UNSET
    user_alias: str | None | UnsetType = UNSET
    user_role: str | None | UnsetType = UNSET
    max_budget: Decimal | None | UnsetType = UNSET
    soft_budget: Decimal | None | UnsetType = UNSET
    budget_duration: str | None | UnsetType = UNSET
    rpm_limit: int | None | UnsetType = UNSET
    tpm_limit: int | None | UnsetType = UNSET
    max_parallel_requests: int | None | UnsetType = UNSET
    models: tuple[str, ...] | UnsetType = UNSET
    metadata: dict[str, Any] | UnsetType = UNSET


class UserDeleted(Event, frozen=True, kw_only=True):
    user_id: str


class LagoEventRejected(Event, frozen=True, kw_only=True):
    """Lago accepted a usage event and then could not bill it: its `events.errors` webhook named the
    event's transaction_id (our call_id) under `error` (`invalid_code`, `missing_aggregation_property`,
    `invalid_filter_values`, `missing_group_key`). Appended on the stream of the webhook that said so
    (`lago-webhook:<X-Lago-Unique-Key>`), so a webhook Lago sends again is recorded once."""

    transaction_id: str
    error: str
    webhook_id: str
    received_at: datetime


AnyEvent = (
    UsageRecorded
    | HoldExceeded
    | RequestRefused
    | KeyGenerated
    | KeyUpdated
    | KeyBlocked
    | KeyUnblocked
    | KeyDeleted
    | CustomerCreated
    | CustomerUpdated
    | CustomerBlocked
    | CustomerUnblocked
    | CustomerDeleted
    | BudgetDefined
    | BudgetUpdated
    | BudgetDeleted
    | TeamCreated
    | TeamUpdated
    | TeamDeleted
    | UserCreated
    | UserUpdated
    | UserDeleted
    | LagoEventRejected
)

_encoder: Final = msgspec.json.Encoder(decimal_format="number")
_decoder: Final = msgspec.json.Decoder(AnyEvent)


def event_type(event: Event) -> str:
    return type(event).__name__


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


def decode_event(data: bytes | str) -> AnyEvent:
    return _decoder.decode(data)


def changed_fields(update: Event, id_field: str = "key_hash") -> dict[str, Any]:
    """The fields an update event sets, by name (UNSET ones, and the id, left out)."""
    return {
        name: getattr(update, name)
        for name in update.__struct_fields__
        if name != id_field and getattr(update, name) is not UNSET
    }
