"""One scrape counts every process (issue 19): with two workers and the publisher child, /metrics of
either worker sums all of them — each request once, and the deliveries the child made."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.enforcement_support import wait_until
from tests.e2e.outbox_support import chats, db_counts, lago_env, outbox_config
from tests.fakes.lago import FakeLago, RunningLago, run_fake_lago
from tests.fakes.upstream import RunningUpstream
from tests.support import run_server


@pytest.fixture
def lago() -> Iterator[RunningLago]:
    with run_fake_lago(FakeLago()) as running:
        yield running


def samples(base_url: str, prefix: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return sum(
        float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith(prefix) and not line.startswith("#")
    )


def test_every_scrape_sums_both_workers_and_the_publisher_child(
    upstream: RunningUpstream, lago: RunningLago, database_url: str
) -> None:
    config = outbox_config(upstream.base_url, lago=True)
    with run_server(config, database_url, env=lago_env(lago.base_url), workers=2) as server:
        # New connections each, so that both workers serve some (uvicorn's workers share the socket).
        chats(server.base_url, [f"metered-{i}" for i in range(12)])
        assert wait_until(lambda: db_counts(database_url) == {"delivered": 12}, 30), server.log()
        for _ in range(6):  # whichever worker answers the scrape
            assert samples(server.base_url, 'spendledger_requests_total{route="chat.completions",status="success"}') == 12
        assert wait_until(lambda: samples(server.base_url, 'spendledger_outbox_delivered_total{sink="lago"}') == 12, 10)
