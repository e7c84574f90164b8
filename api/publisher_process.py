"""The publisher child of `spendledger serve`: started with the server, restarted if it dies,
stopped after it.

Delivering the outbox (following the log, signing webhooks, POSTing to Lago) is work no request
waits for. In a process of its own it leaves the serving event loop to the requests, and it runs
once per deployment however many `--workers` serve. (Run at a lower scheduling priority it measured
no better: docs/benchmarks.md, issue 17.)
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Final

import structlog

log = structlog.get_logger(__name__)

FIRST_RESTART_S: Final = 1.0
MAX_RESTART_S: Final = 30.0
# A child that ran this long before it died starts again after FIRST_RESTART_S: its death was not
# part of a crash loop.
HEALTHY_RUN_S: Final = 60.0
STOP_WAIT_S: Final = 15.0
_PR_SET_PDEATHSIG: Final = 1
SUPERVISOR_PID: Final = "SPENDLEDGER_SUPERVISOR_PID"


def publisher_argv(config: str) -> list[str]:
    """`spendledger publish` from the Python and the package the server runs from."""
    return [sys.executable, "-m", "spendledger.api", "publish", "--config", config]


def become_supervised_child() -> None:
    """Called first thing by `spendledger publish` when its parent is `serve`'s supervisor (in the
    child, not between fork and exec, where a multi-threaded parent's locks could hang it): die with
    the server even if that is SIGKILLed — never an orphan publishing for a server that is gone."""
    parent = os.environ.get(SUPERVISOR_PID)
    if parent is None:
        return
    with contextlib.suppress(OSError, AttributeError):  # Linux only; elsewhere the stop is relied on
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # the server died before the signal was asked for
        raise SystemExit(0)


class SupervisedPublisher:
    """Runs `argv` as a child process in its own session (a Ctrl-C at the terminal reaches the
    server, which then stops the child after its last request), and starts it again when it dies:
    after 1 s, doubling to 30 s while it keeps dying young."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str]) -> None:
        self._argv = list(argv)
        self._env = {**env, SUPERVISOR_PID: str(os.getpid())}
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._child: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._supervise, name="publisher-supervisor", daemon=True)
        self.starts = 0

    @property
    def child(self) -> subprocess.Popen[bytes] | None:
        """The child last started."""
        return self._child

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the child (SIGTERM, then SIGKILL after STOP_WAIT_S) and do not start it again."""
        self._stopping.set()
        with self._lock:
            child = self._child
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self._thread.join(STOP_WAIT_S)

    def _supervise(self) -> None:
        delay = FIRST_RESTART_S
        while not self._stopping.is_set():
            started = time.monotonic()
            with self._lock:
                if self._stopping.is_set():
                    return
                self._child = subprocess.Popen(self._argv, env=self._env, start_new_session=True)
                self.starts += 1
            log.info("publisher_started", pid=self._child.pid, starts=self.starts)
            code = self._child.wait()
            if self._stopping.is_set():
                return
            ran = time.monotonic() - started
            delay = FIRST_RESTART_S if ran >= HEALTHY_RUN_S else delay
            log.error("publisher_exited", code=code, ran_s=round(ran, 1), restart_in_s=delay)
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, MAX_RESTART_S)
