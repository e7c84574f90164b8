"""`ledger.keys` on a real PostgreSQL: every command appends a versioned event to `key:<hash>` and
keeps the `keys` table in step, in the caller's transaction."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from spendledger.ledger import keys, store
from spendledger.ledger.errors import AlreadyExists, InvalidCommand, NotFound
from spendledger.ledger.events import KeyBlocked, KeyDeleted, KeyGenerated, KeyUnblocked, KeyUpdated

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def spec_for(plaintext: str, **fields: Any) -> KeyGenerated:
    return KeyGenerated(key_hash=keys.hash_key(plaintext), key_name=keys.display_name(plaintext), **fields)


async def generate(pool: asyncpg.Pool, alias: str | None = None, **fields: Any) -> tuple[str, keys.KeyRecord]:
    plaintext = keys.new_key()
    async with pool.acquire() as conn, conn.transaction():
        record = await keys.generate_key(
            conn, spec_for(plaintext, key_alias=alias, **fields), plaintext, actor="test", now=NOW
        )
    return plaintext, record


async def stream_of(pool: asyncpg.Pool, key_hash: str) -> list[store.StoredEvent]:
    async with pool.acquire() as conn:
        return await store.read_stream(conn, keys.key_stream(key_hash))


async def snapshot(pool: asyncpg.Pool) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
    return (
        await pool.fetch("select * from events order by position"),
        await pool.fetch("select * from keys order by key_hash"),
    )


def test_key_helpers() -> None:
    plaintext = keys.new_key()
    assert plaintext.startswith("sk-") and len(plaintext) > 30
    assert keys.new_key() != plaintext
    assert keys.hash_key("sk-1234") == "88dc28d0f030c55ed4ab77ed8faf098196cb1c05df778539800c9f1243fe6b4b"
    assert keys.display_name("sk-abcdefgh") == "sk-...efgh"
    assert keys.key_stream("h") == "key:h"


async def test_generate_appends_key_generated_and_projects_the_row(pool: asyncpg.Pool) -> None:
    expires = NOW + timedelta(days=30)
    plaintext, record = await generate(
        pool,
        alias="billing",
        user_id="u1",
        team_id="t1",
        models=("gpt-4o-mini",),
        metadata={"owner": "ops", "n": 1},
        max_budget=Decimal("10.0000000001"),
        budget_duration="1mo",
        budget_id="tier",
        rpm_limit=60,
        tpm_limit=1000,
        max_parallel_requests=2,
        expires=expires,
    )
    key_hash = keys.hash_key(plaintext)
    assert plaintext not in str(await pool.fetch("select * from keys"))
    assert record.key_hash == key_hash
    assert record.key_name == keys.display_name(plaintext)
    assert record.key_alias == "billing"
    assert record.models == ("gpt-4o-mini",)
    assert record.metadata == {"owner": "ops", "n": 1}
    assert record.max_budget == Decimal("10.0000000001")
    assert (record.rpm_limit, record.tpm_limit, record.max_parallel_requests) == (60, 1000, 2)
    assert record.expires == expires
    assert record.blocked is False
    assert record.created_at == record.updated_at == NOW

    (stored,) = await stream_of(pool, key_hash)
    assert stored.version == 1
    assert isinstance(stored.event, KeyGenerated)
    assert stored.event.key_alias == "billing"
    assert stored.event.max_budget == Decimal("10.0000000001")
    assert stored.metadata == {"actor": "test", "at": NOW.isoformat()}  # the time a replay projects with
    assert await keys.get_key(pool, key_hash) == record
    assert await keys.find_key_by_alias(pool, "billing") == record


async def test_generate_refuses_a_spec_that_is_not_the_plaintexts_hash(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn, conn.transaction():
        with pytest.raises(ValueError):
            await keys.generate_key(conn, spec_for("sk-one"), "sk-two", actor="t", now=NOW)
    assert await pool.fetchval("select count(*) from events") == 0


@pytest.mark.parametrize(
    "fields",
    [
        {"max_budget": Decimal("-1")},
        {"budget_duration": "forever"},
        {"rpm_limit": -1},
        {"tpm_limit": -5},
        {"max_parallel_requests": -2},
    ],
)
async def test_generate_refuses_bad_limits_and_writes_nothing(
    pool: asyncpg.Pool, fields: dict[str, Any]
) -> None:
    with pytest.raises(InvalidCommand) as caught:
        await generate(pool, **fields)
    assert caught.value.param == next(iter(fields))
    assert await pool.fetchval("select count(*) from events") == 0
    assert await pool.fetchval("select count(*) from keys") == 0


async def test_generating_the_same_key_twice_is_already_exists(pool: asyncpg.Pool) -> None:
    plaintext = keys.new_key()
    async with pool.acquire() as conn, conn.transaction():
        await keys.generate_key(conn, spec_for(plaintext), plaintext, actor="t", now=NOW)
    before = await snapshot(pool)
    with pytest.raises(AlreadyExists):
        async with pool.acquire() as conn, conn.transaction():
            await keys.generate_key(conn, spec_for(plaintext), plaintext, actor="t", now=NOW)
    assert await snapshot(pool) == before


async def test_duplicate_alias_is_already_exists_and_nothing_is_written(pool: asyncpg.Pool) -> None:
    await generate(pool, alias="taken")
    before = await snapshot(pool)

    plaintext = keys.new_key()
    with pytest.raises(AlreadyExists) as caught:
        async with pool.acquire() as conn, conn.transaction():
            await keys.generate_key(
                conn, spec_for(plaintext, key_alias="taken"), plaintext, actor="t", now=NOW
            )
    assert caught.value.param == "key_alias"
    assert "taken" in caught.value.message
    assert await snapshot(pool) == before
    assert await stream_of(pool, keys.hash_key(plaintext)) == []


async def test_update_appends_key_updated_with_only_the_changes(pool: asyncpg.Pool) -> None:
    _, created = await generate(pool, alias="a1", rpm_limit=10, metadata={"x": 1})
    key_hash = created.key_hash
    later = NOW + timedelta(hours=1)
    update = KeyUpdated(
        key_hash=key_hash,
        key_alias="a2",
        rpm_limit=None,
        max_budget=Decimal("0.30000000000000004"),
        models=("m1", "m2"),
        metadata={"y": 2},
    )
    async with pool.acquire() as conn, conn.transaction():
        record = await keys.update_key(conn, update, actor="admin", now=later)

    assert record.key_alias == "a2"
    assert record.rpm_limit is None
    assert record.max_budget == Decimal("0.30000000000000004")
    assert record.models == ("m1", "m2")
    assert record.metadata == {"y": 2}
    assert record.team_id == created.team_id  # untouched
    assert record.created_at == NOW and record.updated_at == later
    assert await keys.find_key_by_alias(pool, "a1") is None

    stored = await stream_of(pool, key_hash)
    assert [s.version for s in stored] == [1, 2]
    assert stored[1].event == update
    assert stored[1].metadata == {"actor": "admin", "at": later.isoformat()}


async def test_update_of_an_unknown_key_is_not_found(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn, conn.transaction():
        with pytest.raises(NotFound):
            await keys.update_key(conn, KeyUpdated(key_hash="nope", rpm_limit=1), actor="t", now=NOW)
    assert await pool.fetchval("select count(*) from events") == 0


async def test_update_refuses_bad_limits(pool: asyncpg.Pool) -> None:
    _, created = await generate(pool)
    before = await snapshot(pool)
    with pytest.raises(InvalidCommand):
        async with pool.acquire() as conn, conn.transaction():
            await keys.update_key(
                conn, KeyUpdated(key_hash=created.key_hash, budget_duration="1y"), actor="t", now=NOW
            )
    assert await snapshot(pool) == before


async def test_update_to_a_taken_alias_is_already_exists_and_nothing_is_written(pool: asyncpg.Pool) -> None:
    await generate(pool, alias="first")
    _, second = await generate(pool, alias="second")
    before = await snapshot(pool)
    with pytest.raises(AlreadyExists):
        async with pool.acquire() as conn, conn.transaction():
            await keys.update_key(
                conn, KeyUpdated(key_hash=second.key_hash, key_alias="first"), actor="t", now=NOW
            )
    assert await snapshot(pool) == before


async def test_block_and_unblock_append_versioned_events(pool: asyncpg.Pool) -> None:
    _, created = await generate(pool)
    key_hash = created.key_hash
    async with pool.acquire() as conn:
        async with conn.transaction():
            blocked = await keys.set_blocked(conn, key_hash, True, actor="t", now=NOW + timedelta(minutes=1))
        assert blocked.blocked is True
        assert (await keys.get_key(conn, key_hash)).blocked is True  # type: ignore[union-attr]
        async with conn.transaction():
            unblocked = await keys.set_blocked(
                conn, key_hash, False, actor="t", now=NOW + timedelta(minutes=2)
            )
        assert unblocked.blocked is False
        assert unblocked.updated_at == NOW + timedelta(minutes=2)
        with pytest.raises(NotFound):
            async with conn.transaction():
                await keys.set_blocked(conn, "nope", True, actor="t", now=NOW)

    stored = await stream_of(pool, key_hash)
    assert [(s.version, type(s.event)) for s in stored] == [
        (1, KeyGenerated),
        (2, KeyBlocked),
        (3, KeyUnblocked),
    ]


async def test_delete_appends_key_deleted_and_removes_the_row(pool: asyncpg.Pool) -> None:
    _, one = await generate(pool, alias="one")
    _, two = await generate(pool, alias="two")
    _, kept = await generate(pool, alias="kept")
    async with pool.acquire() as conn, conn.transaction():
        await keys.delete_keys(conn, [one.key_hash, two.key_hash, one.key_hash], actor="t", now=NOW)

    assert await keys.get_key(pool, one.key_hash) is None
    assert await keys.get_key(pool, two.key_hash) is None
    assert await keys.get_key(pool, kept.key_hash) == kept
    for record in (one, two):
        stored = await stream_of(pool, record.key_hash)
        assert [(s.version, type(s.event)) for s in stored] == [(1, KeyGenerated), (2, KeyDeleted)]
    # the alias is free again, but the same key can never come back
    await generate(pool, alias="one")


@pytest.mark.parametrize("unknown", ["0" * 64, "f" * 64])  # sorted before and after the known keys
async def test_delete_with_an_unknown_key_deletes_none(pool: asyncpg.Pool, unknown: str) -> None:
    _, one = await generate(pool)
    _, two = await generate(pool)
    before = await snapshot(pool)
    with pytest.raises(NotFound) as caught:
        async with pool.acquire() as conn, conn.transaction():
            await keys.delete_keys(conn, [one.key_hash, unknown, two.key_hash], actor="t", now=NOW)
    assert caught.value.param == "keys"
    assert await snapshot(pool) == before
    assert await keys.get_key(pool, one.key_hash) == one
    assert await keys.get_key(pool, two.key_hash) == two


async def test_a_deleted_key_is_not_found_for_later_commands(pool: asyncpg.Pool) -> None:
    plaintext, record = await generate(pool)
    async with pool.acquire() as conn, conn.transaction():
        await keys.delete_keys(conn, [record.key_hash], actor="t", now=NOW)
    async with pool.acquire() as conn:
        with pytest.raises(NotFound):
            async with conn.transaction():
                await keys.set_blocked(conn, record.key_hash, True, actor="t", now=NOW)
        with pytest.raises(NotFound):
            async with conn.transaction():
                await keys.delete_keys(conn, [record.key_hash], actor="t", now=NOW)
        with pytest.raises(AlreadyExists):
            async with conn.transaction():
                await keys.generate_key(conn, spec_for(plaintext), plaintext, actor="t", now=NOW)
    assert len(await stream_of(pool, record.key_hash)) == 2


async def test_replaying_the_stream_rebuilds_the_same_row(pool: asyncpg.Pool) -> None:
    _, created = await generate(pool, alias="r", metadata={"a": [1, 2]}, max_budget=Decimal("1.5"))
    async with pool.acquire() as conn, conn.transaction():
        await keys.update_key(conn, KeyUpdated(key_hash=created.key_hash, tpm_limit=5), actor="t", now=NOW)
        await keys.set_blocked(conn, created.key_hash, True, actor="t", now=NOW)
    live = await keys.get_key(pool, created.key_hash)

    stored = await stream_of(pool, created.key_hash)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("delete from keys")
        for event in stored:
            await keys.apply_key_event(conn, event.event, NOW)
        rebuilt = await keys.get_key(conn, created.key_hash)
    assert rebuilt == live
