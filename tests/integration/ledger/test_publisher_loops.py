"""Each sink is delivered on its own loop: a receiver that hangs, or a webhook follower that does, holds
back only its own sink's rows; the webhook follower runs on the webhook sink's loop, before it claims."""

from __future__ import annotations

import asyncio

import asyncpg

from spendledger.ledger.outbox import Publisher
from tests.integration.ledger.publisher_support import (
    Receiver,
    enqueue,
    eventually,
    lago_sink,
    running,
    state,
    webhook_sink,
)


async def delivered(pool: asyncpg.Pool, key: str) -> bool:
    return await state(pool, key) == "delivered"


async def test_a_receiver_that_hangs_delays_only_its_own_sink(pool: asyncpg.Pool, database_url: str) -> None:
    hanging = Receiver(gate=asyncio.Event())
    lago = Receiver()
    publisher = Publisher(pool, database_url, [webhook_sink(hanging), lago_sink(lago)])
    async with running(publisher):
        await enqueue(pool, "webhook", "stuck")
        await asyncio.wait_for(hanging.entered.wait(), 20)
        await enqueue(pool, "lago", "billed-meanwhile")
        assert await eventually(lambda: delivered(pool, "billed-meanwhile"))
        assert hanging.answered == [] and await state(pool, "stuck") == "pending"  # still in flight
        assert publisher.health["lago"].state == "ok"
        assert hanging.gate is not None
        hanging.gate.set()
        assert await eventually(lambda: delivered(pool, "stuck"))
    assert hanging.ids() == ["stuck"]
    assert publisher.health["webhook"].last_delivery_at is not None


async def test_the_webhook_follower_runs_before_the_webhook_claim_in_the_same_sweep(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """The follower writes its row without a NOTIFY, and an idle publisher waits a minute: the row
    goes at once only because the webhook loop claims right after it follows."""

    async def follower() -> bool:
        if await state(pool, "followed") is None:
            await enqueue(pool, "webhook", "followed", notify=False)
        return False

    hooks = Receiver()
    publisher = Publisher(
        pool, database_url, [webhook_sink(hooks)], idle_wait_s=60.0, feeders={"webhook": [follower]}
    )
    async with running(publisher):
        assert await eventually(lambda: delivered(pool, "followed"))
    assert hooks.ids() == ["followed"]


async def test_a_webhook_follower_that_hangs_holds_back_no_lago_row(
    pool: asyncpg.Pool, database_url: str
) -> None:
    follower_gate = asyncio.Event()
    followed = 0

    async def follower() -> bool:
        nonlocal followed
        followed += 1
        if followed == 1:
            await follower_gate.wait()
            await enqueue(pool, "webhook", "followed")
        return False

    hooks, lago = Receiver(), Receiver()
    publisher = Publisher(
        pool, database_url, [lago_sink(lago), webhook_sink(hooks)], feeders={"webhook": [follower]}
    )
    async with running(publisher):
        assert await eventually(lambda: _true(followed == 1))
        await enqueue(pool, "lago", "not-held-back")
        assert await eventually(lambda: delivered(pool, "not-held-back"))
        assert followed == 1  # the Lago loop never follows for webhooks, nor waits for it
        follower_gate.set()
        assert await eventually(lambda: delivered(pool, "followed"))
    assert hooks.ids() == ["followed"]


async def _true(value: bool) -> bool:
    return value
