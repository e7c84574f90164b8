"""A batch admits exactly as the same requests admitted one by one, in order: the same outcomes
(holds, every kind of refusal, remaining limits) and the same rows and events afterwards."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from spendledger.ledger.admission import Admission, Admitted, Refused, admit_request, admit_requests
from spendledger.ledger.directory import create_customer, create_team, create_user
from spendledger.ledger.events import CustomerCreated, KeyGenerated, TeamCreated, UserCreated
from spendledger.ledger.keys import generate_key, hash_key
from spendledger.ledger.scopes import BudgetSettings, Scopes
from tests.support import PostgresForTests

NOW = datetime.now(UTC)
KEY = hash_key("sk-equivalence")


async def directory(conn: asyncpg.Connection, *, team_blocked: bool = False) -> None:
    async with conn.transaction():
        await create_user(
            conn, UserCreated(user_id="u", max_budget=Decimal("5"), models=("m", "m2"), rpm_limit=40), "t", NOW
        )
        await create_team(
            conn,
            TeamCreated(team_id="t", blocked=team_blocked, tpm_limit=10**6, max_parallel_requests=25),
            "t",
            NOW,
        )
        key = KeyGenerated(
            key_hash=KEY, key_name="sk-...ence", user_id="u", team_id="t", max_budget=Decimal("3"),
            budget_duration="30d", rpm_limit=12, max_parallel_requests=20,
        )  # fmt: skip
        await generate_key(conn, key, "sk-equivalence", "t", NOW)
        await create_customer(conn, CustomerCreated(user_id="c"), {"max_budget": Decimal("0.75")}, "t", NOW)


def admissions() -> list[Admission]:
    """Holds that run the customer's budget out first, then smaller ones up to the key's rpm; one
    model the user may not use."""

    def one(i: int) -> Admission:
        return Admission(
            call_id=f"eq-{i}", route="chat.completions", model="m3" if i == 5 else ("m2" if i % 4 else "m"),
            scopes=Scopes(KEY, "u", "t", "c"), key_alias="alias",
            hold=Decimal("0.1") if i < 10 else Decimal("0.001"), expires_at=NOW + timedelta(hours=1),
            budgets=BudgetSettings(global_max_budget=Decimal("100"), global_budget_duration="1mo"),
            refused_at=NOW,
        )  # fmt: skip

    return [one(i) for i in range(36)]


def comparable(outcome: Admitted | Refused) -> tuple[Any, ...]:
    if isinstance(outcome, Admitted):
        return ("admitted", outcome.budget_periods, outcome.remaining_requests, outcome.remaining_tokens)
    detail = {k: v for k, v in outcome.detail.items() if k != "retry_after"}  # a countdown to the next minute
    return ("refused", outcome.reason, outcome.scope, outcome.scope_id, sorted(detail.items(), key=str))


STATE = {
    "budget_usage": "select scope, scope_id, period_start, spent, held from budget_usage order by 1, 2, 3",
    "rate_usage": "select scope, scope_id, window_start, requests, tokens from rate_usage order by 1, 2, 3",
    "in_flight": "select scope, scope_id, count from in_flight order by 1, 2",
    "holds": "select call_id, amount, budget_rows, parallel_rows, tpm_rows from holds order by 1",
    # retry_after counts down to the next minute: two runs a second apart differ in it
    "refusals": "select stream, data - 'refused_at' #- '{detail,retry_after}' as data, metadata from events "
    "where type = 'RequestRefused' order by stream",
}


def untouched(row: tuple[Any, ...]) -> bool:
    """A counter row still at zero: a batch that refused everyone may leave one where a lone
    refusal's rollback leaves none; no reader tells them apart."""
    return all(v == 0 for v in row if isinstance(v, int | Decimal))


async def state(conn: asyncpg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    return {
        name: [tuple(r) for r in await conn.fetch(sql) if name in ("holds", "refusals") or not untouched(tuple(r))]
        for name, sql in STATE.items()
    }


@pytest.fixture
def other_database_url(postgres: PostgresForTests) -> Iterator[str]:
    url = postgres.new_database()
    yield url
    postgres.drop_database(url)


@pytest.fixture
async def two_databases(
    database_url: str, other_database_url: str
) -> AsyncIterator[tuple[asyncpg.Connection, asyncpg.Connection]]:
    conns = [await asyncpg.connect(database_url), await asyncpg.connect(other_database_url)]
    yield conns[0], conns[1]
    for conn in conns:
        await conn.close()


async def one_by_one(conn: asyncpg.Connection, batch: Sequence[Admission]) -> list[Admitted | Refused]:
    return [await admit_request(conn, admission) for admission in batch]


@pytest.mark.parametrize("team_blocked", [False, True])
async def test_a_batch_decides_and_writes_as_one_by_one(
    two_databases: tuple[asyncpg.Connection, asyncpg.Connection], team_blocked: bool
) -> None:
    alone, batched = two_databases
    for conn in (alone, batched):
        await directory(conn, team_blocked=team_blocked)
    expected = await one_by_one(alone, admissions())
    got = await admit_requests(batched, admissions())
    assert [comparable(o) for o in got] == [comparable(o) for o in expected]
    kinds = {comparable(o)[0] if isinstance(o, Admitted) else o.reason for o in expected}
    if team_blocked:  # the user's model list comes before the team, in scope order
        assert kinds == {"model_access_denied", "scope_blocked"}
    else:  # the scenario reaches every outcome it is meant to
        assert kinds == {"admitted", "budget_exceeded", "model_access_denied", "rate_limit_exceeded"}
    assert await state(batched) == await state(alone)
