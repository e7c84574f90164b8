"""Test support: throwaway PostgreSQL databases and a real `spendledger serve` process.

Databases come from one PostgreSQL per test session — `TEST_DATABASE_URL` if set (any database on
a server where we may CREATE DATABASE), else an embedded `pgserver` in the system temp dir. The
schema is migrated once into a template; each test gets a fresh copy (CREATE DATABASE … TEMPLATE).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from spendledger.ledger.db import run_migrations

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# One template per pytest-xdist worker: workers sharing a TEST_DATABASE_URL server must not drop
# each other's template while they copy it.
TEMPLATE = "sl_test_template" + (f"_{os.environ['PYTEST_XDIST_WORKER']}" if "PYTEST_XDIST_WORKER" in os.environ else "")


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


class PostgresForTests:
    """One server for the session: the admin URL, and databases cloned from a migrated template."""

    def __init__(self) -> None:
        self._server: Any = None
        self._dir: str | None = None
        url = os.environ.get("TEST_DATABASE_URL")
        if url is None:
            import pgserver

            self._dir = tempfile.mkdtemp(prefix="sl-test-pg-")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._server = pgserver.get_server(self._dir, cleanup_mode="stop")
            url = self._server.get_uri()
        self.admin_url = url
        self._prepare_template()

    def _admin(self, sql: str) -> None:
        import asyncio

        import asyncpg

        async def run() -> None:
            conn = await asyncpg.connect(self.admin_url)
            try:
                await conn.execute(sql)
            finally:
                await conn.close()

        asyncio.run(run())

    def _prepare_template(self) -> None:
        self._admin(f"drop database if exists {TEMPLATE} with (force)")
        self._admin(f"create database {TEMPLATE}")
        run_migrations(with_database(self.admin_url, TEMPLATE))

    def new_database(self) -> str:
        name = f"sl_test_{uuid.uuid4().hex[:12]}"
        self._admin(f"create database {name} template {TEMPLATE}")
        return with_database(self.admin_url, name)

    def drop_database(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        self._admin(f"drop database if exists {name} with (force)")

    def close(self) -> None:
        if self._server is not None:
            self._server.cleanup()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    port: int
    database_url: str
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def run_server(
    config_text: str,
    database_url: str,
    env: dict[str, str] | None = None,
    workers: int = 1,
    startup_timeout_s: float = 30.0,
    args: Sequence[str] = (),
) -> Iterator[RunningServer]:
    """Start `spendledger serve` (plus `args`) as a real process on a free port; stop it with SIGTERM."""
    workdir = Path(tempfile.mkdtemp(prefix="sl-serve-"))
    config_path = workdir / "config.yaml"
    config_path.write_text(config_text)
    log_path = workdir / "server.log"
    port = free_port()
    process_env = {**os.environ, "DATABASE_URL": database_url, **(env or {})}
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "spendledger.api",
                "serve",
                "--config",
                str(config_path),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                str(workers),
                *args,
            ],
            cwd=PROJECT_ROOT,
            env=process_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    server = RunningServer(process=process, port=port, database_url=database_url, log_path=log_path)
    try:
        _wait_ready(server, startup_timeout_s)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_ready(server: RunningServer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"spendledger exited with {server.process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.base_url}/health/readiness", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"spendledger did not become ready in {timeout_s}s:\n{server.log()}")


def openapi_document(config_text: str) -> dict[str, Any]:
    """The OpenAPI document that `spendledger serve` answers at /schema/openapi.json for this config,
    built in process (the app is created, its lifespan not run: no database is needed)."""
    from spendledger.ledger.config import load_settings

    with tempfile.TemporaryDirectory(prefix="sl-openapi-") as directory:
        config_path = Path(directory) / "config.yaml"
        config_path.write_text(config_text)
        settings = load_settings(config_path)
    with warnings.catch_warnings():
        # Litestar's deprecation notices about parameter declaration styles (at import, per route).
        warnings.simplefilter("ignore", DeprecationWarning)
        from spendledger.api.app import create_app

        app = create_app(settings, "postgresql://unused.invalid/none")
        document: dict[str, Any] = app.openapi_schema.to_schema()
    return document
