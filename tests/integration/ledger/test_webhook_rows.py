"""The webhook rows follow the log (migration 0012): a settle marks its event, and the follower writes
its rows after the response — exactly once, in log order, behind writers that commit out of order."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg

from spendledger.ledger.directory import update_customer
from spendledger.ledger.events import CustomerUpdated
from spendledger.ledger.usage import NO_CONTEXT, Recording, RecordingContext, record_usages
from spendledger.ledger.webhook_rows import (
    WebhookFollower,
    catch_up_webhooks,
    follow_webhooks,
    webhook_follower_lag,
)
from tests.integration.ledger.test_settle_batches import budgeted, recordings

WEBHOOKS = RecordingContext(webhooks=True)


async def rows(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    found = await pool.fetch("select call_id, payload::text from outbox where sink = 'webhook' order by id")
    return [{"call_id": r["call_id"], **json.loads(r["payload"])} for r in found]


async def log_order(pool: asyncpg.Pool, customer: str) -> list[tuple[str, Decimal]]:
    """The customer's usage events as the log orders them: (call id, cost)."""
    found = await pool.fetch(
        "select data->>'call_id' as call, (data->>'cost')::numeric as cost from events "
        "where type = 'UsageRecorded' and data->>'customer_id' = $1 order by txid, position",
        customer,
    )
    return [(r["call"], r["cost"]) for r in found]


def running(costs: list[tuple[str, Decimal]]) -> dict[str, Decimal]:
    total, out = Decimal(0), {}
    for call, cost in costs:
        total += cost
        out[call] = total
    return out


