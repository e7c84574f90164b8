"""Settle batches change the rows admissions share last, and the webhook rows their events get (from
the follower of the log, 0012) are those of settling the requests one by one, in order. A batch of
one goes through `sl_record_usage` (0010), so "one by one" here is also that path against the
batch's."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import msgspec
import pytest

from spendledger.ledger.admission import Admitted, admit_request
from spendledger.ledger.directory import create_customer
from spendledger.ledger.events import CustomerCreated, UsageRecorded
from spendledger.ledger.usage import Recording, RecordingContext, record_usages
from spendledger.ledger.webhook_rows import catch_up_webhooks
from tests.integration.ledger.test_group_admitter import admission

WEBHOOKS = RecordingContext(webhooks=True)


async def budgeted(pool: asyncpg.Pool, customer: str, max_budget: str) -> None:
    await limited(pool, customer, {"max_budget": Decimal(max_budget)})


async def limited(pool: asyncpg.Pool, customer: str, limits: dict[str, Any]) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await create_customer(conn, CustomerCreated(user_id=customer), limits, "test", datetime.now(UTC))


async def admitted(pool: asyncpg.Pool, call_id: str, customer: str) -> Admitted:
    outcome = await admit_request(pool, msgspec.structs.replace(admission(call_id, customer), hold=Decimal("0.0001")))
    assert isinstance(outcome, Admitted)
    return outcome


def usage(call_id: str, customer: str, cost: str, periods: tuple[tuple[str, str, str], ...]) -> UsageRecorded:
    now = datetime.now(UTC)
    return UsageRecorded(
        call_id=call_id, route="chat.completions", model_group="m", deployment_id="d", provider="openai",
        upstream_model="m", key_hash="k" * 64, customer_id=customer, status="success", http_status=200,
        input_tokens=3, output_tokens=2, total_tokens=5, cost=Decimal(cost), priced=True, started_at=now,
        ended_at=now + timedelta(milliseconds=1), budget_periods=periods,
    )  # fmt: skip


async def webhooks(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    """The webhook rows, once the follower has written those of every settled event."""
    await catch_up_webhooks(pool, WEBHOOKS)
    rows = await pool.fetch("select call_id, payload::text from outbox where sink = 'webhook' order by id")
    return [{"call_id": r["call_id"], **json.loads(r["payload"])} for r in rows]


async def recordings(pool: asyncpg.Pool, customer: str, costs: list[str]) -> list[Recording]:
    out = []
    for i, cost in enumerate(costs):
        outcome = await admitted(pool, f"{customer}-{i}", customer)
        out.append(Recording(event=usage(f"{customer}-{i}", customer, cost, outcome.budget_periods)))
    return out


async def test_a_crossing_inside_a_batch_is_announced_once_by_the_request_that_crossed(
    pool: asyncpg.Pool,
) -> None:
    await budgeted(pool, "one-dollar", "1")
    batch = await recordings(pool, "one-dollar", ["0.25"] * 5)
    spends = await record_usages(pool, batch, WEBHOOKS)
    assert spends == [Decimal("0.25") * n for n in range(1, 6)]  # the key's spend after each request
    sent = await webhooks(pool)
    tracked = [w for w in sent if w["event"] == "spend_tracked"]
    assert [Decimal(str(w["total_spend"])) for w in tracked] == [Decimal("0.25") * n for n in range(1, 6)]
    crossings = sorted((w["event"], w["call_id"], Decimal(str(w["spend"]))) for w in sent if w not in tracked)
    assert crossings == [
        ("budget_crossed", "one-dollar-3", Decimal(1)),
        ("threshold_crossed", "one-dollar-3", Decimal(1)),
        ("threshold_crossed", "one-dollar-3", Decimal(1)),
    ]
    row = await pool.fetchrow("select spent, held from budget_usage where scope = 'customer'")
    assert row is not None and row["spent"] == Decimal("1.25") and row["held"] == 0
    totals = await pool.fetchrow("select spend, requests from spend_totals where scope = 'customer'")
    assert totals is not None and totals["spend"] == Decimal("1.25") and totals["requests"] == 5


async def settle_while_another_process_adds(pool: asyncpg.Pool, batch: list[Recording], amount: str) -> None:
    """Settle `batch` while another process's settle of `amount` holds the customer's budget row:
    ours reads the values without locks, then waits for the row, then finds it changed."""
    other = await pool.acquire()
    try:
        transaction = other.transaction()
        await transaction.start()
        await other.execute("update budget_usage set spent = spent + $1::numeric where scope = 'customer'", amount)
        ours = asyncio.create_task(record_usages(pool, batch, WEBHOOKS))
        for _ in range(200):
            waiting = await pool.fetchval(
                "select count(*) from pg_stat_activity where datname = current_database() "
                "and wait_event_type = 'Lock'"
            )
            if waiting:
                break
            await asyncio.sleep(0.02)
        assert waiting, "our settle never waited for the budget row"
        await transaction.commit()
        await ours
    finally:
        await pool.release(other)


@pytest.mark.parametrize("size", [1, 3], ids=["lone", "batch"])
async def test_a_settle_waiting_for_a_row_another_process_changed_counts_onto_the_locked_value(
    pool: asyncpg.Pool, size: int
) -> None:
    """The shared rows are changed last, from what they hold once locked: nothing another process
    wrote in between is lost. The webhooks follow the log (0012), so its values are the log's."""
    await budgeted(pool, "contended", "1")
    await settle_while_another_process_adds(pool, await recordings(pool, "contended", ["0.2"] * size), "0.5")
    row = await pool.fetchrow("select spent, held from budget_usage where scope = 'customer'")
    assert row is not None and row["spent"] == Decimal("0.5") + Decimal("0.2") * size and row["held"] == 0
    sent = await webhooks(pool)
    tracked = [Decimal(str(w["total_spend"])) for w in sent if w["event"] == "spend_tracked"]
    assert tracked == [Decimal("0.2") * n for n in range(1, size + 1)]  # the other write is no event


