"""Database plumbing: the embedded PostgreSQL, the connection pool, migrations at start."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import asyncpg
import structlog

log = structlog.get_logger(__name__)

PROJECT_ROOT: Final = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR: Final = ".spendledger"


class EmbeddedDatabase:
    """A PostgreSQL started from the `pgserver` wheel in a data directory kept between runs."""

    def __init__(self, data_dir: Path) -> None:
        import pgserver  # imported lazily: only needed when no DATABASE_URL is given

        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir.resolve()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs complains about XDG_RUNTIME_DIR: harmless
            self._server: Any = pgserver.get_server(self.data_dir, cleanup_mode="stop")  # type: ignore[attr-defined]
        self.url: str = self._server.get_uri()

    def stop(self) -> None:
        self._server.cleanup()


def resolve_data_dir(cli_value: str | None) -> Path:
    return Path(cli_value or os.environ.get("SPENDLEDGER_DATA_DIR") or DEFAULT_DATA_DIR)


def run_migrations(database_url: str) -> None:
    """Bring the schema to the newest alembic revision (blocking; call before serving)."""
    from alembic.config import Config

    from alembic import command

    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "alembic"))
    config.attributes["database_url"] = database_url
    command.upgrade(config, "head")


async def current_revision(pool: asyncpg.Pool) -> str | None:
    try:
        value = await pool.fetchval("select version_num from alembic_version")
    except asyncpg.UndefinedTableError:
        return None
    return str(value) if value is not None else None


def head_revision() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "alembic"))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


async def _keep_session(_connection: asyncpg.Connection) -> None:
    """Pooled connections never LISTEN, take advisory locks or SET outside a transaction (listeners
    have connections of their own, settings are SET LOCAL), so there is no session state to reset
    on release: skipping asyncpg's reset saves a round trip per checkout."""


async def create_pool(database_url: str, min_size: int = 2, max_size: int = 10) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        database_url, min_size=min_size, max_size=max_size, command_timeout=60, reset=_keep_session
    )
    assert pool is not None
    return pool


async def wait_for_database(database_url: str, timeout_s: float = 30.0) -> None:
    """Retry connecting until the server accepts us, so a just-started database is no error."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            conn = await asyncpg.connect(database_url, timeout=5)
        except (OSError, asyncpg.PostgresError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)
        else:
            await conn.close()
            return


def split_sql(script: str) -> list[str]:
    """Split a SQL script into statements at `;` line ends, keeping `$$ … $$` bodies whole.

    Migrations need this because the async driver prepares each statement, and a prepared
    statement holds exactly one command.
    """
    statements: list[str] = []
    current: list[str] = []
    in_body = False
    for line in script.splitlines():
        current.append(line)
        if line.count("$$") % 2 == 1:
            in_body = not in_body
        if not in_body and line.rstrip().endswith(";"):
            statement = "\n".join(current).strip().rstrip(";").strip()
            if statement and not all(part.strip().startswith("--") for part in statement.splitlines()):
                statements.append(statement)
            current = []
    tail = "\n".join(current).strip()
    if tail and not all(part.strip().startswith("--") for part in tail.splitlines() if part.strip()):
        statements.append(tail)
    return statements


def execute_script(bind: Any, script: str) -> None:
    """Run a migration's SQL script statement by statement on alembic's connection (`op.get_bind()`)."""
    for statement in split_sql(script):
        bind.exec_driver_sql(statement)


def load_revision(migration: Path) -> ModuleType:
    """A migration's module, for a later revision that builds on what it defined."""
    spec = importlib.util.spec_from_file_location(f"revision_{migration.stem}", migration)
    assert spec is not None and spec.loader is not None
    revision = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(revision)
    return revision


def definitions_in_revision(migration: Path, *names: str) -> list[str]:
    """The statements of a migration's UPGRADE that define these functions: a later revision's
    downgrade runs them to bring the functions back as that revision had them."""
    upgrade: str = load_revision(migration).UPGRADE
    heads = [f"{verb} function {n}(" for n in names for verb in ("create", "create or replace")]
    return [s for s in split_sql(upgrade) if any(head in s for head in heads)]
