"""`spendledger serve | migrate`: the thin entrypoint around the composition root."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from datetime import date
from types import FrameType
from typing import Any, Final
from urllib.parse import urlsplit

import structlog

from spendledger import __version__
from spendledger.api import rebuild_command
from spendledger.api.logging import configure_logging
from spendledger.api.publisher_process import SupervisedPublisher, become_supervised_child, publisher_argv
from spendledger.ledger.config import LagoSettings, Settings, load_settings
from spendledger.ledger.config_values import ConfigError
from spendledger.ledger.database_url import from_prisma
from spendledger.ledger.db import EmbeddedDatabase, resolve_data_dir, run_migrations

log = structlog.get_logger("spendledger")


POOL_LIMIT_ENV: Final = "SPENDLEDGER_DATABASE_POOL_LIMIT"  # a DATABASE_URL's connection_limit, for the workers
CONFIG_HELP: Final = "the LiteLLM-format config.yaml"
DATA_DIR_HELP: Final = "the embedded PostgreSQL's data directory (default: $SPENDLEDGER_DATA_DIR, else ./.spendledger)"
DATABASE_CONFIG_HELP: Final = "config.yaml, for general_settings.database_url (default: $DATABASE_URL, else embedded)"
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spendledger", description="LLM gateway with an exact spend ledger")
    parser.add_argument("--version", action="version", version=f"spendledger {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible API and the management API")
    serve.add_argument("--config", required=True, help=CONFIG_HELP)
    serve.add_argument("--host", default="0.0.0.0", help="the address to listen on (default 0.0.0.0)")
    serve.add_argument("--port", type=int, default=4000, help="the port to listen on (default 4000)")
    serve.add_argument(
        "--workers", type=_positive, default=1, help="serving processes (default 1; the outbox has one publisher)"
    )
    serve.add_argument("--data-dir", help=DATA_DIR_HELP)
    serve.add_argument(
        "--no-publisher",
        action="store_true",
        help="do not deliver the outbox from the server; run `spendledger publish` beside it",
    )
    serve.add_argument(
        "--log-level",
        type=_log_level,
        default=_configured_log_level(),
        help=f"{', '.join(LOG_LEVELS)} (default: $SPENDLEDGER_LOG_LEVEL, else LiteLLM's $LITELLM_LOG, else INFO)",
    )
    publish = sub.add_parser("publish", help="deliver the outbox (Lago, webhooks) without serving HTTP")
    publish.add_argument("--config", required=True, help=CONFIG_HELP)
    publish.add_argument("--data-dir", help=DATA_DIR_HELP)
    migrate = sub.add_parser("migrate", help="run database migrations and exit")
    migrate.add_argument("--config", help=DATABASE_CONFIG_HELP)
    migrate.add_argument("--data-dir", help=DATA_DIR_HELP)
    export = sub.add_parser("export", help="reconciliation export: usage, exact spend and Lago delivery")
    export.add_argument("--config", required=True, help=CONFIG_HELP)
    export.add_argument("--data-dir", help=DATA_DIR_HELP)
    export.add_argument(
        "--by", choices=["customer", "user", "team"], default="customer", help="group by (default customer)"
    )
    export.add_argument("--period", choices=["day", "month"], default="day", help="UTC periods (default day)")
    export.add_argument("--from", dest="first", type=_day, help="first UTC day, YYYY-MM-DD (inclusive)")
    export.add_argument("--to", dest="last", type=_day, help="last UTC day, YYYY-MM-DD (inclusive)")
    export.add_argument("--format", choices=["csv", "parquet"], default="csv", help="file format (default csv)")
    export.add_argument("--output", default="-", help="file to write, or - for stdout (default)")
    reconcile = sub.add_parser("reconcile", help="list every difference between the ledger and Lago")
    reconcile.add_argument("--config", required=True, help=CONFIG_HELP)
    reconcile.add_argument("--data-dir", help=DATA_DIR_HELP)
    reconcile.add_argument(
        "--against-lago", action="store_true",
        help="read back what Lago holds (each event, each subscription's events and current usage) "
        "instead of comparing with the outbox",
    )  # fmt: skip
    reconcile.add_argument(
        "--concurrency", type=_positive, default=8, help="Lago reads in flight at once (default 8)"
    )
    rebuild_command.add_parser(sub, config_help=DATABASE_CONFIG_HELP, data_dir_help=DATA_DIR_HELP)
    return parser


def _configured_log_level() -> str:
    """$SPENDLEDGER_LOG_LEVEL, else LiteLLM's $LITELLM_LOG, else INFO (as written: `serve` validates it)."""
    return os.environ.get("SPENDLEDGER_LOG_LEVEL") or os.environ.get("LITELLM_LOG") or "INFO"


