"""How the functions a database holds differ from ledger/sql: the drift check and the migration
writer (scripts/sql_migration.py) both ask this.

The comparison is PostgreSQL's own: each file's statement is executed in a transaction that is
rolled back, and `pg_get_functiondef` of every `sl_%` function is read before and after. A function
whose text, arguments, result, language, volatility or settings differ from its file's is changed;
one only in the files is missing from the database; one only in the database is extra.
"""

from __future__ import annotations

from typing import Final

import asyncpg
import msgspec

_FUNCTIONS: Final = """
select p.proname as name, p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')' as signature,
       pg_get_functiondef(p.oid) as definition
from pg_proc p join pg_namespace n on n.oid = p.pronamespace
where n.nspname = current_schema() and p.proname like 'sl\\_%' and p.prokind = 'f'
order by 1
"""


class InstalledFunction(msgspec.Struct, frozen=True, kw_only=True):
    signature: str  # name(identity arguments): what `drop function` takes
    definition: str  # pg_get_functiondef: a statement that creates it again


class Drift(msgspec.Struct, frozen=True, kw_only=True):
    changed: tuple[str, ...]  # in both, different
    missing: tuple[str, ...]  # only in ledger/sql
    extra: tuple[str, ...]  # only in the database
    replaced_whole: tuple[str, ...]  # changed in a way `create or replace` refuses (its result type)
    before: dict[str, InstalledFunction]  # the database's, by name
    after: dict[str, InstalledFunction]  # the files', by name

    @property
    def none(self) -> bool:
        return not (self.changed or self.missing or self.extra)


async def installed_functions(conn: asyncpg.Connection) -> dict[str, InstalledFunction]:
    """Our functions, by name (the ledger overloads none: a name is a function)."""
    found: dict[str, InstalledFunction] = {}
    for r in await conn.fetch(_FUNCTIONS):
        if r["name"] in found:
            raise ValueError(f"{r['name']} is installed twice ({found[r['name']].signature}, {r['signature']})")
        found[r["name"]] = InstalledFunction(signature=r["signature"], definition=r["definition"])
    return found


async def _overloaded(conn: asyncpg.Connection, name: str) -> bool:
    count = await conn.fetchval(
        "select count(*) from pg_proc where proname = $1 and pronamespace = current_schema()::regnamespace", name
    )
    return bool(count > 1)


class _RolledBack(Exception):
    pass


async def drift(conn: asyncpg.Connection, definitions: dict[str, str]) -> Drift:
    """Compare the database with `definitions` (ledger.sql.function_definitions()); changes nothing."""
    before = await installed_functions(conn)
    replaced_whole: list[str] = []
    after: dict[str, InstalledFunction] = {}
    try:
        async with conn.transaction():
            for name, statement in definitions.items():
                try:
                    async with conn.transaction():  # a savepoint: a refused replace is undone alone
                        await conn.execute(statement)
                except asyncpg.InvalidFunctionDefinitionError:  # the result type changed
                    replaced_whole.append(name)
                    await conn.execute(f"drop function {before[name].signature}")
                    await conn.execute(statement)
                    continue
                if name in before and await _overloaded(conn, name):  # the arguments changed
                    replaced_whole.append(name)
                    await conn.execute(f"drop function {before[name].signature}")
            after = {name: f for name, f in (await installed_functions(conn)).items() if name in definitions}
            raise _RolledBack
    except _RolledBack:
        pass
    return Drift(
        changed=tuple(n for n in definitions if n in before and before[n] != after.get(n)),
        missing=tuple(n for n in definitions if n not in before),
        extra=tuple(n for n in before if n not in definitions),
        replaced_whole=tuple(replaced_whole),
        before=before,
        after=after,
    )
