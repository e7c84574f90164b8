"""A publisher woken from idle lets a trickle of rows gather, and sends them as one batch."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import asyncpg
import pytest

from ledger.outbox import CHANNEL, Claimed, Delivery, Publisher


class CountingSink:
    name = "webhook"
    batch_size = 50

    def __init__(self) -> None:
        self.batches: list[int] = []

    async def deliver(self, rows: Sequence[Claimed]) -> Delivery:
        self.batches.append(len(rows))
        return Delivery(delivered=[row.id for row in rows])


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
        delivered = 0
        for _ in range(200):  # marked and committed, not only handed to the sink
            delivered = await pool.fetchval("select count(*) from outbox where state = 'delivered'")
            if delivered == 5:
                break
            await asyncio.sleep(0.05)
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