def _env_log_level() -> str:
    """The level for commands without --log-level (an unknown one is INFO there)."""
    text = _configured_log_level().upper()
    return text if text in LOG_LEVELS else "INFO"


def _logging_from(settings: Settings, level: str) -> None:
    """LiteLLM's `json_logs` chooses the format; the workers and the publisher child inherit both."""
    os.environ["SPENDLEDGER_LOG_LEVEL"] = level
    if settings.json_logs is not None:
        os.environ["SPENDLEDGER_JSON_LOGS"] = "1" if settings.json_logs else "0"
    configure_logging(level, settings.json_logs)


def _log_level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"not a log level ({', '.join(LOG_LEVELS)}): {text[:40]!r}")
    return text.upper()


def _positive(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 256:
        raise argparse.ArgumentTypeError(f"not a whole number from 1 to 256: {text!r}")
    return int(text)


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a day (YYYY-MM-DD): {text!r}") from None


def _database(settings: Settings | None, data_dir: str | None) -> tuple[str, EmbeddedDatabase | None]:
    """DATABASE_URL, else general_settings.database_url, else an embedded PostgreSQL."""
    url = os.environ.get("DATABASE_URL") or (settings.database_url if settings else None)
    if url:
        found = from_prisma(url)  # LiteLLM deployments' Prisma-style parameters
        if found.dropped:
            log.warning("database_url_parameters_ignored", parameters=", ".join(found.dropped))
        if found.pool_limit is not None:  # the serving processes size their pools by it
            os.environ[POOL_LIMIT_ENV] = str(found.pool_limit)
        return found.url, None
    embedded = EmbeddedDatabase(resolve_data_dir(data_dir))
    log.info("embedded_postgres_started", data_dir=str(embedded.data_dir))
    return embedded.url, embedded


def _load(path: str | None) -> Settings | None:
    if path is None:
        return None
    try:
        return load_settings(path)
    except ConfigError as exc:
        print(f"spendledger: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _migrate(url: str) -> None:
    """Run the migrations, or stop with one line saying why the database cannot be used."""
    import asyncpg
    import sqlalchemy.exc

    try:
        run_migrations(url)
    except (OSError, asyncpg.PostgresError, sqlalchemy.exc.DBAPIError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        parts = urlsplit(url)  # named without its password
        where = f"{parts.hostname or parts.query or 'localhost'}:{parts.port or 5432}{parts.path}"
        print(f"spendledger: database error: cannot migrate {where}: {reason}", file=sys.stderr)
        raise SystemExit(1) from None


def _refuse_weak_master_key(settings: Settings) -> None:
    """What serves HTTP needs a master key of the operator's own (ledger/master_key.py): else one
    line naming the fix, and exit code 2, before anything else is said or started."""
    from spendledger.ledger.master_key import master_key_verdict

    verdict = master_key_verdict(settings)
    if verdict.refused:
        print(verdict.refusal(), file=sys.stderr)
        raise SystemExit(2)


def serve(args: argparse.Namespace) -> int:
    # Before prometheus_client is imported (by the app below, by each worker, by the publisher
    # child): one scrape of any worker then counts every process (api/metrics.py).
    metrics_dir = _metrics_dir()
    try:
        return _serve(args)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _metrics_dir() -> str | None:
    """A fresh PROMETHEUS_MULTIPROC_DIR for this server (None: the operator set one, kept)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    path = tempfile.mkdtemp(prefix="spendledger-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from spendledger.api import http_protocol
    from spendledger.api.app import startup_warnings
    from spendledger.ledger.pricing import PriceBook

    settings = _load(args.config)
    assert settings is not None
    _logging_from(settings, args.log_level)
    _refuse_weak_master_key(settings)
    for warning in startup_warnings(settings, PriceBook(settings.deployments)):
        log.warning(**warning)
    url, embedded = _database(settings, args.data_dir)
    publisher: SupervisedPublisher | None = None
    try:
        _migrate(url)
        os.environ["SPENDLEDGER_CONFIG"] = str(args.config)
        os.environ["SPENDLEDGER_DATABASE_URL"] = url
        # The workers deliver nothing themselves: one publisher per deployment, the child below
        # (or, with --no-publisher, a `spendledger publish` the operator runs).
        os.environ["SPENDLEDGER_PUBLISH"] = "0"
        if not args.no_publisher and settings.has_sinks:
            publisher = SupervisedPublisher(publisher_argv(args.config), {**os.environ, "DATABASE_URL": url})
            publisher.start()
        log.info(
            "serving",
            host=args.host,
            port=args.port,
            workers=args.workers,
            models=list(settings.model_names),
            publisher="child" if publisher else "none",
        )
        uvicorn.run(
            "spendledger.api.app:create_app_from_env",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            loop="uvloop",
            http=http_protocol.IMPORT_STRING,  # httptools, with its own 400 as a JSON error envelope
            log_level="warning",
            log_config=None,  # uvicorn's records go through ours (api/logging.py): JSON like the rest
            access_log=False,
            timeout_graceful_shutdown=30,
        )
    finally:
        if publisher is not None:  # after the server: it delivers what the last requests recorded
            publisher.stop()
        if embedded is not None:
            embedded.stop()
    return 0


def publish(args: argparse.Namespace) -> int:
    import uvloop

    become_supervised_child()
    settings = _load(args.config)
    assert settings is not None
    _logging_from(settings, _env_log_level())
    url, embedded = _database(settings, args.data_dir)
    try:
        _migrate(url)
        uvloop.run(_publish_forever(settings, url))
    except KeyboardInterrupt:
        pass
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


async def _publish_forever(settings: Settings, url: str) -> None:
    from spendledger.api.publishing import PublisherRunner
    from spendledger.api.runtime import freeze_startup_heap
    from spendledger.ledger.db import create_pool

    pool = await create_pool(url, min_size=1, max_size=4)
    runner = PublisherRunner(pool, url, settings)
    if not runner.sinks:
        print("spendledger: no sink configured (callbacks: [lago] or alerting: [webhook])", file=sys.stderr)
        raise SystemExit(2)
    log.info("publishing", sinks=[sink.name for sink in runner.sinks])
    freeze_startup_heap()
    # SIGTERM (the server stopping its child, or an operator) cancels the publisher where it waits,
    # so it gives back the rows it claimed and closes its connections: a KeyboardInterrupt raised
    # at any bytecode could leave a connection half-used and the close waiting on it.
    publishing = asyncio.current_task()
    assert publishing is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, publishing.cancel)
    try:
        await runner.publisher.run()
    except asyncio.CancelledError:
        log.info("publisher_stopping")
    finally:
        await runner.stop()
        await pool.close()


def migrate(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    url, embedded = _database(settings, args.data_dir)
    try:
        _migrate(url)
        log.info("migrated")
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


def export(args: argparse.Namespace) -> int:
    """Write the reconciliation export (CSV or Parquet) to a file or stdout."""
    import asyncio

    if args.first and args.last and args.first > args.last:
        print("spendledger: --from is after --to", file=sys.stderr)
        return 2
    settings = _load(args.config)
    url, embedded = _database(settings, args.data_dir)
    try:
        _migrate(url)
        content = asyncio.run(_export(args, url))
    finally:
        if embedded is not None:
            embedded.stop()
    if content is None:
        return 1
    # Built whole before anything is written: a refused export leaves no partial file.
    if args.output == "-":
        sys.stdout.buffer.write(content)
        sys.stdout.buffer.flush()
    else:
        with open(args.output, "wb") as file:
            file.write(content)
    return 0


async def _export(args: argparse.Namespace, url: str) -> bytes | None:
    import asyncpg

    from spendledger.projections.export_files import csv_bytes, parquet_bytes
    from spendledger.projections.reconciliation import ReconciliationError, reconciliation_rows
    from spendledger.projections.spend_logs import day_range

    start, end = day_range(args.first, args.last)
    conn = await asyncpg.connect(url)
    try:
        report = await reconciliation_rows(conn, args.by, args.period, start, end)
        content = csv_bytes(report) if args.format == "csv" else parquet_bytes(report)
    except ReconciliationError as exc:
        print(f"spendledger: export error: {exc}", file=sys.stderr)
        return None
    finally:
        await conn.close()
    log.info("exported", rows=len(report.rows), format=args.format, output=args.output)
    return content


def reconcile(args: argparse.Namespace) -> int:
    """Print every difference between the ledger and Lago, one JSON object a line; exit 1 if any."""
    import asyncio

    settings = _load(args.config)
    assert settings is not None
    if settings.lago is None:
        print(
            'spendledger: Lago is not configured (litellm_settings.callbacks: ["lago"]): nothing to reconcile',
            file=sys.stderr,
        )
        return 2
    url, embedded = _database(settings, args.data_dir)
    try:
        _migrate(url)
        if args.against_lago:
            return asyncio.run(_reconcile_against_lago(url, settings.lago, args.concurrency))
        return asyncio.run(_reconcile(url, settings.lago.charge_by))
    finally:
        if embedded is not None:
            embedded.stop()


async def _reconcile(url: str, charge_by: str) -> int:
    import asyncpg

    from spendledger.projections.lago_reconcile import reconcile

    conn = await asyncpg.connect(url)
    try:
        differences = await reconcile(conn, charge_by)
    finally:
        await conn.close()
    return _report(differences)


async def _reconcile_against_lago(url: str, settings: LagoSettings, concurrency: int) -> int:
    import asyncpg
    import httpx

    from spendledger.ledger.sinks.lago_reader import LagoReader, LagoReadError
    from spendledger.projections.lago_against import against_lago

    conn = await asyncpg.connect(url)
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            differences = await against_lago(conn, settings, LagoReader(settings, client), concurrency)
    except (LagoReadError, httpx.HTTPError) as exc:
        print(f"spendledger: cannot read Lago at {settings.api_base}: {exc or type(exc).__name__}", file=sys.stderr)
        return 2
    finally:
        await conn.close()
    return _report(differences)


def _report(differences: list[dict[str, Any]]) -> int:
    from spendledger.api.jsonio import encoder

    for difference in differences:
        sys.stdout.buffer.write(encoder.encode(difference) + b"\n")
    sys.stdout.buffer.flush()
    if differences:
        print(f"spendledger: {len(differences)} difference(s) between the ledger and Lago", file=sys.stderr)
        return 1
    print("spendledger: the ledger and Lago agree", file=sys.stderr)
    return 0


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def rebuild(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    url, embedded = _database(settings, args.data_dir)
    try:
        _migrate(url)
        return rebuild_command.run_rebuild(url, args.verify_only)
    finally:
        if embedded is not None:
            embedded.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(getattr(args, "log_level", None) or _env_log_level())
    signal.signal(signal.SIGTERM, _terminate)
    command = {
        "serve": serve,
        "publish": publish,
        "migrate": migrate,
        "export": export,
        "reconcile": reconcile,
        "rebuild": rebuild,
    }[args.command]
    return command(args)


if __name__ == "__main__":
    raise SystemExit(main())
