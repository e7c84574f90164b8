"""`spendledger serve` delivers the outbox from one supervised child process, however many workers
serve: restarted when it dies (nothing lost, nothing sent twice), stopped with the server, and never
left behind by a server that is SIGKILLed. Readiness says when no publisher reports at all."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.enforcement_support import query, wait_until
from tests.e2e.outbox_support import (
    assert_lago_exactly_once,
    chats,
    closed_url,
    db_counts,
    lago_env,
    outbox_config,
    run_publisher,
)
from tests.fakes.lago import FakeLago, RunningLago, run_fake_lago
from tests.fakes.upstream import RunningUpstream
from tests.support import run_server


@pytest.fixture
def lago() -> Iterator[RunningLago]:
    with run_fake_lago(FakeLago()) as running:
        yield running


def reporter_pid(database_url: str) -> int | None:
    """The pid of the process that last reported on Lago's delivery (`host:pid`)."""
    rows = query(database_url, "select reporter from publisher_health where sink = 'lago'")
    return int(rows[0]["reporter"].rsplit(":", 1)[1]) if rows else None


def parent_of(pid: int) -> int:
    # /proc/<pid>/stat: "pid (comm) state ppid …"; comm may hold spaces, so split after its ")".
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if parent_of(int(entry.name)) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass  # exited meanwhile
    return found


def publishing(pid: int) -> bool:
    try:
        return b"publish" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False


def gone(pid: int) -> bool:
    """Exited and reaped, or a zombie left for init to reap."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def readiness(base_url: str) -> dict[str, object]:
    response = httpx.get(f"{base_url}/health/readiness", timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def test_two_workers_one_publisher_child_restarted_when_killed_and_stopped_with_the_server(
    upstream: RunningUpstream, lago: RunningLago, database_url: str
) -> None:
    config = outbox_config(upstream.base_url, lago=True)
    with run_server(config, database_url, env=lago_env(lago.base_url), workers=2) as server:
        first = chats(server.base_url, [f"child-{i}" for i in range(5)])
        assert wait_until(lambda: db_counts(database_url) == {"delivered": 5}, 30), server.log()
        child = reporter_pid(database_url)
        assert child is not None and parent_of(child) == server.process.pid
        assert [pid for pid in children_of(server.process.pid) if publishing(pid)] == [child]
        assert readiness(server.base_url)["publisher"] == {"lago": "ok"}

        os.kill(child, signal.SIGKILL)
        second = chats(server.base_url, [f"orphaned-{i}" for i in range(5)])  # served meanwhile
        assert wait_until(lambda: reporter_pid(database_url) not in (None, child), 30), server.log()
        assert wait_until(lambda: db_counts(database_url) == {"delivered": 10}, 30), server.log()
        restarted = reporter_pid(database_url)
        assert restarted is not None and parent_of(restarted) == server.process.pid
        ready = readiness(server.base_url)
        assert (ready["status"], ready["publisher"]) == ("healthy", {"lago": "ok"})
    assert wait_until(lambda: gone(restarted), 10)
    ledger = assert_lago_exactly_once(lago, database_url, expected=10)
    assert set(ledger) == set(first + second)


def test_a_server_killed_outright_takes_its_publisher_child_with_it(
    upstream: RunningUpstream, lago: RunningLago, database_url: str
) -> None:
    config = outbox_config(upstream.base_url, lago=True)
    with run_server(config, database_url, env=lago_env(lago.base_url)) as server:
        assert wait_until(lambda: reporter_pid(database_url) is not None, 30), server.log()
        child = reporter_pid(database_url)
        assert child is not None and not gone(child)
        server.process.kill()
        server.process.wait()
        assert wait_until(lambda: gone(child), 10)


def test_without_its_publisher_readiness_says_delivery_is_not_running_until_one_reports(
    upstream: RunningUpstream, lago: RunningLago, database_url: str
) -> None:
    config = outbox_config(upstream.base_url, lago=True)
    env = lago_env(lago.base_url)
    with run_server(config, database_url, env=env, args=["--no-publisher"]) as server:
        assert readiness(server.base_url)["status"] == "degraded"
        assert readiness(server.base_url)["publisher"] == {"lago": "not_running"}
        assert children_of(server.process.pid) == []
        with run_publisher(config, database_url, env) as publisher:
            assert wait_until(lambda: readiness(server.base_url)["status"] == "healthy", 30), publisher.log()
            assert readiness(server.base_url)["publisher"] == {"lago": "ok"}


def test_a_stopping_server_stops_its_publisher_at_once_and_leaves_no_rows_leased(
    upstream: RunningUpstream, database_url: str
) -> None:
    """Lago unreachable, so the child is mid-cycle (claiming, failing, backing off) when SIGTERM comes:
    it is cancelled where it waits, gives back what it claimed and closes its connections — not left
    to the supervisor's SIGKILL with its claim still leasing the rows away from the next publisher."""
    config = outbox_config(upstream.base_url, lago=True)
    for round_ in range(4):
        with run_server(config, database_url, env=lago_env(closed_url())) as server:
            chats(server.base_url, [f"stop-{round_}-{i}" for i in range(10)])
            stopping = time.monotonic()
        assert server.process.returncode == 0
        assert time.monotonic() - stopping < 10  # the supervisor's SIGKILL comes after 15 s
        live = query(database_url, "select count(*) as n from outbox_claims where lease_until > now()")
        assert live[0]["n"] == 0
