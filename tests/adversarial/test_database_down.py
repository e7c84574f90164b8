"""Issue 15, finding 2: with PostgreSQL stopped, every route answered 500 `internal_error`.

A database that is down is the server's state, not a bug: any route says 503 `ledger_unavailable`
with a `retry-after`, names nothing of the database, readiness says the database is down, and all
of it recovers once PostgreSQL is back. The test stops and restarts a PostgreSQL of its own.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_bad_input import assert_envelope
from tests.support import RunningServer, run_server

MASTER_KEY = "sk-adversarial-4e7a1c9b0d2f48e6a3b5c7d9e1f30a2b"
AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
CONFIG = f"""
model_list:
  - model_name: mock-model
    litellm_params:
      model: mock/demo
    model_info:
      input_cost_per_token: 0.000001
      output_cost_per_token: 0.000003
general_settings:
  master_key: {MASTER_KEY}
"""
CHAT = {"model": "mock-model", "user": "db-down-customer", "messages": [{"role": "user", "content": "hello"}]}


@dataclass
class StoppablePostgres:
    """An embedded PostgreSQL this test may stop and start again (with pgserver's own binaries)."""

    directory: Path
    handle: Any

    @property
    def url(self) -> str:
        return str(self.handle.get_uri())

    def _pg_ctl(self, *args: str) -> None:
        import pgserver

        pgserver.pg_ctl(["-w", *args], pgdata=self.directory, user=self.handle.system_user, timeout=60)

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "stop")

    def start(self) -> None:
        """As pgserver starts it: no TCP, the socket in the same directory as before."""
        socket_dir = self.handle.get_postmaster_info().socket_dir
        self._pg_ctl("-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(self.directory / "log"), "start")

    def running(self) -> bool:
        return (self.directory / "postmaster.pid").exists()


@pytest.fixture
def stoppable_postgres() -> Iterator[StoppablePostgres]:
    import pgserver

    directory = Path(tempfile.mkdtemp(prefix="sl-db-down-"))  # the system temp dir
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # No cleanup by pgserver: the server it would stop is gone once restarted under its feet.
        handle = pgserver.get_server(directory, cleanup_mode=None)
    postgres = StoppablePostgres(directory, handle)
    try:
        yield postgres
    finally:
        if postgres.running():
            postgres.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _assert_ledger_unavailable(response: httpx.Response, postgres: StoppablePostgres) -> None:
    error = assert_envelope(response, 503, "ledger_unavailable")
    assert int(response.headers["retry-after"]) > 0, response.headers
    for secret in (MASTER_KEY, str(postgres.directory), postgres.url):
        assert secret not in error["message"], error


def _wait_ready(server: RunningServer, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(f"{server.base_url}/health/readiness", timeout=5).status_code == 200:
            return
        time.sleep(0.2)
    raise AssertionError(f"not ready again within {timeout_s}s:\n{server.log()[-4000:]}")


def test_database_down_is_503_with_retry_after_on_any_route_and_recovers(
    stoppable_postgres: StoppablePostgres,
) -> None:
    with run_server(CONFIG, stoppable_postgres.url) as server:
        base = server.base_url
        key = httpx.post(f"{base}/key/generate", headers=AUTH, json={}).json()["key"]  # not cached yet
        assert httpx.post(f"{base}/chat/completions", headers=AUTH, json=CHAT).status_code == 200

        stoppable_postgres.stop()
        readiness = httpx.get(f"{base}/health/readiness")
        assert readiness.status_code == 503, readiness.text
        assert readiness.json()["db"].startswith("unreachable"), readiness.text
        for method, path, headers, body in [
            ("GET", "/customer/list", AUTH, None),
            ("POST", "/customer/new", AUTH, {"user_id": "created-while-down"}),
            ("POST", "/key/generate", AUTH, {}),
            ("GET", "/spend/logs", AUTH, None),
            ("POST", "/chat/completions", AUTH, CHAT),  # admission needs the ledger
            ("POST", "/chat/completions", {"Authorization": f"Bearer {key}"}, CHAT),  # key lookup
        ]:
            response = httpx.request(method, f"{base}{path}", headers=headers, json=body, timeout=30)
            _assert_ledger_unavailable(response, stoppable_postgres)

        stoppable_postgres.start()
        _wait_ready(server)
        assert httpx.post(f"{base}/chat/completions", headers=AUTH, json=CHAT).status_code == 200
        keyed = httpx.post(f"{base}/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=CHAT)
        assert keyed.status_code == 200, keyed.text
        customers = httpx.get(f"{base}/customer/list", headers=AUTH)
        assert customers.status_code == 200, customers.text
        assert "created-while-down" not in customers.text
        assert "unhandled_error" not in server.log(), server.log()[-4000:]
