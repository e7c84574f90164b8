"""The webhook crossing table at the SQL boundary (ledger/sql/webhook_rows.sql).

Spend crossing 85 % and 95 % of `max_budget` (`threshold_crossed`), `max_budget` itself
(`budget_crossed`) and `soft_budget` (`soft_budget_crossed`) writes one outbox row per line per
period, by the request whose spend took the running total to or past the line; its dedupe key is
`<event>:<scope>:<scope id>:<period start, epoch seconds>:<85|95|max|soft>`, so a line already
announced in a period — by an earlier crossing, or by a refusal (`sl_announce_budget_exhausted`,
called by ledger/admission.py) — is never announced again in it. Both build the key with
`sl_crossing_key`.

The usage events are crafted here (ledger/events.py's UsageRecorded, encoded as the settle encodes
it) and handed to the functions directly: `sl_webhook_run` (a run of events, as the follower hands
them over), `sl_follow_webhooks` (the follower itself, over events appended as the settle appends
them) and `sl_webhook_rows` (the crossing over given values).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final

import asyncpg
import msgspec
import pytest

from spendledger.ledger.admission import Refused, admit_request, announce_budget_exhausted
from spendledger.ledger.directory import create_customer, create_user, update_customer
from spendledger.ledger.events import (
    CustomerCreated,
    CustomerUpdated,
    UsageRecorded,
    UserCreated,
    encode_event,
)
from spendledger.ledger.usage import RecordingContext
from tests.integration.ledger.test_group_admitter import admission

KEY: Final = "k" * 64
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
CONTEXT: Final = msgspec.json.encode(RecordingContext(webhooks=True)).decode()
LINES: Final = {
    "max": "budget_crossed",
    "85": "threshold_crossed",
    "95": "threshold_crossed",
    "soft": "soft_budget_crossed",
}
PATHS: Final = ("sl_webhook_run", "sl_follow_webhooks")


@dataclass(frozen=True)
class Request:
    cost: str
    period: int = 0  # the budget period it was admitted in: 0, or 1 (the one after)
    user: bool = False  # governed by the case's user as well as by its customer


def each(*costs: str, period: int = 0, user: bool = False) -> list[Request]:
    return [Request(cost, period, user) for cost in costs]


@dataclass(frozen=True)
class Case:
    name: str
    limits: dict[str, Any]  # the customer's
    runs: list[list[Request]]  # handed over run by run; requests are numbered across the runs
    # the rows expected: (line, the number of the request that crossed it[, scope: "customer" unless named])
    crossed: list[tuple[Any, ...]]
    user_limits: dict[str, Any] = field(default_factory=dict)
    after_first_run: dict[str, Any] = field(default_factory=dict)  # the customer's limits, changed then


ONE: Final = {"max_budget": Decimal(1)}

CASES: Final = [
    Case("85 percent only", ONE, [each("0.5"), each("0.4")], [("85", 1)]),
    Case("every line of the budget at once", ONE, [each("1.2")], [("85", 0), ("95", 0), ("max", 0)]),
    Case("landing exactly on each line", ONE, [each("0.85"), each("0.1"), each("0.05"), each("0.01")],
         [("85", 0), ("95", 1), ("max", 2)]),
    Case("several lines inside one run, each by the request that crossed it", ONE, [each("0.5", "0.46", "0.1", "0.3")],
         [("85", 1), ("95", 1), ("max", 2)]),
    Case("just short of a line", ONE, [each("0.849999"), each("0.1")], [("85", 1)]),
    Case("requests that cost nothing cross nothing", {"max_budget": Decimal(0)}, [each("0"), each("0", "0")], []),
    Case("a second crossing in the same period writes nothing", ONE, [each("1"), each("1")],
         [("85", 0), ("95", 0), ("max", 0)],  # the raised budget's lines are passed too, in the same period
         after_first_run={"max_budget": Decimal(2)}),
    Case("a new period crosses again", {"max_budget": Decimal(1), "budget_duration": "30s"},
         [each("0.9"), each("0.2"), each("0.9", period=1), each("0.2", period=1)],
         [("85", 0), ("95", 1), ("max", 1), ("85", 2), ("95", 3), ("max", 3)]),
    Case("a soft budget beside the budget: on the period's spend", {"max_budget": Decimal(1), "soft_budget": Decimal("0.5")},
         [each("0.5"), each("0.5")], [("soft", 0), ("85", 1), ("95", 1), ("max", 1)]),
    Case("a soft budget alone: on the lifetime spend, once", {"soft_budget": Decimal("0.5")},
         [each("0.3"), each("0.3"), each("0.3")], [("soft", 1)]),
    Case("a soft budget with a duration: once each period", {"soft_budget": Decimal("0.5"), "budget_duration": "30s"},
         [each("0.6"), each("0.6"), each("0.6", period=1)], [("soft", 0), ("soft", 2)]),
    Case("two scopes crossed by one request: a row each", ONE, [each("0.9", user=True), each("0.3", user=True)],
         [("85", 0), ("95", 1), ("max", 1), ("85", 1, "user"), ("95", 1, "user"), ("max", 1, "user")],
         user_limits={"max_budget": Decimal("1.2"), "budget_duration": "1mo"}),
]  # fmt: skip


@pytest.fixture(scope="module")
async def shared_pool(shared_database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """The cases share a database (one each would cost more than the cases): each has a customer
    and a user of its own, and the follower counts only what it has not followed yet."""
    pool = await asyncpg.create_pool(shared_database_url, min_size=1, max_size=4)
    assert pool is not None
    yield pool
    await pool.close()


@dataclass(frozen=True)
class Scope:
    scope: str
    scope_id: str
    anchor: datetime
    duration: str | None
    periods: tuple[datetime, ...]  # the starts of its periods 0 and 1; none where admission tracks none


async def scope_of(conn: asyncpg.Connection, scope: str, scope_id: str, limits: dict[str, Any]) -> Scope:
    """The scope's periods as admission names them (sl_admit tracks a period where there is a
    budget or a duration)."""
    table = "customers" if scope == "customer" else "users"
    anchor = await conn.fetchval(f"select created_at from {table} where user_id = $1", scope_id)
    duration = limits.get("budget_duration")
    if "max_budget" not in limits and duration is None:
        return Scope(scope, scope_id, anchor, duration, ())
    first = await conn.fetchval("select sl_period_start($1, $2, now())", anchor, duration)
    following = await conn.fetchval("select sl_period_end($1, $2, $3)", anchor, duration, first)
    return Scope(scope, scope_id, anchor, duration, (first, following or first))


def usage(
    call_id: str, cost: str, customer: str, user: str | None, periods: Sequence[tuple[str, str, str]]
) -> UsageRecorded:
    now = datetime.now(UTC)
    return UsageRecorded(
        call_id=call_id, route="chat.completions", model_group="m", deployment_id="d", provider="openai",
        upstream_model="m", key_hash=KEY, user_id=user, customer_id=customer, status="success", http_status=200,
        input_tokens=3, output_tokens=2, total_tokens=5, cost=Decimal(cost), priced=True, started_at=now,
        ended_at=now + timedelta(milliseconds=1), budget_periods=tuple(periods),
    )  # fmt: skip


def as_json_array(events: Sequence[UsageRecorded]) -> str:
    """Events as the settle hands them to SQL (ledger/usage.py): each encode_event's, in an array."""
    return (b"[" + b",".join(encode_event(e) for e in events) + b"]").decode()


