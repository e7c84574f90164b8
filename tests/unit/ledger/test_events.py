"""`ledger.events`: every event type round-trips through the tagged union; money keeps its digits."""

from __future__ import annotations

import json
import typing
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import msgspec
import pytest

from spendledger.ledger.events import (
    AnyEvent,
    CustomerCreated,
    Event,
    KeyBlocked,
    KeyDeleted,
    KeyGenerated,
    KeyUnblocked,
    KeyUpdated,
    RefusalReason,
    RequestRefused,
    Route,
    UsageRecorded,
    UsageStatus,
    changed_fields,
    decode_event,
    encode_event,
    event_type,
)
from spendledger.ledger.scopes import Scopes

T0 = datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=UTC)
KEY = "a" * 64


def usage(**fields: object) -> UsageRecorded:
    values: dict[str, object] = {
        "call_id": "call-1",
        "route": "chat.completions",
        "model_group": "gpt-4o-mini",
        "deployment_id": "dep-1",
        "provider": "openai",
        "upstream_model": "gpt-4o-mini",
        "key_hash": KEY,
        "key_alias": "alias",
        "user_id": "user-1",
        "team_id": "team-1",
        "customer_id": "cust-1",
        "status": "success",
        "http_status": 200,
        "stream": True,
        "input_tokens": 1234,
        "output_tokens": 567,
        "total_tokens": 1801,
        "input_cost_per_token": Decimal("0.0000015"),
        "output_cost_per_token": Decimal("0.000002"),
        "cost": Decimal("0.0011120000000000001"),
        "priced": True,
        "started_at": T0,
        "ended_at": T0 + timedelta(milliseconds=250),
    }
    values.update(fields)
    return UsageRecorded(**values)  # type: ignore[arg-type]


EVERY_EVENT: list[Event] = [
    usage(),
    usage(
        status="failure",
        http_status=502,
        error_type="upstream_error",
        customer_id=None,
        user_id=None,
        team_id=None,
        key_alias=None,
        input_cost_per_token=None,
        output_cost_per_token=None,
        cost=Decimal(0),
        priced=False,
        usage_estimated=True,
    ),
    KeyGenerated(
        key_hash=KEY,
        key_name="sk-...abcd",
        key_alias="team-key",
        user_id="u",
        team_id="t",
        models=("gpt-4o", "gpt-4o-mini"),
        metadata={"owner": "ops", "tags": ["a", "b"], "n": 3},
        max_budget=Decimal("10.000000001"),
        budget_duration="1mo",
        budget_id="tier-1",
        rpm_limit=60,
        tpm_limit=100000,
        max_parallel_requests=4,
        expires=T0 + timedelta(days=30),
        blocked=False,
    ),
    KeyGenerated(key_hash=KEY, key_name="sk-...wxyz"),
    KeyUpdated(key_hash=KEY, key_alias="renamed", max_budget=Decimal("0.1"), models=("m",)),
    KeyUpdated(key_hash=KEY, key_alias=None, max_budget=None, expires=None),
    KeyUpdated(key_hash=KEY),
    KeyBlocked(key_hash=KEY),
    KeyUnblocked(key_hash=KEY),
    KeyDeleted(key_hash=KEY),
    CustomerCreated(user_id="cust-1"),
    CustomerCreated(user_id="cust-2", alias="Acme", blocked=True, budget_id="gold", source="first_sight"),
]


UNION_TYPES: tuple[type[Event], ...] = AnyEvent.__args__  # type: ignore[attr-defined]


def sample(t: msgspec.inspect.Type, name: str) -> object:
    """A representative non-default value of an inspected field type (money with awkward digits)."""
    mi = msgspec.inspect
    if isinstance(t, mi.UnionType):
        return sample(next(x for x in t.types if not isinstance(x, mi.NoneType)), name)
    if isinstance(t, mi.StrType):
        return f"{name}-value"
    if isinstance(t, mi.BoolType):
        return True
    if isinstance(t, mi.IntType):
        return 7
    if isinstance(t, mi.DecimalType):
        return Decimal("0.0011120000000000001")
    if isinstance(t, mi.DateTimeType):
        return T0
    if isinstance(t, mi.VarTupleType):
        return (sample(t.item_type, name), sample(t.item_type, name + "2"))
    if isinstance(t, mi.TupleType):
        return tuple(sample(x, f"{name}{i}") for i, x in enumerate(t.item_types))
    if isinstance(t, mi.DictType):
        if isinstance(t.key_type, mi.LiteralType):  # a closed set of keys (kinds of token)
            return {t.key_type.values[0]: sample(t.value_type, name)}
        return {"k": "v", "n": 1, "nested": {"list": [1, "two"]}}
    if isinstance(t, mi.StructType):  # a nested Struct (an Attempt): every field set too
        return t.cls(**{f.name: sample(f.type, f.name) for f in t.fields})
    if isinstance(t, mi.AnyType):
        return "any"
    if isinstance(t, mi.LiteralType):
        return t.values[0]
    raise AssertionError(f"no sample for field {name}: {t!r}: teach this test the new field type")


