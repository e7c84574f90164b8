"""A server killed mid-request no longer blocks its customers' budgets until its holds expire.

On 8e40733 the hold of a request in flight when its server was SIGKILLed lived for the upstream
timeout plus a grace — 10.5 minutes with the defaults — and the customer was refused meanwhile.
Now the hold is marked with its process, every serving process beats, and a process that stops
beating has its holds given back by the others (here: 2 s of silence, SPENDLEDGER_PROCESS_STALE_S).
"""

from __future__ import annotations

import contextlib
import threading
import time
from decimal import Decimal

import httpx

from tests.e2e.conftest import proxy_config
from tests.e2e.enforcement_support import chat, hold_of, post, query, wait_until
from tests.fakes.upstream import RunningUpstream
from tests.support import PostgresForTests, run_server

ENV = {"SPENDLEDGER_PROCESS_STALE_S": "2"}


def test_the_holds_of_a_killed_server_go_back_within_seconds(
    postgres: PostgresForTests, upstream: RunningUpstream
) -> None:
    url = postgres.new_database()
    config = proxy_config(upstream.base_url)
    customer = "killed-mid-request"
    with run_server(config, url, env=ENV) as doomed:
        # Room for one request's worst case, not two.
        room = hold_of() * Decimal("1.5")
        assert post(doomed.base_url, "/customer/new", {"user_id": customer, "max_budget": str(room)}).status_code == 200
        upstream.app.delay_s = 60
        threading.Thread(target=_chat_quietly, args=(doomed.base_url, customer), daemon=True).start()
        assert wait_until(lambda: bool(query(url, "select 1 from holds where owner is not null")), timeout_s=10)
        doomed.process.kill()  # SIGKILL: no settle, no release
        doomed.process.wait()
    upstream.app.delay_s = 0
    with run_server(config, url, env=ENV) as survivor:
        started = time.monotonic()
        assert chat(survivor.base_url, customer).status_code == 429  # the dead request still holds
        assert wait_until(lambda: chat(survivor.base_url, customer).status_code == 200, timeout_s=30)
        assert time.monotonic() - started < 30  # not 10.5 minutes
        (row,) = query(url, "select held, spent from budget_usage where scope = 'customer' and scope_id = $1", customer)
        assert row["held"] == 0 and row["spent"] > 0
        assert query(url, "select owner from holds") == []
    postgres.drop_database(url)


def _chat_quietly(base_url: str, customer: str) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the server is killed under it
        chat(base_url, customer)