async def hand_over(pool: asyncpg.Pool, path: str, events: Sequence[UsageRecorded]) -> None:
    """Count a run of events and write their rows: by `sl_webhook_run` itself, or by appending
    them marked (as `sl_record_usage` appends a settle's event) and following the log."""
    if path == "sl_webhook_run":
        await pool.execute(
            "select sl_webhook_run($1::jsonb, $2::jsonb, true)", as_json_array(events), CONTEXT
        )
        return
    for event in events:
        await pool.execute(
            "insert into events (stream, version, type, data, metadata) "
            "values ('request:' || $1, 1, 'UsageRecorded', $2::jsonb, '{\"webhooks\": true}')",
            event.call_id, encode_event(event).decode(),
        )  # fmt: skip
    while (followed := await pool.fetchval("select sl_follow_webhooks(1000, $1::jsonb)", CONTEXT)) != 0:
        assert followed > 0, "another follower holds the checkpoint"


async def webhook_rows(pool: asyncpg.Pool, customer: str) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "select dedupe_key, call_id, payload::text from outbox "
        "where sink = 'webhook' and payload->>'customer_id' = $1 order by id",
        customer,
    )
    return [
        {"dedupe_key": r["dedupe_key"], "call_id": r["call_id"], **msgspec.json.decode(r["payload"])}
        for r in rows
    ]


