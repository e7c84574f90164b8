"""Issue 15, finding 4: after one `kill -9` of `spendledger serve` on the embedded default, the dead
server's PID stayed in pgserver's list of the data directory's users, so no later server ever
stopped the embedded PostgreSQL when it was stopped (each thought another process still used it).

The test serves an embedded data directory (no DATABASE_URL), kills the server with SIGKILL,
serves it again and stops that server with SIGTERM: no PostgreSQL may be left on the directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support import PROJECT_ROOT, free_port

MASTER_KEY = "sk-adversarial-93d1f0b7c6a54e28b1d0e9f8a7c6b5d4"
CONFIG = f"""
model_list:
  - model_name: mock-model
    litellm_params:
      model: mock/demo
general_settings:
  master_key: {MASTER_KEY}
"""


@pytest.fixture
def workdir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="sl-embedded-"))  # the system temp dir
    (directory / "config.yaml").write_text(CONFIG)
    try:
        yield directory
    finally:
        _stop_leftover_postgres(directory / "data")
        shutil.rmtree(directory, ignore_errors=True)


def _postmaster_pid(data_dir: Path) -> int | None:
    """The PID of the PostgreSQL running on `data_dir` (postmaster.pid), None when none runs."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    return pid if psutil.pid_exists(pid) else None


def _stop_leftover_postgres(data_dir: Path) -> None:
    if _postmaster_pid(data_dir) is not None:
        import pgserver

        user = "pgserver" if os.geteuid() == 0 else None  # as pgserver runs it when root
        pgserver.pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=data_dir, user=user)


def _serve(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """`spendledger serve` on the embedded default in workdir/data, ready to answer."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "SPENDLEDGER_DATA_DIR")}
    port = free_port()
    args = ["serve", "--config", str(workdir / "config.yaml"), "--data-dir", str(workdir / "data")]
    args += ["--host", "127.0.0.1", "--port", str(port)]
    with (workdir / f"serve-{port}.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "spendledger.api", *args],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, (workdir / f"serve-{port}.log").read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/readiness", timeout=1).status_code == 200:
                return process, port
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise AssertionError((workdir / f"serve-{port}.log").read_text())


def test_sigterm_after_a_killed_server_stops_the_embedded_database(workdir: Path) -> None:
    data_dir = workdir / "data"
    first, _ = _serve(workdir)
    postgres = _postmaster_pid(data_dir)
    assert postgres is not None
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert _postmaster_pid(data_dir) == postgres  # orphaned, as after any kill -9

    second, port = _serve(workdir)  # takes over the PostgreSQL left running
    assert _postmaster_pid(data_dir) == postgres
    assert httpx.get(f"http://127.0.0.1:{port}/health/readiness").status_code == 200
    second.send_signal(signal.SIGTERM)
    second.wait(timeout=60)

    assert _postmaster_pid(data_dir) is None, "SIGTERM left the embedded PostgreSQL running"
    assert _exits(postgres), "the embedded PostgreSQL's process is still there"


def _exits(pid: int, within_s: float = 10) -> bool:
    """pg_ctl's wait ends when postmaster.pid is gone: the process itself may take a moment more."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False