def full(cls: type[Event]) -> Event:
    fields = msgspec.inspect.type_info(cls).fields  # type: ignore[attr-defined]
    return cls(**{f.name: sample(f.type, f.name) for f in fields})


def bare(cls: type[Event]) -> Event:
    fields = msgspec.inspect.type_info(cls).fields  # type: ignore[attr-defined]
    return cls(**{f.name: sample(f.type, f.name) for f in fields if f.required})


def test_every_hand_written_event_type_is_in_the_union() -> None:
    assert {type(e) for e in EVERY_EVENT} <= set(UNION_TYPES)
    assert set(Event.__subclasses__()) == set(UNION_TYPES)
    assert len({t.__name__ for t in UNION_TYPES}) == len(UNION_TYPES)


@pytest.mark.parametrize("event", EVERY_EVENT, ids=lambda e: event_type(e))
def test_round_trip_through_the_tagged_union(event: Event) -> None:
    assert_round_trip(event)


@pytest.mark.parametrize("cls", UNION_TYPES, ids=lambda c: c.__name__)
def test_every_union_type_round_trips_with_every_field_set(cls: type[Event]) -> None:
    event = full(cls)
    assert_round_trip(event)
    for name in event.__struct_fields__:
        if isinstance(getattr(event, name), Decimal):
            assert f'"{name}":0.0011120000000000001'.encode() in encode_event(event)


@pytest.mark.parametrize("cls", UNION_TYPES, ids=lambda c: c.__name__)
def test_every_union_type_round_trips_with_only_required_fields(cls: type[Event]) -> None:
    assert_round_trip(bare(cls))


def assert_round_trip(event: Event) -> None:
    data = encode_event(event)
    decoded = decode_event(data)
    assert type(decoded) is type(event)
    assert decoded == event
    assert decode_event(data.decode()) == event  # str input too
    assert json.loads(data)["type"] == event_type(event) == type(event).__name__
    assert encode_event(decoded) == data  # re-encoding is stable
    for name in event.__struct_fields__:
        value = getattr(decoded, name)
        assert type(value) is type(getattr(event, name)), name  # Decimal stays Decimal, tuple stays tuple


def test_key_updated_leaves_unset_fields_out_and_keeps_explicit_nulls() -> None:
    update = KeyUpdated(key_hash=KEY, key_alias=None, rpm_limit=5)
    obj = json.loads(encode_event(update))
    assert obj == {"type": "KeyUpdated", "key_hash": KEY, "key_alias": None, "rpm_limit": 5}
    decoded = decode_event(encode_event(update))
    assert isinstance(decoded, KeyUpdated)
    assert changed_fields(decoded) == {"key_alias": None, "rpm_limit": 5}
    assert changed_fields(KeyUpdated(key_hash=KEY)) == {}


@pytest.mark.parametrize(
    "digits",
    ["0.0011120000000000001", "0.0000015", "0.30000000000000004", "123456789.123456789123456789", "0"],
)
def test_money_is_a_json_number_with_its_exact_digits(digits: str) -> None:
    data = encode_event(usage(cost=Decimal(digits)))
    assert f'"cost":{digits},'.encode() in data  # a number, not a string, and no float noise
    decoded = decode_event(data)
    assert isinstance(decoded, UsageRecorded)
    assert type(decoded.cost) is Decimal
    assert str(decoded.cost) == digits
    # a JSON parser that reads numbers as Decimal sees the same amount
    assert json.loads(data, parse_float=Decimal)["cost"] == Decimal(digits)


