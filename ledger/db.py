"""Database plumbing: the embedded PostgreSQL, the connection pool, migrations at start."""

from __future__ import annotations

import asyncio
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Final

import asyncpg
import structlog

log = structlog.get_logger(__name__)

# The migrations, as installed with the package (spendledger/migrations: the repository's alembic/).
MIGRATIONS: Final = Path(__file__).parent.parent / "migrations"
DEFAULT_DATA_DIR: Final = ".spendledger"
_DOLLAR_QUOTE: Final = re.compile(r"\$(?:[A-Za-z_][A-Za-z_0-9]*)?\$")


class EmbeddedDatabase:
    """A PostgreSQL started from the `pgserver` wheel in a data directory kept between runs."""

    def __init__(self, data_dir: Path) -> None:
        import pgserver  # imported lazily: only needed when no DATABASE_URL is given

        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir.resolve()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs complains about XDG_RUNTIME_DIR: harmless
            forget_dead_handles(self.data_dir)
            self._server: Any = pgserver.get_server(self.data_dir, cleanup_mode="stop")  # type: ignore[attr-defined]
        self.url: str = self._server.get_uri()

    def stop(self) -> None:
        self._server.cleanup()


HANDLE_FILE: Final = ".handle_pids.json"


def forget_dead_handles(data_dir: Path) -> list[int]:
    """Drop the PIDs of processes that are gone from pgserver's list of the data directory's users.

    pgserver keeps the PID of every process holding the server in `<data dir>/.handle_pids.json`
    and stops PostgreSQL only when the last of them leaves. A process killed with SIGKILL never
    leaves: its PID stayed there for good, so every later server thought another process still
    used the database and left PostgreSQL running when it stopped. Done under pgserver's own lock,
    before our PID is added. Returns the PIDs dropped.
    """
    from pgserver.postgres_server import PostgresServer

    path = data_dir / HANDLE_FILE
    with PostgresServer._lock:
        try:
            pids = json.loads(path.read_text())
            written_at = path.stat().st_mtime
        except (OSError, ValueError):
            return []  # no list yet (or not one pgserver could read either): nothing to drop
        if not isinstance(pids, list):
            return []
        alive = [pid for pid in pids if isinstance(pid, int) and _still_holds(pid, written_at)]
        dropped = [pid for pid in pids if pid not in alive]
        if dropped:
            path.write_text(json.dumps(alive))
            log.warning("embedded_postgres_dead_handles_dropped", pids=dropped)
    return dropped


# A process's start time is known to about a second (Linux counts it from a boot time in whole
# seconds): only a process started clearly after the list was last written is taken for a reuse.
_START_TIME_SLACK_S: Final = 2.0


def _still_holds(pid: int, list_written_at: float) -> bool:
    """Whether `pid` may still be the process that put itself on the list: it runs, is no zombie,
    and was started before the list was last written (else the PID was reused by a newer process)."""
    import psutil  # type: ignore[import-untyped]  # pgserver's own dependency; it has no stubs

    try:
        process = psutil.Process(pid)
        started = process.create_time()
        return bool(
            process.status() != psutil.STATUS_ZOMBIE and started <= list_written_at + _START_TIME_SLACK_S
        )
    except psutil.Error:
        return False


# PostgreSQL errors that say the server cannot take us now, whatever the statement: starting up or
# shutting down (57P01-57P03) and no connection slot left (53300).
_SERVER_UNAVAILABLE: Final = (
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
)
# asyncpg's own InterfaceErrors for a connection or pool that is gone (others are usage errors: bugs).
_LOST_CONNECTION_MESSAGES: Final = ("connection is closed", "pool is closing", "pool is closed")


def database_unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the database cannot be reached right now (down, restarting, refusing
    connections, the connection lost) rather than that a statement is wrong: a 503 the client may
    retry, not a 500."""
    if isinstance(exc, (asyncpg.PostgresConnectionError, *_SERVER_UNAVAILABLE)):
        return True
    if type(exc) is asyncpg.InterfaceError:
        return any(message in str(exc) for message in _LOST_CONNECTION_MESSAGES)
    if isinstance(exc, OSError):
        # Socket errors and connect timeouts (TimeoutError is an OSError) count when asyncpg raised
        # them: an OSError of anything else is no news about the database.
        return _raised_within(exc, "asyncpg")
    return False


def _raised_within(exc: BaseException, package: str) -> bool:
    traceback = exc.__traceback__
    while traceback is not None:
        module = traceback.tb_frame.f_globals.get("__name__", "")
        if module == package or str(module).startswith(package + "."):
            return True
        traceback = traceback.tb_next
    return False


def resolve_data_dir(cli_value: str | None) -> Path:
    return Path(cli_value or os.environ.get("SPENDLEDGER_DATA_DIR") or DEFAULT_DATA_DIR)


def run_migrations(database_url: str) -> None:
    """Bring the schema to the newest alembic revision (blocking; call before serving)."""
    from alembic import command

    command.upgrade(alembic_config(database_url), "head")


async def current_revision(pool: asyncpg.Pool) -> str | None:
    try:
        value = await pool.fetchval("select version_num from alembic_version")
    except asyncpg.UndefinedTableError:
        return None
    return str(value) if value is not None else None


def alembic_config(database_url: str | None = None) -> Any:
    """Alembic's configuration, with no alembic.ini: the package knows where its migrations are."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if database_url is not None:
        config.attributes["database_url"] = database_url
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


async def _keep_session(_connection: asyncpg.Connection) -> None:
    """Pooled connections never LISTEN, take advisory locks or SET outside a transaction (listeners
    have connections of their own, settings are SET LOCAL), so there is no session state to reset
    on release: skipping asyncpg's reset saves a round trip per checkout."""


async def create_pool(
    database_url: str, min_size: int = 2, max_size: int = 10, application_name: str | None = None
) -> asyncpg.Pool:
    """The connection pool; `application_name` names its connections (a serving process's name
    marks the holds it takes: ledger/holds_sweeper.py)."""
    pool = await asyncpg.create_pool(
        database_url,
        min_size=min_size,
        max_size=max_size,
        command_timeout=60,
        reset=_keep_session,
        server_settings={"application_name": application_name} if application_name else None,
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
    """Split a SQL script into statements at `;` line ends, keeping dollar-quoted bodies (`$$ … $$`,
    `$function$ … $function$`) whole.

    Migrations need this because the async driver prepares each statement, and a prepared
    statement holds exactly one command.
    """
    statements: list[str] = []
    current: list[str] = []
    open_tag: str | None = None
    for line in script.splitlines():
        current.append(line)
        for tag in _DOLLAR_QUOTE.findall(line):
            if open_tag is None:
                open_tag = tag
            elif tag == open_tag:
                open_tag = None
        if open_tag is None and line.rstrip().endswith(";"):
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