def dedupe_key(line: str, scope: Scope, period: datetime | None) -> str:
    """As the outbox holds it: the line's event, the scope, its period's start in epoch seconds
    rounded half up (0: the lifetime, or a budget without a duration), the line."""
    micros = 0 if period is None else (period - EPOCH) // timedelta(microseconds=1)
    return f"{LINES[line]}:{scope.scope}:{scope.scope_id}:{(micros + 500_000) // 1_000_000}:{line}"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_one_row_per_line_per_period(shared_pool: asyncpg.Pool, case: Case, path: str) -> None:
    customer = f"{case.name} ({path})"
    user = f"user of {customer}"
    # Anchors on a whole second: see the test below for what a fraction does to the dedupe key.
    now = datetime.now(UTC).replace(microsecond=0)
    async with shared_pool.acquire() as conn:
        async with conn.transaction():
            await create_customer(conn, CustomerCreated(user_id=customer), case.limits, "test", now)
            await create_user(conn, UserCreated(user_id=user, **case.user_limits), "test", now)
        scopes = {
            "customer": await scope_of(conn, "customer", customer, case.limits),
            "user": await scope_of(conn, "user", user, case.user_limits),
        }
    requests = [r for run in case.runs for r in run]
    calls = [f"{customer} #{n}" for n in range(len(requests))]
    limits = {"customer": case.limits, "user": case.user_limits}
    in_force: list[dict[str, dict[str, Any]]] = []  # the limits each request was settled under
    n = 0
    for index, run in enumerate(case.runs):
        events = []
        for request in run:
            governed = [scopes["customer"], *([scopes["user"]] if request.user else [])]
            periods = [
                (s.scope, s.scope_id, s.periods[request.period].isoformat()) for s in governed if s.periods
            ]
            events.append(usage(calls[n], request.cost, customer, user if request.user else None, periods))
            in_force.append(dict(limits))
            n += 1
        await hand_over(shared_pool, path, events)
        if index == 0 and case.after_first_run:
            async with shared_pool.acquire() as conn, conn.transaction():
                await update_customer(
                    conn, CustomerUpdated(user_id=customer), case.after_first_run, "test", now
                )
            limits["customer"] = {**case.limits, **case.after_first_run}

    sent = await webhook_rows(shared_pool, customer)
    assert [w["call_id"] for w in sent if w["event"] == "spend_tracked"] == calls  # one each, crossing or not
    crossings = [w for w in sent if w["event"] != "spend_tracked"]
    expected = []
    for line, n, *named in case.crossed:
        scope = scopes[named[0] if named else "customer"]
        expected.append(
            (dedupe_key(line, scope, scope.periods[requests[n].period] if scope.periods else None), calls[n])
        )
    assert sorted((w["dedupe_key"], w["call_id"]) for w in crossings) == sorted(expected)

    # Each row tells the spend that crossed the line (the scope's running total in that period, or
    # over its lifetime), the limits in force, and when the period ends.
    for w in crossings:
        n = calls.index(w["call_id"])
        scope = scopes[w["event_group"]]
        period = requests[n].period
        counted = [r for r in requests[: n + 1] if (scope.scope == "customer" or r.user)
                   and (not scope.periods or r.period == period)]  # fmt: skip
        assert Decimal(str(w["spend"])) == sum(Decimal(r.cost) for r in counted), w
        assert w["event_id"] == w["dedupe_key"] and w["event"] == LINES[w["dedupe_key"].rsplit(":", 1)[1]]
        for name in ("max_budget", "soft_budget"):
            expected_limit = in_force[n][scope.scope].get(name)
            assert (None if w[name] is None else Decimal(str(w[name]))) == expected_limit, (name, w)
        start = scope.periods[period] if scope.periods else None
        end = await shared_pool.fetchval(
            "select sl_period_end($1, $2, $3)", scope.anchor, scope.duration, start
        )
        assert (
            None if w["budget_reset_at"] is None else datetime.fromisoformat(w["budget_reset_at"])
        ) == end, w
        assert (end is None) == (scope.duration is None)