def test_price_digits_survive_round_trip() -> None:
    event = usage(input_cost_per_token=Decimal("1.5E-7"), output_cost_per_token=Decimal("0.0000006"))
    decoded = decode_event(encode_event(event))
    assert isinstance(decoded, UsageRecorded)
    assert decoded.input_cost_per_token == Decimal("0.00000015")
    assert decoded.output_cost_per_token == Decimal("0.0000006")
    assert type(decoded.input_cost_per_token) is Decimal


def test_key_budget_is_exact_decimal_after_round_trip() -> None:
    decoded = decode_event(encode_event(KeyGenerated(key_hash=KEY, key_name="n", max_budget=Decimal("0.1"))))
    assert isinstance(decoded, KeyGenerated)
    assert decoded.max_budget == Decimal("0.1")
    assert type(decoded.max_budget) is Decimal


def test_datetimes_keep_their_instant() -> None:
    started = datetime(2026, 1, 31, 23, 0, tzinfo=timezone(timedelta(hours=-5)))
    decoded = decode_event(encode_event(usage(started_at=started)))
    assert isinstance(decoded, UsageRecorded)
    assert decoded.started_at == started
    assert decoded.started_at.utcoffset() is not None


def test_events_are_frozen() -> None:
    event = usage()
    with pytest.raises(AttributeError):
        event.cost = Decimal(1)  # type: ignore[misc]


def test_unknown_type_is_refused() -> None:
    with pytest.raises(msgspec.ValidationError):
        decode_event(b'{"type":"KeyStolen","key_hash":"x"}')


def test_missing_required_field_is_refused() -> None:
    data = json.loads(encode_event(usage()))
    del data["cost"]
    with pytest.raises(msgspec.ValidationError, match="cost"):
        decode_event(json.dumps(data))


def test_float_typed_money_in_json_decodes_to_its_written_digits() -> None:
    # a number typed with many digits is read as those digits, not through a binary float
    data = encode_event(usage())
    text = data.replace(b'"cost":0.0011120000000000001,', b'"cost":0.10000000000000000555,')
    assert text != data
    decoded = decode_event(text)
    assert isinstance(decoded, UsageRecorded)
    assert decoded.cost == Decimal("0.10000000000000000555")


# Every value the code has ever written (the proxy's routes and outcomes, sl_admit's refusals):
# narrowing these fields to Literals must leave every stored event decodable.
WRITTEN_ROUTES = ["chat.completions", "completions", "embeddings"]
WRITTEN_STATUSES = ["success", "failure"]
WRITTEN_REASONS = [
    "budget_exceeded", "rate_limit_exceeded", "customer_blocked", "scope_blocked", "model_access_denied"
]


def test_the_literal_types_are_the_values_ever_written() -> None:
    assert list(typing.get_args(Route)) == WRITTEN_ROUTES
    assert list(typing.get_args(UsageStatus)) == WRITTEN_STATUSES
    assert list(typing.get_args(RefusalReason)) == WRITTEN_REASONS


@pytest.mark.parametrize("route", WRITTEN_ROUTES)
@pytest.mark.parametrize("status", WRITTEN_STATUSES)
def test_usage_events_of_every_written_route_and_status_decode(route: str, status: str) -> None:
    data = json.loads(encode_event(usage()))
    decoded = decode_event(json.dumps(data | {"route": route, "status": status}))
    assert isinstance(decoded, UsageRecorded)
    assert (decoded.route, decoded.status) == (route, status)


@pytest.mark.parametrize("reason", WRITTEN_REASONS)
def test_refusals_of_every_written_reason_decode(reason: str) -> None:
    refused = {
        "type": "RequestRefused", "call_id": "c", "route": "embeddings", "model_group": "m",
        "key_hash": KEY, "reason": reason, "scope": "customer", "scope_id": "acme",
        "refused_at": T0.isoformat(),
    }  # fmt: skip
    decoded = decode_event(json.dumps(refused))
    assert isinstance(decoded, RequestRefused) and decoded.reason == reason


@pytest.mark.parametrize(("field", "value"), [("route", "responses"), ("status", "refused")])
def test_a_value_outside_the_vocabulary_is_refused(field: str, value: str) -> None:
    data = json.loads(encode_event(usage())) | {field: value}
    with pytest.raises(msgspec.ValidationError, match=field):
        decode_event(json.dumps(data))


def test_a_request_event_reads_its_scopes_back() -> None:
    assert usage().scopes == Scopes(KEY, "user-1", "team-1", "cust-1")
    assert usage(user_id=None, team_id=None, customer_id=None).scopes == Scopes(KEY)
