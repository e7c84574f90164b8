"""`POST /usage`: usage of LLM calls made outside the gateway, recorded as the proxy records its own.

Each record is checked on its own (a bad one fails alone), priced from the config's model group
(or taken as sent: a `cost` only admin keys may give), and becomes one `UsageRecorded` settled
with its Lago row and webhooks in one transaction for the batch — the same settle as a proxied
request's. A `call_id` the ledger holds already answers `duplicate` with its first outcome when
the record is the same, and a 409 for that record when it is not; two senders racing with one id
are told apart by the event store's unique stream version, and the loser's batch is classified
again.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Final, Literal

import asyncpg
import msgspec
from msgspec import Meta

from spendledger.api.auth import Caller
from spendledger.api.errors import ApiError, bad_request
from spendledger.api.json_body import MAX_JSON_DEPTH, nested_deeper_than
from spendledger.api.proxy import Usage
from spendledger.api.roles import Permission
from spendledger.api.services import Services
from spendledger.ledger.events import Route, UsageRecorded
from spendledger.ledger.identifiers import Identifier
from spendledger.ledger.ingest import Recorded, budget_periods, digest, recorded_calls
from spendledger.ledger.pricing import Charge, catalogue_model_price, charge
from spendledger.ledger.scopes import Scopes
from spendledger.ledger.tokens import TokenUsage
from spendledger.ledger.usage import Recording, record_usages

MAX_RECORDS: Final = 1000
CLOCK_SKEW: Final = timedelta(minutes=5)  # how far in the future a sender's clock may be
_RACES: Final = 3  # a batch that lost a race for a call id is classified again, at most this often


class UsageRecord(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    call_id: Identifier
    model: Identifier
    usage: Usage | None = None
    user: Identifier | None = None  # the customer billed
    user_id: Identifier | None = None
    team_id: Identifier | None = None
    model_id: Identifier | None = None  # which deployment of the group (default: its first)
    route: Route = "chat.completions"
    start_time: datetime | None = None
    end_time: datetime | None = None
    status: Literal["success", "failure"] = "success"
    metadata: dict[str, Any] = {}
    cost: Decimal | None = None  # admin keys only: recorded as the caller's
    hold_id: Identifier | None = None  # from POST /usage/admit: the call_id it was admitted under


class UsageBatch(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    records: Annotated[list[msgspec.Raw], Meta(min_length=1, max_length=MAX_RECORDS)]


class DocumentedBatch(msgspec.Struct, kw_only=True):
    """The body as the OpenAPI document shows it (the route decodes it itself, records as raw JSON)."""

    records: Annotated[list[UsageRecord], Meta(min_length=1, max_length=MAX_RECORDS)]


_batch_decoder: Final = msgspec.json.Decoder(UsageBatch)


def decode_batch(body: bytes) -> UsageBatch:
    """The body's records, each kept as its JSON text: decoded one by one, so one bad record fails
    alone and money keeps its digits. The whole is refused (400) if it is not such a body."""
    try:
        return _batch_decoder.decode(body)
    except RecursionError:
        raise bad_request(f"The JSON body nests objects and arrays more than {MAX_JSON_DEPTH} levels deep") from None
    except msgspec.ValidationError as exc:
        raise bad_request(f"Expected {{'records': [1 to {MAX_RECORDS} usage records]}}: {exc}", param="records") from None
    except msgspec.DecodeError:
        raise bad_request("The body is not JSON") from None


class RecordError(msgspec.Struct, kw_only=True):
    message: str
    type: str
    code: str
    param: str | None = None


class RecordResult(msgspec.Struct, kw_only=True):
    call_id: str | None
    outcome: Literal["recorded", "duplicate", "error"]
    cost: Decimal | None = None
    error: RecordError | None = None


class UsageResults(msgspec.Struct, kw_only=True):
    results: list[RecordResult]


class _Refused(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.error = RecordError(
            message=message,
            type="invalid_request_error" if status < 403 else ("permission_denied" if status == 403 else "conflict"),
            code=code,
            param=param,
        )


_record_decoder: Final = msgspec.json.Decoder(UsageRecord)


# A record's `metadata` (the one field of any shape) sits three levels into the body.
_METADATA_DEPTH: Final = MAX_JSON_DEPTH - 3


def _decode(raw: msgspec.Raw) -> UsageRecord:
    try:
        record = _record_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise _Refused(400, f"Invalid record: {exc}", "invalid_request", _field_of(str(exc))) from None
    except RecursionError:
        raise _metadata_too_deep() from None
    # Stored in the event's metadata: every later read and replay of it would walk its depth.
    if record.metadata and nested_deeper_than(record.metadata, _METADATA_DEPTH):
        raise _metadata_too_deep()
    return record


def _metadata_too_deep() -> _Refused:
    message = f"metadata nests objects and arrays more than {_METADATA_DEPTH} levels deep"
    return _Refused(400, message, "invalid_request", "metadata")


def _field_of(message: str) -> str | None:
    """The field a msgspec validation message names: `… - at `$.usage.prompt_tokens``, or
    `Object missing required field `call_id``."""
    if "`$." in message:
        return message.rpartition("`$.")[2].rstrip("`") or None
    if "required field `" in message:
        return message.rpartition("required field `")[2].split("`")[0] or None
    return None


def _call_id_of(raw: msgspec.Raw) -> str | None:
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None
    call_id = value.get("call_id") if isinstance(value, dict) else None
    return call_id if isinstance(call_id, str) and len(call_id) <= 256 else None


class _Prepared(msgspec.Struct, kw_only=True):
    index: int
    digest: str
    event: UsageRecorded
    cost_source: str
    metadata: dict[str, Any]


def _scopes(caller: Caller, record: UsageRecord) -> Scopes:
    """Who the record bills: the sending key, its user and team; another user or team only for
    admins; the customer as the proxy would allow it (a key's `allowed_customers`)."""
    own_user, own_team = caller.user_id, caller.team_id
    for named, own, field in ((record.user_id, own_user, "user_id"), (record.team_id, own_team, "team_id")):
        if named is not None and named != own and not caller.may(Permission.MANAGE):
            raise _Refused(403, f"Only admin keys may bill another {field[:-3]}'s scope", "403", field)
    try:
        customer = caller.customer_for(record.user)
    except ApiError as exc:
        raise _Refused(403, exc.message, "403", "user") from None
    return Scopes(
        caller.key_hash,
        record.user_id if record.user_id is not None else own_user,
        record.team_id if record.team_id is not None else own_team,
        customer,
    )


def _charge(
    services: Services, caller: Caller, record: UsageRecord, tokens: TokenUsage
) -> tuple[Charge, str, str, str, str]:
    """The cost and the deployment it is priced as: (charge, deployment_id, provider, upstream model, source)."""
    deployments = services.router.deployments(record.model)
    if record.model_id is not None:
        deployments = tuple(d for d in deployments if d.deployment_id == record.model_id)
    deployment = deployments[0] if deployments else None
    if record.cost is not None:
        if not caller.may(Permission.MANAGE):
            raise _Refused(403, "Only admin keys may send a record's cost: leave it out to have it priced", "403", "cost")
        if not record.cost.is_finite() or record.cost < 0:
            raise _Refused(400, "cost must be a number of at least 0", "invalid_request", "cost")
        given = Charge(unit_prices={}, costs={}, total=record.cost, priced=True)
        upstream = deployment.upstream_model if deployment else record.model
        provider = deployment.provider if deployment else "external"
        return given, deployment.deployment_id if deployment else record.model, provider, upstream, "caller"
    if deployment is None:
        listed = catalogue_model_price(record.model) if record.model_id is None else None
        if listed is None:
            raise _Refused(
                400,
                f"Model {record.model!r} is neither a model group of this gateway"
                + (f" (with a deployment {record.model_id!r})" if record.model_id else " nor a model the price catalogue knows")
                + ": name one, or (admin keys) send the call's cost",
                "model_not_found",
                "model",
            )
        priced = charge(listed.price, tokens)
        return priced, f"catalogue:{listed.provider}/{listed.model}", listed.provider, listed.model, "catalogue"
    priced = charge(services.prices.price(deployment.deployment_id), tokens)
    return priced, deployment.deployment_id, deployment.provider, deployment.upstream_model, "ledger"


def _prepare(services: Services, caller: Caller, index: int, raw: msgspec.Raw, now: datetime) -> _Prepared:
    record = _decode(raw)
    if record.hold_id is not None and record.hold_id != record.call_id:
        raise _Refused(400, "A held call is recorded under its hold's id: send call_id equal to hold_id", "invalid_request", "call_id")
    scopes = _scopes(caller, record)
    tokens = record.usage.tokens() if record.usage else TokenUsage()
    cost, deployment_id, provider, upstream_model, cost_source = _charge(services, caller, record, tokens)
    ended = record.end_time or now
    started = record.start_time or ended
    if ended.tzinfo is None or started.tzinfo is None:
        raise _Refused(400, "start_time and end_time need a UTC offset (e.g. 2026-12-07T12:00:00Z)", "invalid_request", "end_time")
    if ended > now + CLOCK_SKEW:
        raise _Refused(400, "end_time is in the future", "invalid_request", "end_time")
    if started > ended:
        raise _Refused(400, "start_time is after end_time", "invalid_request", "start_time")
    counts: dict[str, Any] = tokens.counts()  # the totals and their parts, as the proxy names them
    event = UsageRecorded(
        call_id=record.call_id,
        route=record.route,
        model_group=record.model,
        deployment_id=deployment_id,
        provider=provider,
        upstream_model=upstream_model,
        key_hash=scopes.key_hash,
        key_alias=caller.key_alias,
        user_id=scopes.user_id,
        team_id=scopes.team_id,
        customer_id=scopes.customer_id,
        status=record.status,
        http_status=200 if record.status == "success" else 500,
        error_type=None if record.status == "success" else "reported_failure",
        **counts,
        usage_estimated=record.usage is None,
        input_cost_per_token=cost.input_cost_per_token,
        output_cost_per_token=cost.output_cost_per_token,
        unit_prices=cost.unit_prices,
        costs=cost.costs,
        unpriced_kinds=cost.unpriced_kinds,
        cost=cost.total,
        priced=cost.priced,
        started_at=started.astimezone(UTC),
        ended_at=ended.astimezone(UTC),
    )
    # The digest is of what was sent (and by whom): a resend is the same call, anything else is not.
    return _Prepared(
        index=index, digest=digest([caller.key_hash, msgspec.json.decode(raw)]), event=event,
        cost_source=cost_source, metadata=record.metadata,
    )  # fmt: skip


def _first_outcome(prepared: _Prepared, held: Recorded) -> RecordResult:
    if held.digest != prepared.digest:
        error = _Refused(409, f"call_id {prepared.event.call_id!r} was recorded already with other content", "conflict", "call_id")
        return RecordResult(call_id=prepared.event.call_id, outcome="error", error=error.error)
    return RecordResult(call_id=prepared.event.call_id, outcome="duplicate", cost=held.event.cost)


async def ingest(services: Services, caller: Caller, batch: UsageBatch) -> UsageResults:
    now = datetime.now(UTC)
    results: list[RecordResult | None] = [None] * len(batch.records)
    prepared: list[_Prepared] = []
    for index, raw in enumerate(batch.records):
        try:
            prepared.append(_prepare(services, caller, index, raw, now))
        except _Refused as exc:
            results[index] = RecordResult(call_id=_call_id_of(raw), outcome="error", error=exc.error)
    for _ in range(_RACES):
        try:
            await _record_new(services, caller, prepared, results, now)
            break
        except asyncpg.UniqueViolationError:
            continue  # another sender recorded one of these ids meanwhile: classify again
    else:
        raise ApiError(503, "Another sender kept recording the same call ids: retry", "ledger_unavailable")
    return UsageResults(results=[r for r in results if r is not None])


async def _record_new(
    services: Services, caller: Caller, prepared: Sequence[_Prepared], results: list[RecordResult | None], now: datetime
) -> None:
    pending = [p for p in prepared if results[p.index] is None]
    if not pending:
        return
    async with services.pool.acquire() as conn, conn.transaction():
        held = await recorded_calls(conn, [p.event.call_id for p in pending])
        new: dict[str, _Prepared] = {}
        for p in pending:
            call_id = p.event.call_id
            if call_id in held:
                results[p.index] = _first_outcome(p, held[call_id])
            elif call_id in new:  # the same id twice in one batch: the first one counts
                first = new[call_id]
                results[p.index] = _first_outcome(p, Recorded(event=first.event, digest=first.digest))
            else:
                new[call_id] = p
        if not new:
            return
        chosen = list(new.values())
        first_seen = {"actor": caller.actor, "source": "ingest"}
        periods = await budget_periods(
            conn, [p.event.scopes for p in chosen], now, services.recording_context, first_seen
        )
        recordings = []
        for p, budget in zip(chosen, periods, strict=True):
            event = msgspec.structs.replace(p.event, budget_periods=budget)
            metadata = {
                "actor": caller.actor, "source": "ingest", "ingest_digest": p.digest,
                "cost_source": p.cost_source, "sent": p.metadata,
            }  # fmt: skip
            recordings.append(Recording(event=event, outbox=services.outbox_rows(event), metadata=metadata))
        await record_usages(conn, recordings, services.recording_context)
    for p in chosen:
        results[p.index] = RecordResult(call_id=p.event.call_id, outcome="recorded", cost=p.event.cost)