def lines(sent: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The crossing rows: (event, the line's tag as the dedupe key ends, call id)."""
    return sorted((w["event"], w["event_id"].rsplit(":", 1)[1], w["call_id"]) for w in sent
                  if w["event"] != "spend_tracked")  # fmt: skip


async def test_the_settle_marks_its_event_and_the_follower_writes_its_rows_once(pool: asyncpg.Pool) -> None:
    await budgeted(pool, "acme", "1")
    for recording in await recordings(pool, "acme", ["0.25"] * 5):
        await record_usages(pool, [recording], WEBHOOKS)
    assert await rows(pool) == []  # nothing on the response's path
    marks = await pool.fetch("select metadata from events where type = 'UsageRecorded'")
    assert [json.loads(m["metadata"]) for m in marks] == [{"webhooks": True}] * 5
    assert await catch_up_webhooks(pool, WEBHOOKS) >= 5
    sent = await rows(pool)
    tracked = [(w["call_id"], Decimal(str(w["total_spend"]))) for w in sent if w["event"] == "spend_tracked"]
    assert tracked == [(f"acme-{i}", Decimal("0.25") * (i + 1)) for i in range(5)]
    assert lines(sent) == [("budget_crossed", "max", "acme-3"), ("threshold_crossed", "85", "acme-3"),
                           ("threshold_crossed", "95", "acme-3")]  # fmt: skip
    assert await follow_webhooks(pool, WEBHOOKS) == 0
    assert await rows(pool) == sent  # followed again: nothing twice


async def test_events_settled_without_webhooks_are_counted_and_get_no_rows(pool: asyncpg.Pool) -> None:
    await budgeted(pool, "quiet", "1")
    batch = await recordings(pool, "quiet", ["0.3"] * 4)
    await record_usages(pool, batch[:3], NO_CONTEXT)  # 0.9: past 85% while webhooks were off
    await record_usages(pool, batch[3:], WEBHOOKS)  # 1.2: past 95% and the budget
    await catch_up_webhooks(pool, WEBHOOKS)
    sent = await rows(pool)
    assert [(w["call_id"], Decimal(str(w["total_spend"]))) for w in sent if w["event"] == "spend_tracked"] == [
        ("quiet-3", Decimal("1.2"))
    ]
    assert lines(sent) == [("budget_crossed", "max", "quiet-3"), ("threshold_crossed", "95", "quiet-3")]


async def set_max_budget(pool: asyncpg.Pool, customer: str, max_budget: str) -> None:
    async with pool.acquire() as conn, conn.transaction():
        limits = {"max_budget": Decimal(max_budget)}
        await update_customer(conn, CustomerUpdated(user_id=customer), limits, "test", datetime.now(UTC))


async def test_crossings_are_judged_by_the_limits_in_force_where_the_event_stands_in_the_log(
    pool: asyncpg.Pool,
) -> None:
    """The budget moves between the settles and the follower: each request is announced against
    the limits it was settled under, not those in force when the follower reads it."""
    await budgeted(pool, "moving", "1")
    admitted = await recordings(pool, "moving", ["0.3"] * 4)
    await record_usages(pool, admitted[:3], WEBHOOKS)  # 0.9 of 1: past 85%
    await set_max_budget(pool, "moving", "10")
    await record_usages(pool, admitted[3:], WEBHOOKS)  # 1.2 of 10: nothing crossed
    await set_max_budget(pool, "moving", "1.1")  # after both: moves nothing already settled
    assert await pool.fetchval("select count(*) from directory_history") == 2
    await catch_up_webhooks(pool, WEBHOOKS)
    sent = await rows(pool)
    assert lines(sent) == [("threshold_crossed", "85", "moving-2")]
    [crossing] = [w for w in sent if w["event"] != "spend_tracked"]
    assert Decimal(str(crossing["max_budget"])) == 1
    tracked = [(w["call_id"], Decimal(str(w["max_budget"]))) for w in sent if w["event"] == "spend_tracked"]
    assert tracked == [("moving-0", 1), ("moving-1", 1), ("moving-2", 1), ("moving-3", 10)]
    assert await pool.fetchval("select count(*) from directory_history") == 0  # followed past: let go


async def test_concurrent_settles_are_announced_in_log_order_each_line_once(pool: asyncpg.Pool) -> None:
    """Four writers settle one customer's requests at once, alone and in batches, while the
    follower runs: the rows count the spend forward in the log's order, and each line is crossed
    by exactly the request that took the running spend past it."""
    await budgeted(pool, "busy", "1")
    pending = await recordings(pool, "busy", [str(Decimal(random.randint(1, 9)) / 100) for _ in range(48)])
    stop = asyncio.Event()

    async def writer(mine: list[Recording]) -> None:
        while mine:
            size = random.choice([1, 1, 2, 3])
            await record_usages(pool, mine[:size], WEBHOOKS)
            del mine[:size]

    async def follower() -> None:
        while not stop.is_set():
            await follow_webhooks(pool, WEBHOOKS, batch=5)
            await asyncio.sleep(0.002)

    following = asyncio.create_task(follower())
    await asyncio.gather(*(writer(pending[n::4]) for n in range(4)))
    stop.set()
    await following
    await catch_up_webhooks(pool, WEBHOOKS)
    sent = await rows(pool)
    order = await log_order(pool, "busy")
    totals = running(order)
    tracked = {w["call_id"]: Decimal(str(w["total_spend"])) for w in sent if w["event"] == "spend_tracked"}
    assert tracked == totals and len([w for w in sent if w["event"] == "spend_tracked"]) == 48
    expected = []
    for tag, event, line in (("max", "budget_crossed", Decimal(1)), ("85", "threshold_crossed", Decimal("0.85")),
                             ("95", "threshold_crossed", Decimal("0.95"))):  # fmt: skip
        crossing = next((call for call, cost in order if totals[call] - cost < line <= totals[call]), None)
        if crossing is not None:
            expected.append((event, tag, crossing))
    assert lines(sent) == sorted(expected) and expected  # the budget was crossed, and announced once


async def test_a_writer_that_commits_late_is_followed_in_its_place(pool: asyncpg.Pool, database_url: str) -> None:
    """The follower stops below the oldest transaction still open: a settle that took its txid
    early and commits late is never skipped."""
    await budgeted(pool, "late", "100")
    early, later = await recordings(pool, "late", ["0.5", "0.25"])
    slow = await asyncpg.connect(database_url)
    try:
        transaction = slow.transaction()
        await transaction.start()
        await slow.execute("select pg_current_xact_id()")  # the older txid
        await record_usages(pool, [later], WEBHOOKS)
        await catch_up_webhooks(pool, WEBHOOKS)
        assert await rows(pool) == []  # not past the open transaction
        await record_usages(slow, [early], WEBHOOKS)
        await transaction.commit()
    finally:
        await slow.close()
    await catch_up_webhooks(pool, WEBHOOKS)
    tracked = [(w["call_id"], Decimal(str(w["total_spend"]))) for w in await rows(pool) if w["event"] == "spend_tracked"]
    assert tracked == [("late-0", Decimal("0.5")), ("late-1", Decimal("0.75"))]  # the log's order


async def test_a_follower_that_dies_before_its_commit_leaves_the_batch_to_the_next(
    pool: asyncpg.Pool, database_url: str
) -> None:
    await budgeted(pool, "crash", "100")
    await record_usages(pool, await recordings(pool, "crash", ["0.1"] * 6), WEBHOOKS)
    doomed = await asyncpg.connect(database_url)
    transaction = doomed.transaction()
    await transaction.start()
    assert await doomed.fetchval("select sl_follow_webhooks(100, '{}')") > 0  # written, not committed
    doomed.terminate()
    for _ in range(100):  # the checkpoint is free once the server has noticed the death
        if await follow_webhooks(pool, WEBHOOKS) >= 0:
            break
        await asyncio.sleep(0.05)
    await catch_up_webhooks(pool, WEBHOOKS)
    sent = await rows(pool)
    assert sorted(w["call_id"] for w in sent if w["event"] == "spend_tracked") == [f"crash-{i}" for i in range(6)]
    spent = await pool.fetchval("select spent from webhook_spend where scope = 'customer' and period_start = '-infinity'")
    assert spent == Decimal("0.6")


async def test_only_one_follower_works_at_a_time(pool: asyncpg.Pool, database_url: str) -> None:
    await budgeted(pool, "solo", "100")
    await record_usages(pool, await recordings(pool, "solo", ["0.1"]), WEBHOOKS)
    holder = await asyncpg.connect(database_url)
    try:
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("select 1 from projection_checkpoints where name = 'webhooks' for update")
        assert await follow_webhooks(pool, WEBHOOKS) == -1
        await transaction.rollback()
    finally:
        await holder.close()
    assert await follow_webhooks(pool, WEBHOOKS) > 0


async def test_the_publishers_feeder_says_more_may_wait_only_after_a_full_batch(pool: asyncpg.Pool) -> None:
    await catch_up_webhooks(pool, WEBHOOKS)  # what other tests left
    await budgeted(pool, "feed", "100")
    await record_usages(pool, await recordings(pool, "feed", ["0.1"] * 5), WEBHOOKS)
    unread = await pool.fetchval(
        "select count(*) from events e, projection_checkpoints c where c.name = 'webhooks' "
        "and (e.txid, e.position) > (c.last_txid, c.last_position)"
    )
    feeder = WebhookFollower(pool, WEBHOOKS, batch=3)
    answers = [await feeder() for _ in range(unread // 3 + 1)]
    assert answers == [True] * (unread // 3) + [False]  # True after each full batch only
    assert len([w for w in await rows(pool) if w["call_id"].startswith("feed-")]) == 5


async def test_the_lag_counts_the_marked_events_not_yet_followed(pool: asyncpg.Pool) -> None:
    await catch_up_webhooks(pool, WEBHOOKS)
    await budgeted(pool, "lagging", "100")
    batch = await recordings(pool, "lagging", ["0.1"] * 4)
    await record_usages(pool, batch[:3], WEBHOOKS)
    await record_usages(pool, batch[3:], NO_CONTEXT)  # not marked: nothing to write for it
    assert (await webhook_follower_lag(pool))["events_behind"] == 3
    await catch_up_webhooks(pool, WEBHOOKS)
    lag = await webhook_follower_lag(pool)
    assert lag["events_behind"] == 0 and lag["followed_at"] is not None
