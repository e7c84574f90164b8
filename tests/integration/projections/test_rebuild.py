"""Rebuild: the log replayed into fresh projections equals the live ones; differences are found;
the swap is safe while writers append."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import msgspec

from spendledger.ledger import directory, keys
from spendledger.ledger.admission import Admission, Admitted, admit_request
from spendledger.ledger.events import (
    BudgetDefined,
    BudgetUpdated,
    CustomerCreated,
    KeyGenerated,
    KeyUpdated,
    TeamCreated,
    UsageRecorded,
    decode_event,
)
from spendledger.ledger.scopes import BudgetSettings, Scopes
from spendledger.ledger.usage import RecordingContext, record_usage
from spendledger.projections.daily import catch_up
from spendledger.projections.rebuild import rebuild

CONTEXT = RecordingContext(default_budget_id="tier")
PINNED = keys.hash_key("sk-rebuild-pinned-key")
OLD_KEY = keys.hash_key("sk-rebuild-older-event")


async def request(
    pool: asyncpg.Pool, call_id: str, customer: str, key_hash: str, cost: str, team: str | None = None
) -> bool:
    """Admit and record one request as the proxy does; False if it was refused."""
    now = datetime.now(UTC)
    outcome = await admit_request(
        pool,
        Admission(
            call_id=call_id,
            route="chat.completions",
            model="m",
            scopes=Scopes(key_hash, team_id=team, customer_id=customer),
            hold=Decimal("0.01"),
            expires_at=now + timedelta(minutes=5),
            budgets=BudgetSettings(default_budget_id="tier"),
            refused_at=now,
        ),
    )
    if not isinstance(outcome, Admitted):
        return False
    event = UsageRecorded(
        call_id=call_id,
        route="chat.completions",
        model_group="m",
        deployment_id="d",
        provider="openai",
        upstream_model="m",
        key_hash=key_hash,
        customer_id=customer,
        team_id=team,
        status="success",
        http_status=200,
        input_tokens=7,
        output_tokens=3,
        total_tokens=10,
        cost=Decimal(cost),
        priced=True,
        started_at=now,
        ended_at=datetime.now(UTC),
        budget_periods=outcome.budget_periods,
    )
    await record_usage(pool, event, CONTEXT)
    return True


async def mixed_workload(pool: asyncpg.Pool) -> None:
    now = datetime.now(UTC)
    async with pool.acquire() as conn, conn.transaction():
        await directory.define_budget(
            conn, BudgetDefined(budget_id="tier", max_budget=Decimal("0.05")), "t", now
        )
        await directory.create_customer(
            conn,
            CustomerCreated(user_id="periodic"),
            {"max_budget": Decimal(1), "budget_duration": "1s"},
            "t",
            now,
        )
        await directory.create_team(conn, TeamCreated(team_id="team-a", max_budget=Decimal(5)), "t", now)
        spec = KeyGenerated(key_hash=keys.hash_key("sk-rebuild"), key_name="sk-...uild", key_alias="rb")
        await keys.generate_key(conn, spec, "sk-rebuild", "t", now)
        pinned = KeyGenerated(
            key_hash=PINNED, key_name="sk-...-key", allowed_customers=("periodic", "on-tier")
        )
        await keys.generate_key(conn, pinned, "sk-rebuild-pinned-key", "t", now)
        await _key_generated_before_allowed_customers(conn, now)
    key = spec.key_hash
    for i in range(6):  # the default tier refuses after its 0.05
        await request(pool, f"tiered-{i}", "on-tier", key, "0.0123456789")
    for i in range(3):
        await request(pool, f"team-{i}", "c-team", key, "0.001000000001", team="team-a")
    await request(pool, "periodic-1", "periodic", key, "0.0000001")
    await asyncio.sleep(1.1)  # a new budget period
    await request(pool, "periodic-2", "periodic", key, "0.0000002")
    async with pool.acquire() as conn, conn.transaction():
        later = datetime.now(UTC)
        await directory.update_budget(
            conn, BudgetUpdated(budget_id="tier", max_budget=Decimal(1)), "t", later
        )
        await keys.update_key(conn, KeyUpdated(key_hash=key, metadata={"x": 1}), "t", later)
        await keys.update_key(conn, KeyUpdated(key_hash=PINNED, allowed_customers=("periodic",)), "t", later)
    await request(pool, "tiered-after", "on-tier", key, "0.5")


async def _key_generated_before_allowed_customers(conn: asyncpg.Connection, now: datetime) -> None:
    """A KeyGenerated as written before issue 15: its JSON has no `allowed_customers`."""
    data = msgspec.json.encode({"type": "KeyGenerated", "key_hash": OLD_KEY, "key_name": "sk-...vent"})
    await conn.execute(
        "insert into events (stream, version, type, data, metadata) values ($1, 1, 'KeyGenerated', $2, $3)",
        keys.key_stream(OLD_KEY),
        data.decode(),
        msgspec.json.encode({"actor": "t", "at": now.isoformat()}).decode(),
    )
    await keys.apply_key_event(conn, decode_event(data), now)


async def allowed_customers(pool: asyncpg.Pool) -> dict[str, list[str]]:
    rows = await pool.fetch("select key_hash, allowed_customers from keys where key_hash = any($1::text[])",
                            [PINNED, OLD_KEY])  # fmt: skip
    return {row["key_hash"]: list(row["allowed_customers"]) for row in rows}


async def test_rebuild_equals_live_after_a_mixed_workload(pool: asyncpg.Pool, database_url: str) -> None:
    await mixed_workload(pool)
    assert await pool.fetchval("select count(*) from events where type = 'RequestRefused'") > 0
    assert (
        await pool.fetchval(
            "select count(*) from budget_usage where scope = 'customer' and scope_id = 'periodic'"
        )
        == 2
    )
    assert await allowed_customers(pool) == {PINNED: ["periodic"], OLD_KEY: []}
    report = await rebuild(database_url, verify_only=True)
    assert report.equal, report.differences
    assert report.events == await pool.fetchval("select count(*) from events")
    assert not report.swapped


async def test_a_planted_difference_is_reported_and_the_swap_repairs_it(
    pool: asyncpg.Pool, database_url: str
) -> None:
    await mixed_workload(pool)
    truth = await pool.fetchval("select spend from spend_totals where scope = 'team' and scope_id = 'team-a'")
    await pool.execute(
        "update spend_totals set spend = spend + 1 where scope = 'team' and scope_id = 'team-a'"
    )
    await pool.execute("update customers set alias = 'tampered' where user_id = 'periodic'")
    await pool.execute("update keys set allowed_customers = '{}' where key_hash = $1", PINNED)
    report = await rebuild(database_url, verify_only=True)
    assert set(report.differences) == {"spend_totals", "customers", "keys"}
    assert report.differences["spend_totals"]["rows"] == 2  # one row only live, its true twin only rebuilt
    report = await rebuild(database_url)
    assert report.swapped
    assert (
        await pool.fetchval("select spend from spend_totals where scope = 'team' and scope_id = 'team-a'")
        == truth
    )
    assert await pool.fetchval("select alias from customers where user_id = 'periodic'") is None
    assert await allowed_customers(pool) == {PINNED: ["periodic"], OLD_KEY: []}
    assert (await rebuild(database_url, verify_only=True)).equal
    # The scope triggers (0011) came along: changes to users still reach the key caches.
    assert await pool.fetchval("select count(*) from pg_trigger where tgname like '%\\_changed'") == 5
    # The swapped-in directory keeps its history for the webhook follower (migration 0012).
    await pool.execute("delete from directory_history")
    for table, id_column in (("keys", "key_hash"), ("customers", "user_id"), ("budgets", "budget_id"),
                             ("teams", "team_id"), ("users", "user_id")):  # fmt: skip
        await pool.execute(f"update {table} set created_at = created_at - interval '1 day' "
                           f"where {id_column} = (select min({id_column}) from {table})")  # fmt: skip
    remembered = await pool.fetch("select distinct entity from directory_history")
    assert await pool.fetchval("select count(*) from pg_trigger where tgname = 'sl_directory_history'") == 5
    assert {r["entity"] for r in remembered} >= {"keys", "customers", "budgets", "teams"}


async def test_the_swap_is_safe_while_writers_append(pool: asyncpg.Pool, database_url: str) -> None:
    await mixed_workload(pool)
    key = keys.hash_key("sk-rebuild")
    stop = asyncio.Event()

    async def writer(n: int) -> int:
        done = 0
        while not stop.is_set():
            await request(pool, f"live-{n}-{done}", f"busy-{n % 3}", key, "0.000001")
            done += 1
        return done

    writers = [asyncio.create_task(writer(n)) for n in range(4)]
    await asyncio.sleep(0.3)
    report = await rebuild(database_url)
    await asyncio.sleep(0.3)
    stop.set()
    written = sum(await asyncio.gather(*writers))
    assert report.swapped and written > 0
    after = await rebuild(database_url, verify_only=True)
    assert after.equal, after.differences
    assert await pool.fetchval("select count(*) from spend_logs where request_id like 'live-%'") == written
    assert await pool.fetchval("select coalesce(sum(held), 0) from budget_usage") == 0
    # The reporting projection starts over and catches up to the same totals as the log.
    await catch_up(pool)
    daily = await pool.fetchval("select sum(spend) from daily_spend where scope = 'key'")
    logged = await pool.fetchval(
        "select sum((data->>'cost')::numeric) from events where type = 'UsageRecorded'"
    )
    assert daily == logged
