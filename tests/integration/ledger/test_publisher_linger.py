"""A publisher woken from idle lets a trickle of rows gather, and sends them as one batch."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import asyncpg
import pytest

from spendledger.ledger.outbox import CHANNEL, Claimed, Delivery, Publisher


class CountingSink:
    name = "webhook"
    batch_size = 50

    def __init__(self) -> None:
        self.batches: list[int] = []

    async def deliver(self, rows: Sequence[Claimed]) -> Delivery:
        self.batches.append(len(rows))
        return Delivery(delivered=[row.id for row in rows])


async def delivered_rows(pool: asyncpg.Pool, expected: int, timeout_s: float = 10.0) -> int:
    """The rows marked delivered (and committed, not only handed to the sink), once `expected` or
    at the timeout."""
    delivered = 0
    for _ in range(int(timeout_s / 0.05)):
        delivered = await pool.fetchval("select count(*) from outbox where state = 'delivered'")
        if delivered == expected:
            break
        await asyncio.sleep(0.05)
    return int(delivered)


async def trickle(pool: asyncpg.Pool, rows: int, gap_s: float) -> None:
    for i in range(rows):
        await pool.execute(
            "insert into outbox (sink, dedupe_key, payload) values ('webhook', $1, '{}'); ",
            f"trickle-{i}",
        )
        await pool.execute("select pg_notify($1, '')", CHANNEL)
        await asyncio.sleep(gap_s)


# Five rows 50 ms apart all fall within a 0.5 s linger; 150 ms apart, a publisher that does not
# linger has long sent each before the next arrives.
@pytest.mark.parametrize(("linger_s", "gap_s", "batched"), [(0.5, 0.05, True), (0.0, 0.15, False)])
async def test_a_trickle_is_sent_in_one_batch_after_the_linger(
    pool: asyncpg.Pool, database_url: str, linger_s: float, gap_s: float, batched: bool
) -> None:
    sink = CountingSink()
    publisher = Publisher(pool, database_url, [sink], idle_wait_s=5.0, linger_s=linger_s)
    task = asyncio.create_task(publisher.run())
    try:
        # Listening, and past its first sweep (which would take whatever is there at once).
        for _ in range(200):
            listening = await pool.fetchval(
                "select count(*) from pg_stat_activity where datname = current_database() "
                "and query ilike 'listen%'"
            )
            if listening:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        await trickle(pool, rows=5, gap_s=gap_s)
        delivered = await delivered_rows(pool, 5)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert delivered == 5, (sink.batches, publisher.health)
    assert sum(sink.batches) == 5
    if batched:
        assert sink.batches == [5]
    else:
        assert len(sink.batches) > 1  # without the linger, each wake-up sends what is there


class ArrivalDuringSendSink(CountingSink):
    """Records when each batch is handed over; while sending the first, one more row arrives."""

    batch_size = 3

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__()
        self.pool = pool
        self.times: list[float] = []

    async def deliver(self, rows: Sequence[Claimed]) -> Delivery:
        self.times.append(asyncio.get_running_loop().time())
        if len(self.times) == 1:
            await trickle(self.pool, rows=1, gap_s=0)
        return await super().deliver(rows)


async def run_until_delivered(pool: asyncpg.Pool, publisher: Publisher, rows: int) -> None:
    task = asyncio.create_task(publisher.run())
    try:
        delivered = await delivered_rows(pool, rows, timeout_s=20)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert delivered == rows, publisher.health


@pytest.mark.parametrize(("waiting", "full"), [(1, False), (3, True)])
async def test_only_a_full_batch_sends_the_publisher_straight_back(
    pool: asyncpg.Pool, database_url: str, waiting: int, full: bool
) -> None:
    """After a partial batch, a row that came in during the send waits for the linger like any
    other trickle; after a full batch, more is likely waiting and the publisher goes at once."""
    await pool.execute(
        "insert into outbox (sink, dedupe_key, payload) select 'webhook', 'waiting-' || g, '{}' "
        "from generate_series(1, $1) g",
        waiting,
    )
    sink = ArrivalDuringSendSink(pool)
    linger_s = 1.0
    publisher = Publisher(pool, database_url, [sink], idle_wait_s=5.0, linger_s=linger_s)
    await run_until_delivered(pool, publisher, waiting + 1)
    assert sink.batches == [waiting, 1]
    gap = sink.times[1] - sink.times[0]
    if full:
        assert gap < linger_s
    else:
        assert gap >= linger_s
