"""The newest revisions go down and up again, and the hot path works at each step."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import asyncpg

from alembic import command
from spendledger.ledger.db import alembic_config
from spendledger.ledger.usage import Recording, RecordingContext, record_usages
from spendledger.ledger.webhook_rows import catch_up_webhooks
from tests.integration.ledger.test_settle_batches import admitted, budgeted, usage


async def schema_objects(url: str) -> set[str]:
    """Our functions, and the indexes that a revision added alone (as `index:<name>`)."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("select proname from pg_proc where proname like 'sl\\_%'")
        indexes = await conn.fetch("select indexname from pg_indexes where indexname = 'outbox_waiting'")
    finally:
        await conn.close()
    return {r["proname"] for r in rows} | {f"index:{r['indexname']}" for r in indexes}


async def settle(url: str, customer: str, key_spends: list[str]) -> None:
    """Admit requests of 0.25 and settle them together (the key's spend after each is in
    `key_spends`): one request by `sl_record_usage` (0010), more by `sl_record_usages`."""
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    assert pool is not None
    try:
        await budgeted(pool, customer, "1")
        recordings = []
        for i in range(len(key_spends)):
            outcome = await admitted(pool, f"{customer}-{i}", customer)
            recordings.append(Recording(event=usage(f"{customer}-{i}", customer, "0.25", outcome.budget_periods)))
        context = RecordingContext(webhooks=True)
        spends = await record_usages(pool, recordings, context)
        assert spends == [Decimal(spend) for spend in key_spends]
        if await pool.fetchval("select to_regprocedure('sl_follow_webhooks(integer, jsonb)') is not null"):
            await catch_up_webhooks(pool, context)  # 0012: the rows follow the log
        tracked = await pool.fetchval(
            "select count(*) from outbox where sink = 'webhook' and dedupe_key like 'spend_tracked:' || $1 || '-%'",
            customer,
        )
        assert tracked == len(key_spends)  # each request's spend_tracked row, at every revision
    finally:
        await pool.close()


def test_down_to_0004_and_up_again(database_url: str) -> None:
    config = alembic_config(database_url)
    head = asyncio.run(schema_objects(database_url))
    assert {"sl_admit_many", "sl_webhook_rows", "sl_record_usage", "sl_follow_webhooks"} <= head
    assert not {"sl_settle", "sl_enqueue_webhooks_after", "sl_usage_webhooks"} & head  # superseded
    assert "index:outbox_waiting" in head  # 0008
    asyncio.run(settle(database_url, "at-0012", ["0.25", "0.5"]))
    command.downgrade(config, "0011")
    at_0011 = asyncio.run(schema_objects(database_url))
    assert "sl_usage_webhooks" in at_0011  # the settle writes its webhook rows itself again
    assert not {"sl_follow_webhooks", "sl_request_scopes_as_of", "sl_directory_row"} & at_0011
    asyncio.run(settle(database_url, "at-0011", ["0.75"]))
    command.downgrade(config, "0009")
    assert not {"sl_record_usage", "sl_usage_webhooks"} & asyncio.run(schema_objects(database_url))
    asyncio.run(settle(database_url, "at-0009", ["1", "1.25"]))  # batches still settle
    command.downgrade(config, "0007")
    assert "index:outbox_waiting" not in asyncio.run(schema_objects(database_url))
    command.downgrade(config, "0006")
    assert "sl_enqueue_webhooks_after" in asyncio.run(schema_objects(database_url))
    asyncio.run(settle(database_url, "at-0006", ["1.5", "1.75"]))  # 0006's settle works again
    command.downgrade(config, "0004")
    down = asyncio.run(schema_objects(database_url))
    assert {"sl_settle", "sl_enqueue_webhooks", "sl_record_usages", "sl_admit"} <= down
    assert not {"sl_admit_many", "sl_enqueue_webhooks_after", "sl_settle_values"} & down
    asyncio.run(settle(database_url, "before-0005", ["2", "2.25"]))  # 0004's settle works again
    command.upgrade(config, "head")
    assert asyncio.run(schema_objects(database_url)) == head
    asyncio.run(settle(database_url, "at-head", ["2.5"]))
    asyncio.run(settle(database_url, "at-head-batched", ["2.75", "3"]))


def test_an_interrupted_build_of_the_waiting_rows_index_is_built_anew(database_url: str) -> None:
    config = alembic_config(database_url)
    command.downgrade(config, "0007")

    async def leave_an_invalid_index() -> None:  # what an interrupted `create index concurrently` leaves
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute("create index outbox_waiting on outbox (id)")
            await conn.execute("update pg_index set indisvalid = false where indexrelid = 'outbox_waiting'::regclass")
        finally:
            await conn.close()

    async def definition() -> tuple[bool, str]:
        conn = await asyncpg.connect(database_url)
        try:
            row = await conn.fetchrow(
                "select indisvalid, pg_get_indexdef(indexrelid) as d from pg_index "
                "where indexrelid = 'outbox_waiting'::regclass"
            )
        finally:
            await conn.close()
        return row["indisvalid"], row["d"]

    asyncio.run(leave_an_invalid_index())
    command.upgrade(config, "head")
    valid, sql = asyncio.run(definition())
    assert valid and "WHERE (state <> 'delivered'::text)" in sql


_CATALOG: dict[str, str] = {
    "function": "select p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')' as k, "
    "pg_get_functiondef(p.oid) as v from pg_proc p where p.pronamespace = 'public'::regnamespace",
    "column": "select table_name || '.' || column_name as k, "
    "concat_ws(' ', data_type, column_default, is_nullable) as v "
    "from information_schema.columns where table_schema = 'public'",
    "index": "select indexname as k, indexdef as v from pg_indexes where schemaname = 'public'",
    "trigger": "select tgname || ' on ' || tgrelid::regclass as k, pg_get_triggerdef(oid) as v "
    "from pg_trigger where not tgisinternal",
    "constraint": "select conname || ' on ' || conrelid::regclass as k, pg_get_constraintdef(oid) as v "
    "from pg_constraint where connamespace = 'public'::regnamespace",
}


async def catalog(url: str) -> dict[str, str]:
    """Every function, column, index, trigger and constraint of the schema, with its definition."""
    conn = await asyncpg.connect(url)
    try:
        return {f"{kind} {r['k']}": r["v"] for kind, sql in _CATALOG.items() for r in await conn.fetch(sql)}
    finally:
        await conn.close()


def test_every_revision_goes_down_one_step_and_up_again_to_the_same_schema(database_url: str) -> None:
    """Walked from head to base one step at a time and back up, the schema at every revision is the
    same on the way up as on the way down: a database at any revision upgrades to head (the steps
    it runs are these), and every revision's downgrade undoes exactly its upgrade."""
    from alembic.script import ScriptDirectory

    config = alembic_config(database_url)
    revisions = [r.revision for r in ScriptDirectory.from_config(config).walk_revisions()]  # head first
    going_down = {revisions[0]: asyncio.run(catalog(database_url))}
    for below in [*revisions[1:], "base"]:
        command.downgrade(config, below)
        going_down[below] = asyncio.run(catalog(database_url))
    assert not any(key.startswith("function sl_") for key in going_down["base"])
    for revision in reversed(revisions):
        command.upgrade(config, revision)
        assert asyncio.run(catalog(database_url)) == going_down[revision], f"at {revision} going up"
