"""Every refusal built by SQL decodes: for each reason `sl_admit` and `sl_admit_many` can give, the
directory is set up so that it refuses, and the `RequestRefused` event appended in the refusal's
place decodes through `ledger.events.decode_event` — the checked vocabulary — and says what the
outcome (ledger/admission.py's `Refused`) says. A customer created on first sight by SQL
(`sl_customer_first_seen`) decodes too: those are the events the ledger's SQL writes itself."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final

import asyncpg
import msgspec
import pytest

from spendledger.ledger.admission import Admission, Admitted, Refused, admit_request, admit_requests
from spendledger.ledger.directory import create_customer, create_team, create_user, set_customer_blocked
from spendledger.ledger.events import (
    CustomerCreated,
    KeyGenerated,
    RequestRefused,
    TeamCreated,
    UserCreated,
    decode_event,
)
from spendledger.ledger.keys import generate_key, hash_key
from spendledger.ledger.scopes import NO_BUDGETS, BudgetSettings, Scopes

NOW: Final = datetime.now(UTC)
# Money stays exact where the test compares it (the event's `detail` is free-form JSON).
_exact: Final = msgspec.json.Decoder(float_hook=Decimal)


@dataclass(frozen=True)
class Setup:
    """One way to be refused: the directory it needs, how many requests go first (admitted), and
    what the refusal must say."""

    reason: str
    scope: str
    detail: dict[str, Any]  # a part of the refusal's detail
    directory: Callable[[asyncpg.Connection, str], Awaitable[Scopes]]  # builds it, for a unique name
    first: int = 0  # requests admitted before the refused ones
    model: str = "m"
    hold: Decimal = Decimal("0.01")
    budgets: BudgetSettings = NO_BUDGETS


async def key(conn: asyncpg.Connection, name: str, **fields: Any) -> str:
    plaintext = f"sk-{name}"
    spec = KeyGenerated(key_hash=hash_key(plaintext), key_name="sk-...", **fields)
    await generate_key(conn, spec, plaintext, "test", NOW)
    return spec.key_hash


async def customer_over_budget(conn: asyncpg.Connection, name: str) -> Scopes:
    await create_customer(
        conn,
        CustomerCreated(user_id=name),
        {"max_budget": Decimal("0.5"), "budget_duration": "1mo"},
        "test",
        NOW,
    )
    return Scopes(await key(conn, name), customer_id=name)


async def key_over_budget(conn: asyncpg.Connection, name: str) -> Scopes:
    return Scopes(await key(conn, name, max_budget=Decimal("0.005")))


async def plain_key(conn: asyncpg.Connection, name: str) -> Scopes:
    return Scopes(await key(conn, name))


async def rpm_of_one(conn: asyncpg.Connection, name: str) -> Scopes:
    return Scopes(await key(conn, name, rpm_limit=1))


async def tpm_spent(conn: asyncpg.Connection, name: str) -> Scopes:
    scopes = Scopes(await key(conn, name, tpm_limit=5))
    await conn.execute(  # this minute's tokens already at the limit (and the next minute's, should it turn)
        "insert into rate_usage (scope, scope_id, window_start, tokens) "
        "select 'key', $1, date_trunc('minute', now()) + m * interval '1 minute', 5 from generate_series(0, 1) as m",
        scopes.key_hash,
    )
    return scopes


async def one_in_flight(conn: asyncpg.Connection, name: str) -> Scopes:
    return Scopes(await key(conn, name, max_parallel_requests=1))


async def blocked_customer(conn: asyncpg.Connection, name: str) -> Scopes:
    await set_customer_blocked(conn, name, True, "test", NOW)
    return Scopes(await key(conn, name), customer_id=name)


async def blocked_team(conn: asyncpg.Connection, name: str) -> Scopes:
    await create_team(conn, TeamCreated(team_id=name, blocked=True), "test", NOW)
    return Scopes(await key(conn, name, team_id=name), team_id=name)


async def user_without_the_model(conn: asyncpg.Connection, name: str) -> Scopes:
    await create_user(conn, UserCreated(user_id=name, models=("another-model",)), "test", NOW)
    return Scopes(await key(conn, name, user_id=name), user_id=name)


async def team_without_the_model(conn: asyncpg.Connection, name: str) -> Scopes:
    await create_team(conn, TeamCreated(team_id=name, models=("another-model", "m-")), "test", NOW)
    return Scopes(await key(conn, name, team_id=name), team_id=name)


BUDGET: Final = ("max_budget", "spend", "held", "hold", "budget_reset_at", "period_start", "soft_budget")
SETUPS: Final = {
    "budget_exceeded (customer, 1mo)": Setup("budget_exceeded", "customer", dict.fromkeys(BUDGET), customer_over_budget, hold=Decimal(1)),
    "budget_exceeded (key, for ever)": Setup("budget_exceeded", "key", dict.fromkeys(BUDGET), key_over_budget),
    "budget_exceeded (global)": Setup(
        "budget_exceeded", "global", dict.fromkeys(BUDGET), plain_key, hold=Decimal(2),
        budgets=BudgetSettings(global_max_budget=Decimal(1), global_budget_duration="30d"),
    ),
    "rate_limit_exceeded (rpm)": Setup("rate_limit_exceeded", "key", {"limit_type": "rpm", "limit": 1, "retry_after": None}, rpm_of_one, first=1),
    "rate_limit_exceeded (tpm)": Setup("rate_limit_exceeded", "key", {"limit_type": "tpm", "limit": 5, "used": 5, "retry_after": None}, tpm_spent),
    "rate_limit_exceeded (max_parallel_requests)": Setup(
        "rate_limit_exceeded", "key", {"limit_type": "max_parallel_requests", "limit": 1, "retry_after": 1}, one_in_flight, first=1,
    ),
    "customer_blocked": Setup("customer_blocked", "customer", {}, blocked_customer),
    "scope_blocked (team)": Setup("scope_blocked", "team", {}, blocked_team),
    "model_access_denied (user)": Setup("model_access_denied", "user", {"models": ["another-model"]}, user_without_the_model),
    "model_access_denied (team)": Setup("model_access_denied", "team", {"models": ["another-model", "m-"]}, team_without_the_model),
}  # fmt: skip


@pytest.fixture(scope="module")
async def shared_pool(shared_database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """The cases share a database: each builds keys, users, teams and customers of its own."""
    pool = await asyncpg.create_pool(shared_database_url, min_size=1, max_size=4)
    assert pool is not None
    yield pool
    await pool.close()


def admission(call_id: str, scopes: Scopes, setup: Setup) -> Admission:
    return Admission(
        call_id=call_id, route="chat.completions", model=setup.model, scopes=scopes, key_alias="alias",
        hold=setup.hold, expires_at=NOW + timedelta(hours=1), budgets=setup.budgets, refused_at=NOW,
        actor="master_key",
    )  # fmt: skip


async def refused_event(
    pool: asyncpg.Pool, call_id: str
) -> tuple[RequestRefused, dict[str, Any], dict[str, Any]]:
    """The request's RequestRefused, decoded by ledger/events.py; its data and metadata as stored."""
    row = await pool.fetchrow(
        "select type, data::text, metadata::text from events where stream = $1", f"request:{call_id}"
    )
    assert row is not None, f"no event for {call_id}"
    event = decode_event(row["data"])
    assert isinstance(event, RequestRefused) and row["type"] == "RequestRefused"
    return event, _exact.decode(row["data"]), _exact.decode(row["metadata"])


