"""The database the migrations build holds exactly the functions of ledger/sql, as written there."""

from __future__ import annotations

import asyncpg

from spendledger.ledger.sql import function_definitions
from spendledger.ledger.sql.drift import drift, installed_functions


async def test_every_function_is_its_files_text_and_nothing_else_is_installed(pool: asyncpg.Pool) -> None:
    definitions = function_definitions()
    async with pool.acquire() as conn:
        found = await drift(conn, definitions)
    assert found.extra == (), f"installed but in no file of ledger/sql (drop it with scripts/sql_migration.py): {found.extra}"
    assert found.missing == (), f"in ledger/sql but not installed (run scripts/sql_migration.py): {found.missing}"
    assert found.changed == (), f"ledger/sql differs from the database (run scripts/sql_migration.py): {found.changed}"


async def test_the_check_sees_a_changed_a_missing_and_an_extra_function(pool: asyncpg.Pool) -> None:
    definitions = function_definitions()
    changed = definitions["sl_scope_rank"].replace("else 5 end", "else 6 end")
    assert changed != definitions["sl_scope_rank"]
    edited = {**definitions, "sl_scope_rank": changed}
    del edited["sl_period_end"]
    edited["sl_brand_new"] = "create or replace function sl_brand_new() returns integer language sql as $$ select 1 $$"
    async with pool.acquire() as conn:
        found = await drift(conn, edited)
        after = await installed_functions(conn)
    assert (found.changed, found.missing, found.extra) == (("sl_scope_rank",), ("sl_brand_new",), ("sl_period_end",))
    assert "sl_brand_new" not in after and "sl_period_end" in after  # the comparison changed nothing
