"""The webhook rows follow the log (migration 0012): a settle marks its event, and a follower writes
the event's outbox rows — `spend_tracked` and each budget line it crossed — after the response.

`sl_follow_webhooks` reads the next usage events after its checkpoint, in log order and only below
the snapshot's xmin, counts their spend forward in its own running totals, writes their rows and
moves the checkpoint, in one transaction: every event gets its rows exactly once, across crashes and
any number of followers (one works at a time; the others find the checkpoint taken). Crossings are
judged against the limits in force where each event stands in the log (the directory's history,
kept by triggers). Each publisher follows on its webhook sink's loop, before each claim
(`Publisher(feeders={"webhook": […]})`), so the rows are claimed in the same sweep, and a follower
that is slow holds back no other sink.
"""

from __future__ import annotations

from typing import Any, Final

import asyncpg
import msgspec

from spendledger.ledger.usage import RecordingContext

BATCH: Final = 1000

_json: Final = msgspec.json.Encoder(decimal_format="number")


async def follow_webhooks(
    conn: asyncpg.Connection | asyncpg.Pool, context: RecordingContext, batch: int = BATCH
) -> int:
    """Write the webhook rows of one batch of events; the events read (0: caught up, -1: another
    process follows). `context` gives the default and global budgets, as a settle's does."""
    return int(await conn.fetchval("select sl_follow_webhooks($1, $2::jsonb)", batch, _json.encode(context).decode()))


async def webhook_follower_lag(conn: asyncpg.Connection | asyncpg.Pool) -> dict[str, Any]:
    """How far the follower is behind: the marked events it has not read yet, and when it last moved."""
    row = await conn.fetchrow(
        "select c.updated_at, (select count(*) from events e where (e.txid, e.position) > "
        "(c.last_txid, c.last_position) and e.metadata ? 'webhooks') as behind "
        "from projection_checkpoints c where c.name = 'webhooks'"
    )
    if row is None:
        return {"events_behind": 0, "followed_at": None}
    return {"events_behind": row["behind"], "followed_at": row["updated_at"].isoformat()}


async def catch_up_webhooks(
    conn: asyncpg.Connection | asyncpg.Pool, context: RecordingContext, batch: int = BATCH
) -> int:
    """Follow until caught up (or another process holds the checkpoint); the events read."""
    total = 0
    while (n := await follow_webhooks(conn, context, batch)) > 0:
        total += n
    return total


class WebhookFollower:
    """A publisher's feeder: follows the log for webhook rows before each of its sweeps."""

    def __init__(self, pool: asyncpg.Pool, context: RecordingContext, batch: int = BATCH) -> None:
        self._pool = pool
        self._context = context
        self._batch = batch

    async def __call__(self) -> bool:
        """Follow one batch; True if it was full (more may be waiting)."""
        return await follow_webhooks(self._pool, self._context, self._batch) >= self._batch
