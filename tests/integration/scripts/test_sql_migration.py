"""scripts/sql_migration.py: the revision it writes brings a database to ledger/sql, and back."""

from __future__ import annotations

import ast

import asyncpg

from scripts.sql_migration import downgrade_script, revision_text, upgrade_script
from spendledger.ledger.db import split_sql
from spendledger.ledger.sql import function_definitions
from spendledger.ledger.sql.drift import Drift, InstalledFunction, drift

NEW = "create or replace function sl_brand_new(x integer) returns integer language sql immutable as $$ select x $$"


def edited_definitions() -> dict[str, str]:
    """ledger/sql with one function changed (its body), one whose result type changed, one added
    and one gone."""
    definitions = function_definitions()
    edited = dict(definitions)
    edited["sl_scope_rank"] = definitions["sl_scope_rank"].replace("else 5 end", "else 6 end")
    edited["sl_return_lease"] = (
        "create or replace function sl_return_lease(lease text, amount numeric) returns integer "
        "language plpgsql as $$ begin return 0; end $$"
    )
    edited["sl_brand_new"] = NEW
    del edited["sl_period_end"]
    return edited


async def run(conn: asyncpg.Connection, statements: list[str]) -> None:
    for statement in statements:
        await conn.execute(statement)


async def test_the_revision_goes_up_to_the_files_and_down_to_the_previous_functions(pool: asyncpg.Pool) -> None:
    original, edited = function_definitions(), edited_definitions()
    async with pool.acquire() as conn:
        found = await drift(conn, edited)
        assert set(found.changed) == {"sl_scope_rank", "sl_return_lease"} and found.replaced_whole == ("sl_return_lease",)
        async with conn.transaction():
            await run(conn, upgrade_script(found, edited))
            assert (await drift(conn, edited)).none
            await run(conn, downgrade_script(found))
            assert (await drift(conn, original)).none


def test_the_revision_stands_alone_and_splits_into_its_statements() -> None:
    """What the file holds is what runs: the scripts survive the migration's own splitter."""
    definitions = {**function_definitions(), "sl_brand_new": NEW}
    found = Drift(
        changed=("sl_scope_rank",),
        missing=("sl_brand_new",),
        extra=(),
        replaced_whole=(),
        before={"sl_scope_rank": InstalledFunction(signature="sl_scope_rank(scope text)", definition="select 1")},
        after={"sl_brand_new": InstalledFunction(signature="sl_brand_new(x integer)", definition=NEW)},
    )
    tree = ast.parse(revision_text("0099", "0098", "A test revision", found, definitions))
    imports = {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert imports == {"alembic", "spendledger.ledger.db"}  # no other revision
    scripts = {
        target.id: ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name) and target.id in ("UPGRADE", "DOWNGRADE")
    }
    assert split_sql(scripts["UPGRADE"]) == [definitions["sl_scope_rank"], NEW]
    assert split_sql(scripts["DOWNGRADE"]) == ["drop function sl_brand_new(x integer)", "select 1"]
