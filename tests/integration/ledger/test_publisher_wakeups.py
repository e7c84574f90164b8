"""Settles wake the outbox publishers at most once per linger, and never leave a batch unannounced."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from spendledger.ledger.outbox import CHANNEL
from spendledger.ledger.publisher_wakeups import PublisherWakeups
from spendledger.ledger.usage import GroupRecorder, Recording, RecordingContext, record_usages
from tests.integration.ledger.test_group_recorder import usage

WEBHOOKS = RecordingContext(webhooks=True)  # a settle with webhooks on enqueues rows and notifies


class Listener:
    """A publisher's ear: when each notification on the outbox channel arrived."""

    def __init__(self) -> None:
        self.heard: list[float] = []

    def __call__(self, *_: object) -> None:
        self.heard.append(time.monotonic())


@pytest.fixture
async def listener(database_url: str) -> AsyncIterator[Listener]:
    conn = await asyncpg.connect(database_url)
    ear = Listener()
    await conn.add_listener(CHANNEL, ear)
    yield ear
    await conn.close()


async def settled(listener: Listener, after_s: float = 0.2) -> list[float]:
    await asyncio.sleep(after_s)  # notifications arrive after their commit
    return listener.heard


async def test_a_settle_notifies_unless_told_not_to(pool: asyncpg.Pool, listener: Listener) -> None:
    await record_usages(pool, [Recording(event=usage("loud", "c"))], WEBHOOKS)
    assert len(await settled(listener)) == 1
    silent = RecordingContext(webhooks=True, notify=False)
    await record_usages(pool, [Recording(event=usage("quiet", "c"))], silent)
    assert len(await settled(listener)) == 1
    marked = await pool.fetchval("select metadata->>'webhooks' from events where data->>'call_id' = 'quiet'")
    assert marked == "true"  # still marked: the webhook follower writes its rows


def test_a_wakeup_counts_for_the_whole_window() -> None:
    wakeups = PublisherWakeups(pool=None, every_s=0.05)  # type: ignore[arg-type]  # not used here
    assert wakeups.should_notify()
    assert not wakeups.should_notify()
    time.sleep(0.06)
    assert wakeups.should_notify()


async def test_a_stream_of_batches_notifies_once_per_window_and_the_last_one_is_announced(
    pool: asyncpg.Pool, listener: Listener
) -> None:
    recorder = GroupRecorder(pool, WEBHOOKS, wakeups=PublisherWakeups(pool, every_s=0.05))
    recorder.start()
    try:
        started = time.monotonic()
        for i in range(40):  # one at a time: forty batches, each committed before the next
            await recorder.record(Recording(event=usage(f"call-{i}", "c")))
        last_commit = time.monotonic()
        heard = await settled(listener)
    finally:
        await recorder.stop()
    windows = (last_commit - started) / 0.05
    # At most one per window, plus the first and the trailing one, plus one whose batch decided to
    # notify in one window and committed in the next (a busy machine stretches a commit that far).
    assert 1 <= len(heard) <= windows + 3, (len(heard), windows)  # not one per batch
    assert len(heard) < 40
    assert max(heard) >= last_commit  # the batches after the last wakeup were announced too
    assert max(heard) - last_commit < 0.15


async def test_stop_sends_the_trailing_wakeup_at_once(pool: asyncpg.Pool, listener: Listener) -> None:
    recorder = GroupRecorder(pool, WEBHOOKS, wakeups=PublisherWakeups(pool, every_s=60))
    recorder.start()
    await recorder.record(Recording(event=usage("first", "c")))
    await recorder.record(Recording(event=usage("second", "c")))  # within the window: silent
    assert len(await settled(listener, 0.1)) == 1
    await recorder.stop()
    assert len(await settled(listener, 0.1)) == 2
