"""Claims are leases, not open transactions: nothing is held while a row is on the network, the log's
followers see new events at once however slow a receiver is, and a publisher that never marks its
claim has its rows sent again — with the same ids — once the lease has passed, not before."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from spendledger.ledger.outbox import Claimed, Publisher, Sink
from spendledger.ledger.usage import NO_CONTEXT, Recording, record_usages
from spendledger.projections.audit import AuditFilters, read_events
from tests.integration.ledger.publisher_support import (
    Receiver,
    end_leases,
    enqueue,
    eventually,
    running,
    state,
    states,
    webhook_sink,
)
from tests.integration.ledger.test_group_recorder import usage

PUBLISHER = "publisher-under-test"


@pytest.fixture
async def publisher_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """The publisher's own connections, named so that pg_stat_activity tells them apart."""
    own = await asyncpg.create_pool(
        database_url, min_size=2, max_size=4, server_settings={"application_name": PUBLISHER}
    )
    assert own is not None
    yield own
    await own.close()


async def test_no_transaction_is_open_during_a_send_and_followers_see_new_events_at_once(
    pool: asyncpg.Pool, publisher_pool: asyncpg.Pool, database_url: str
) -> None:
    receiver = Receiver(gate=asyncio.Event())  # answers only when the test lets it
    publisher = Publisher(publisher_pool, database_url, [webhook_sink(receiver)])
    await enqueue(pool, "webhook", "in-flight")
    async with running(publisher):
        await asyncio.wait_for(receiver.entered.wait(), 20)  # the row is on the network now
        # A transaction kept open across the send would sit `idle in transaction` while the row is
        # on the network. (A statement running right now — the health reporter's short update —
        # is `active`: not held across anything.)
        held = await pool.fetch(
            "select application_name, state, backend_xid from pg_stat_activity "
            "where datname = current_database() and pid <> pg_backend_pid() "
            "and state like 'idle in transaction%'"
        )
        assert held == []
        assert (
            await pool.fetchval(
                "select count(*) from pg_stat_activity where application_name = $1", PUBLISHER
            )
            >= 1
        )  # the publisher's connections are there, idle
        # A usage recorded now is below the snapshot horizon at once: /audit/events shows it.
        await record_usages(pool, [Recording(event=usage("recorded-mid-send", "audited"))], NO_CONTEXT)
        events, _ = await read_events(pool, AuditFilters(customer="audited", types=("UsageRecorded",)))
        assert [e.stream for e in events] == ["request:recorded-mid-send"]
        assert await state(pool, "in-flight") == "pending"
        assert receiver.gate is not None
        receiver.gate.set()
        assert await eventually(lambda: _is(pool, "in-flight", "delivered"))
    assert receiver.ids() == ["in-flight"]


async def _is(pool: asyncpg.Pool, key: str, expected: str) -> bool:
    return await state(pool, key) == expected


async def test_a_claim_never_marked_is_sent_again_after_its_lease_not_before(
    pool: asyncpg.Pool, database_url: str
) -> None:
    lease_s = 2.0
    receiver = Receiver()
    sink = webhook_sink(receiver)
    crashed = Publisher(pool, database_url, [sink], lease_s=lease_s)
    await enqueue(pool, "webhook", "orphan")
    [claimed] = await crashed.claim(sink)
    await sink.deliver([claimed])  # sent; then its publisher dies before the mark
    assert receiver.ids() == ["orphan"]

    survivor = Publisher(pool, database_url, [sink], lease_s=lease_s, idle_wait_s=0.1)
    assert await survivor.publish_once(sink) == 0  # leased: not due, not sent
    async with running(survivor):
        assert await eventually(lambda: _is(pool, "orphan", "delivered"))
    delivered_at = await pool.fetchval("select delivered_at from outbox where dedupe_key = 'orphan'")
    assert claimed.lease_until is not None and delivered_at >= claimed.lease_until
    assert receiver.ids() == ["orphan", "orphan"]  # the same id: the receiver drops the repeat
    assert (await states(pool))["orphan"]["attempts"] == 1  # the crashed claim never counted


async def test_a_publisher_that_overran_its_lease_does_not_overwrite_the_next_claims_outcome(
    pool: asyncpg.Pool, database_url: str
) -> None:
    slow = Receiver(gate=asyncio.Event(), status=503)
    late = Publisher(pool, database_url, [webhook_sink(slow)])
    await enqueue(pool, "webhook", "contested")
    overrun = asyncio.create_task(late.publish_once(webhook_sink(slow)))
    await asyncio.wait_for(slow.entered.wait(), 20)
    await end_leases(pool)  # its lease has passed: another publisher claims the row
    other = Receiver(status=503)
    assert await Publisher(pool, database_url, [webhook_sink(other)]).publish_once(webhook_sink(other)) == 1
    after_other = (await states(pool))["contested"]
    assert slow.gate is not None
    slow.gate.set()
    assert await overrun == 1
    assert (await states(pool))["contested"] == after_other  # the stale claim's retry was not applied
    assert after_other["attempts"] == 1


async def test_concurrent_claims_take_each_row_once(pool: asyncpg.Pool, database_url: str) -> None:
    sink = webhook_sink(Receiver())  # batches of 50
    await enqueue(pool, "webhook", *(f"row-{i}" for i in range(260)))
    publishers = [Publisher(pool, database_url, [sink]) for _ in range(6)]
    claims = await asyncio.gather(*(publisher.claim(sink) for publisher in publishers))
    taken = [row.dedupe_key for claim in claims for row in claim]
    assert len(taken) == len(set(taken)) == 260
    assert sorted(len(claim) for claim in claims) == [10, 50, 50, 50, 50, 50]
    assert all(len({row.claim for row in claim}) == 1 for claim in claims)  # one lease per batch
    assert await publishers[0].claim(sink) == []  # all leased


async def test_a_stop_that_lands_while_a_claim_commits_still_gives_the_rows_back(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """SIGTERM cancels the publisher wherever it waits: here after the claim's transaction has
    committed and before its rows reached the loop. The claim must not stay leased."""
    committed = asyncio.Event()

    class SlowToHearBack(Publisher):
        async def claim(self, sink: Sink) -> list[Claimed]:
            rows = await super().claim(sink)
            committed.set()
            await asyncio.sleep(1)  # the answer still on its way when the stop comes
            return rows

    publisher = SlowToHearBack(pool, database_url, [webhook_sink(Receiver())])
    await enqueue(pool, "webhook", "claimed-then-stopped")
    task = asyncio.create_task(publisher.publish_once(publisher._sinks[0]))
    await asyncio.wait_for(committed.wait(), 10)
    assert await pool.fetchval("select count(*) from outbox_claims") == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await pool.fetchval("select count(*) from outbox_claims") == 0
    assert await state(pool, "claimed-then-stopped") == "pending"
