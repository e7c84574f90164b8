"""The current text of every function the ledger keeps in PostgreSQL, one `.sql` file per concern.

This folder is the one place to read or change a function: admission, leases, holds, the settle,
budget periods, scopes, webhook rows, the directory's history, the daily spend and the outbox. To
change one, edit its file and run `scripts/sql_migration.py "<what changed>"`: it writes a new
alembic revision carrying the new text in full (and the old text for its downgrade), standing alone.
`tests/integration/sql/test_drift.py` fails while the database the migrations build holds anything
but exactly these functions, so a change that was not migrated (or a migration that was not
mirrored here) cannot land.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

from spendledger.ledger.db import split_sql

SQL_DIR: Final = Path(__file__).resolve().parent
_NAME: Final = re.compile(r"^create or replace function (\w+)\(", re.MULTILINE)


def function_definitions() -> dict[str, str]:
    """Every function's `create or replace function` statement (its comments above it), by name,
    in the order of the files (alphabetical) and of the functions within each."""
    definitions: dict[str, str] = {}
    for path in sorted(SQL_DIR.glob("*.sql")):
        for statement in split_sql(path.read_text(encoding="utf-8")):
            found = _NAME.search(statement)
            if found is None:
                raise ValueError(f"{path.name}: not a `create or replace function` statement: {statement[:80]!r}")
            name = found.group(1)
            if name in definitions:
                raise ValueError(f"{path.name}: {name} is defined twice in ledger/sql")
            definitions[name] = statement
    return definitions