@pytest.mark.parametrize("batched", [False, True], ids=["sl_admit", "sl_admit_many"])
@pytest.mark.parametrize("name", list(SETUPS))
async def test_every_refusal_sql_builds_decodes(shared_pool: asyncpg.Pool, name: str, batched: bool) -> None:
    setup = SETUPS[name]
    unique = f"{name} via {'sl_admit_many' if batched else 'sl_admit'}".replace(" ", "-")
    async with shared_pool.acquire() as conn, conn.transaction():
        scopes = await setup.directory(conn, unique)
    admissions = [admission(f"{unique}/{n}", scopes, setup) for n in range(setup.first + 2)]
    if batched:
        outcomes = await admit_requests(shared_pool, admissions)
    else:
        outcomes = [await admit_request(shared_pool, a) for a in admissions]
    assert all(isinstance(o, Admitted) for o in outcomes[: setup.first]), outcomes
    for asked, outcome in zip(admissions[setup.first :], outcomes[setup.first :], strict=True):
        assert isinstance(outcome, Refused), outcome
        assert (outcome.reason, outcome.scope) == (setup.reason, setup.scope)
        expected_id = {"global": "global", "key": scopes.key_hash, "user": scopes.user_id,
                       "team": scopes.team_id, "customer": scopes.customer_id}[setup.scope]  # fmt: skip
        assert outcome.scope_id == expected_id
        assert set(setup.detail) <= set(outcome.detail), outcome.detail
        assert {k: outcome.detail[k] for k, v in setup.detail.items() if v is not None} == {
            k: v for k, v in setup.detail.items() if v is not None
        }
        assert outcome.message() and outcome.retry_after >= 1

        event, data, metadata = await refused_event(shared_pool, asked.call_id)
        assert (event.reason, event.scope, event.scope_id) == (
            outcome.reason,
            outcome.scope,
            outcome.scope_id,
        )
        assert event.scopes == asked.scopes
        assert (event.call_id, event.route, event.model_group, event.key_alias) == (
            asked.call_id, asked.route, asked.model, asked.key_alias,
        )  # fmt: skip
        assert event.refused_at == asked.refused_at
        assert data["detail"] == outcome.detail  # the outcome is the event's detail, to the digit
        assert metadata == {"actor": "master_key"}
        if setup.reason == "budget_exceeded":
            assert Decimal(data["detail"]["hold"]) == asked.hold
            assert datetime.fromisoformat(data["detail"]["period_start"]) <= NOW + timedelta(minutes=1)


async def test_a_customer_seen_first_by_sql_decodes(shared_pool: asyncpg.Pool) -> None:
    """`sl_customer_first_seen` builds CustomerCreated in SQL: it decodes as the Python-built one."""
    async with shared_pool.acquire() as conn, conn.transaction():
        scopes = await plain_key(conn, "first-sight")
    setup = Setup("", "", {}, plain_key, budgets=BudgetSettings(default_budget_id="tier-not-yet-created"))
    outcome = await admit_request(
        shared_pool, admission("first-sight/0", msgspec.structs.replace(scopes, customer_id="new"), setup)
    )
    assert isinstance(outcome, Admitted)
    row = await shared_pool.fetchrow("select data::text from events where stream = 'customer:new'")
    assert row is not None
    assert decode_event(row["data"]) == CustomerCreated(
        user_id="new", budget_id="tier-not-yet-created", source="first_sight"
    )
