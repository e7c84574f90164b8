"""The supervisor of `serve`'s publisher child, on stand-in children: a child that dies is started
again (after 1 s, then 2 s), a stop ends the child at once and starts no other, and a child whose
server is not its parent any more exits before it publishes anything."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from spendledger.api.publisher_process import SUPERVISOR_PID, SupervisedPublisher


def wait_for(condition: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return True
        time.sleep(0.05)
    return False


def test_a_child_that_dies_is_started_again_with_a_growing_delay() -> None:
    supervisor = SupervisedPublisher([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ))
    started = time.monotonic()
    supervisor.start()
    try:
        assert wait_for(lambda: supervisor.starts >= 3, 15)
        # Three starts need the 1 s and the 2 s waits between them: not a tight loop.
        assert time.monotonic() - started >= 2.9
    finally:
        supervisor.stop()
    starts = supervisor.starts
    time.sleep(1.5)
    assert supervisor.starts == starts  # stopped: not started again


def test_stop_ends_a_running_child_at_once() -> None:
    supervisor = SupervisedPublisher([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ))
    supervisor.start()
    assert wait_for(lambda: supervisor.starts == 1, 10)
    child = supervisor.child
    assert child is not None and child.poll() is None
    began = time.monotonic()
    supervisor.stop()
    assert time.monotonic() - began < 5
    assert child.poll() is not None  # terminated and reaped
    assert supervisor.starts == 1


def test_a_child_whose_server_is_gone_exits_before_publishing() -> None:
    script = "from api.publisher_process import become_supervised_child; become_supervised_child(); print('publishing')"
    orphan = subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, SUPERVISOR_PID: "1"}, capture_output=True, text=True
    )
    assert (orphan.returncode, orphan.stdout) == (0, "")
    supervised = subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, SUPERVISOR_PID: str(os.getpid())}, capture_output=True, text=True
    )
    assert (supervised.returncode, supervised.stdout) == (0, "publishing\n")