async def test_a_refusal_that_announced_the_budget_leaves_the_crossing_nothing_to_write(
    shared_pool: asyncpg.Pool,
) -> None:
    """A refusal announces the budget under the key the crossing would write (sl_crossing_key),
    or a period would announce its budget twice."""
    customer = "refused first"
    async with shared_pool.acquire() as conn, conn.transaction():
        await create_customer(conn, CustomerCreated(user_id=customer), ONE, "test", datetime.now(UTC))
    asking = msgspec.structs.replace(admission("refused first #0", customer), hold=Decimal(2))
    refused = await admit_request(shared_pool, asking)
    assert isinstance(refused, Refused) and refused.reason == "budget_exceeded"
    await announce_budget_exhausted(shared_pool, refused, asking)
    async with shared_pool.acquire() as conn:
        scope = await scope_of(conn, "customer", customer, ONE)
    announced = dedupe_key("max", scope, scope.periods[0])
    assert [w["dedupe_key"] for w in await webhook_rows(shared_pool, customer)] == [announced]
    period = (("customer", customer, scope.periods[0].isoformat()),)
    await hand_over(shared_pool, "sl_webhook_run", [usage("refused first #1", "1", customer, None, period)])
    sent = [(w["dedupe_key"], w["call_id"]) for w in await webhook_rows(shared_pool, customer)]
    assert sorted(sent) == sorted([
        (announced, "refused first #0"),  # the refusal's, not written again
        (dedupe_key("85", scope, scope.periods[0]), "refused first #1"),
        (dedupe_key("95", scope, scope.periods[0]), "refused first #1"),
        ("spend_tracked:refused first #1", "refused first #1"),
    ])  # fmt: skip


async def test_webhook_rows_cross_from_the_values_they_are_given(shared_pool: asyncpg.Pool) -> None:
    """`sl_webhook_rows`: the values before the run (by the keys of sl_usage_value_keys) plus each
    request's cost, in order."""
    customer = "given values"
    async with shared_pool.acquire() as conn, conn.transaction():
        await create_customer(conn, CustomerCreated(user_id=customer), ONE, "test", datetime.now(UTC))
    async with shared_pool.acquire() as conn:
        scope = await scope_of(conn, "customer", customer, ONE)
        period = (("customer", customer, scope.periods[0].isoformat()),)
        value_key = await conn.fetchval(
            "select 'p|customer|' || $1 || '|' || $2::timestamptz::text", customer, scope.periods[0]
        )
        events = as_json_array([usage(f"{customer} #{n}", "0.05", customer, None, period) for n in range(3)])
        await conn.execute(
            "select sl_webhook_rows($1::jsonb, $2::jsonb, $3::jsonb)", events, CONTEXT,
            msgspec.json.encode({value_key: Decimal("0.8")}).decode(),
        )  # fmt: skip
    sent = [
        (w["dedupe_key"], w["call_id"])
        for w in await webhook_rows(shared_pool, customer)
        if w["event"] != "spend_tracked"
    ]
    # 0.8 + 0.05 lands on 85 %, + 0.05 more is 0.9: nothing, + 0.05 lands on 95 %
    assert sorted(sent) == [(dedupe_key("85", scope, scope.periods[0]), f"{customer} #0"),
                            (dedupe_key("95", scope, scope.periods[0]), f"{customer} #2")]  # fmt: skip


async def test_a_period_that_starts_inside_a_second_announces_its_budget_once(
    shared_pool: asyncpg.Pool,
) -> None:
    customer = "anchored at 0.6 s"
    anchor = datetime.now(UTC).replace(microsecond=600_000)
    limits = {"max_budget": Decimal(1), "budget_duration": "1d"}
    async with shared_pool.acquire() as conn, conn.transaction():
        await create_customer(conn, CustomerCreated(user_id=customer), limits, "test", anchor)
    async with shared_pool.acquire() as conn:
        scope = await scope_of(conn, "customer", customer, limits)
    period = (("customer", customer, scope.periods[0].isoformat()),)
    await hand_over(shared_pool, "sl_webhook_run", [usage(f"{customer} #0", "1", customer, None, period)])
    asking = msgspec.structs.replace(admission(f"{customer} #1", customer), hold=Decimal(2))
    refused = await admit_request(shared_pool, asking)
    assert isinstance(refused, Refused) and refused.reason == "budget_exceeded"
    await announce_budget_exhausted(shared_pool, refused, asking)
    announced = [
        w["dedupe_key"] for w in await webhook_rows(shared_pool, customer) if w["event"] == "budget_crossed"
    ]
    assert announced == [dedupe_key("max", scope, scope.periods[0])]