def _comparable(row: dict[str, Any], name: str) -> dict[str, Any]:
    """A webhook row with its customer's name replaced, and without the times that follow the clock
    (the request's end, the period's end: only whether there is one)."""
    text = json.dumps({k: v for k, v in row.items() if k not in ("created_at", "budget_reset_at")})
    return {**json.loads(text.replace(name, "c")), "resets": row.get("budget_reset_at") is not None}


@pytest.mark.parametrize(
    "limits",
    [
        {"max_budget": Decimal(1), "soft_budget": Decimal("0.5"), "budget_duration": "30d"},
        {"max_budget": Decimal(1)},  # lifetime budget: no period
        {"soft_budget": Decimal("0.6")},  # a soft budget alone: its line is on the lifetime spend
    ],
    ids=["period", "lifetime", "soft-only"],
)
async def test_the_webhook_rows_of_a_batch_are_those_of_its_requests_recorded_one_by_one(
    pool: asyncpg.Pool, limits: dict[str, Any]
) -> None:
    costs = ["0.2", "0.25", "0.3", "0", "0.1", "0.4", "0.05", "0.3"]
    await limited(pool, "batched", limits)
    await limited(pool, "alone", limits)
    await record_usages(pool, await recordings(pool, "batched", costs), WEBHOOKS)
    for recording in await recordings(pool, "alone", costs):
        await record_usages(pool, [recording], WEBHOOKS)
    sent = await webhooks(pool)
    batched = [_comparable(w, "batched") for w in sent if w["call_id"].startswith("batched-")]
    alone = [_comparable(w, "alone") for w in sent if w["call_id"].startswith("alone-")]
    assert batched == alone
    totals = await pool.fetch("select scope_id, spend, requests from spend_totals where scope = 'customer' order by 1")
    assert [(r["spend"], r["requests"]) for r in totals] == [(sum(map(Decimal, costs)), len(costs))] * 2
    budget = {
        r["scope_id"]: (r["spent"], r["held"])
        for r in await pool.fetch("select scope_id, spent, held from budget_usage where scope = 'customer'")
    }
    assert budget.get("batched") == budget.get("alone")
    assert all(held == 0 for _, held in budget.values())
    events = [w["event"] for w in batched]
    assert events.count("spend_tracked") == len(costs)
    assert {"budget_crossed", "soft_budget_crossed"} & set(events)  # lines were crossed, not only tracked
