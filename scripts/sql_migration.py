"""Write the alembic revision that brings the database's functions to what ledger/sql says.

    .venv/bin/python scripts/sql_migration.py "what changed, in a few words" [--dry-run]

A scratch database (an embedded PostgreSQL in the temp dir, or TEST_DATABASE_URL's server) is
migrated to the current head and compared with ledger/sql (ledger.sql.drift). The new revision
carries, in full, every changed or new function's text from ledger/sql and drops those no file
defines; its downgrade carries the old text of each, as the head database held it. It stands alone:
it reads no other revision, and nothing reads it. With nothing to migrate it writes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

import asyncpg  # noqa: E402

from spendledger.ledger.db import head_revision, run_migrations  # noqa: E402
from spendledger.ledger.sql import function_definitions  # noqa: E402
from spendledger.ledger.sql.drift import Drift, drift  # noqa: E402

VERSIONS = PROJECT_ROOT / "alembic" / "versions"


def upgrade_script(found: Drift, definitions: dict[str, str]) -> list[str]:
    statements = [f"drop function {found.before[n].signature}" for n in found.replaced_whole]
    statements += [definitions[n] for n in definitions if n in found.changed or n in found.missing]
    statements += [f"drop function {found.before[n].signature}" for n in found.extra]
    return statements


def downgrade_script(found: Drift) -> list[str]:
    statements = [f"drop function {found.after[n].signature}" for n in found.missing + found.replaced_whole]
    statements += [found.before[n].definition for n in found.changed + found.extra]
    return statements


def revision_text(number: str, down: str, message: str, found: Drift, definitions: dict[str, str]) -> str:
    def script(statements: list[str]) -> str:
        text = "\n\n".join(s.strip().rstrip(";") + ";" for s in statements)
        if '"""' in text:
            raise SystemExit("a function's text holds a triple quote: the revision cannot carry it as is")
        return text

    touched = ", ".join(sorted({*found.changed, *found.missing, *found.extra}))
    about = textwrap.fill(
        f"Functions: {touched}. Written by scripts/sql_migration.py from ledger/sql/, which holds their "
        "current text; the downgrade carries the text the previous revision left.",
        width=100,
    )
    return f'''"""{message}

{about}

Revision ID: {number}
Revises: {down}
"""

from alembic import op
from spendledger.ledger.db import execute_script

revision = "{number}"
down_revision = "{down}"
branch_labels = None
depends_on = None

UPGRADE = r"""
{script(upgrade_script(found, definitions))}
"""

DOWNGRADE = r"""
{script(downgrade_script(found))}
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
'''


def slug(message: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", message.lower()).strip("_")[:60]


async def compare(url: str) -> Drift:
    conn = await asyncpg.connect(url)
    try:
        return await drift(conn, function_definitions())
    finally:
        await conn.close()


def scratch_database() -> tuple[str, object]:
    """A migrated scratch database: an embedded PostgreSQL in the temp dir (never under the project)."""
    import pgserver

    directory = tempfile.mkdtemp(prefix="sl-sql-migration-")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pgserver.get_server(directory, cleanup_mode="stop")
    return server.get_uri(), server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("message", help="what changed, for the revision's docstring and file name")
    parser.add_argument("--dry-run", action="store_true", help="print the revision instead of writing it")
    args = parser.parse_args()
    url, server = scratch_database()
    try:
        run_migrations(url)
        found = asyncio.run(compare(url))
    finally:
        server.cleanup()  # type: ignore[attr-defined]
    if found.none:
        print("ledger/sql and the migrations agree: nothing to migrate", file=sys.stderr)
        return 0
    down = head_revision()
    number = f"{int(down) + 1:04d}"
    text = revision_text(number, down, args.message, found, function_definitions())
    if args.dry_run:
        print(text)
        return 0
    path = VERSIONS / f"{number}_{slug(args.message)}.py"
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path.relative_to(PROJECT_ROOT)}: changed {list(found.changed)}, new {list(found.missing)}, "
          f"dropped {list(found.extra)}", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
