"""Outbox status: exact counts on demand, and a periodic refresh whose cost does not grow with the
delivered rows the outbox keeps (two per request, forever)."""

from __future__ import annotations

import json

import asyncpg

from spendledger.ledger.outbox import outbox_status


async def fill(pool: asyncpg.Pool, delivered: int) -> None:
    """`delivered` delivered webhook rows, and a few that wait: 3 pending (2 webhook, 1 lago),
    2 dead, 1 unbillable."""
    await pool.execute(
        "insert into outbox (sink, dedupe_key, payload, state) "
        "select 'webhook', 'd' || i, '{}', 'delivered' from generate_series(1, $1) as i",
        delivered,
    )
    waiting = [("webhook", "pending"), ("webhook", "pending"), ("lago", "pending"), ("lago", "dead"),
               ("webhook", "dead"), ("lago", "unbillable")]  # fmt: skip
    for i, (sink, state) in enumerate(waiting):
        await pool.execute(
            "insert into outbox (sink, dedupe_key, payload, state) values ($1, $2, '{}', $3)", sink, f"w{i}", state
        )
    await pool.execute("analyze outbox")


async def test_counts_every_state_on_demand_and_only_the_waiting_ones_for_a_refresh(pool: asyncpg.Pool) -> None:
    await fill(pool, delivered=50)

    full = await outbox_status(pool)
    assert full["sinks"]["webhook"] == {"pending": 2, "delivered": 50, "dead": 1, "unbillable": 0,
                                        "oldest_pending_age_s": full["sinks"]["webhook"]["oldest_pending_age_s"]}  # fmt: skip
    assert {k: v for k, v in full["sinks"]["lago"].items() if k != "oldest_pending_age_s"} == {
        "pending": 1, "delivered": 0, "dead": 1, "unbillable": 1,
    }  # fmt: skip
    assert sorted(d["sink"] for d in full["dead_letters"]) == ["lago", "webhook"]

    waiting = await outbox_status(pool, dead_limit=0, delivered=False)
    counts = {sink: {k: v for k, v in c.items() if k != "oldest_pending_age_s"} for sink, c in waiting["sinks"].items()}
    assert counts == {"webhook": {"pending": 2, "dead": 1, "unbillable": 0},
                      "lago": {"pending": 1, "dead": 1, "unbillable": 1}}  # fmt: skip
    assert waiting["dead_letters"] == []


async def plan(pool: asyncpg.Pool, sql: str) -> str:
    return json.dumps(json.loads(await pool.fetchval("explain (format json) " + sql)))


async def test_the_refresh_and_the_dead_letters_read_the_waiting_rows_index_not_the_table(pool: asyncpg.Pool) -> None:
    await fill(pool, delivered=20_000)
    waiting = await plan(
        pool, "select sink, state, count(*) from outbox where state <> 'delivered' group by 1, 2 order by 1, 2"
    )
    dead = await plan(pool, "select id from outbox where state = 'dead' order by id limit 100")
    for found in (waiting, dead):
        assert "outbox_waiting" in found and "Seq Scan" not in found, found
