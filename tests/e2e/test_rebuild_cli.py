"""`spendledger rebuild` against a running server's database: verify, find a planted difference, swap."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.e2e.enforcement_support import chat, customer_info, post, query, unit_cost
from tests.support import PROJECT_ROOT, RunningServer


def rebuild(database_url: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spendledger.api", "rebuild", *flags],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "DATABASE_URL": database_url},
        timeout=120,
    )


def test_rebuild_verifies_repairs_and_swaps_under_a_running_server(server: RunningServer) -> None:
    assert (
        post(server.base_url, "/customer/new", {"user_id": "rb-customer", "max_budget": 5}).status_code == 200
    )
    for _ in range(3):
        assert chat(server.base_url, "rb-customer").status_code == 200
    verified = rebuild(server.database_url, "--verify-only")
    assert verified.returncode == 0, verified.stderr
    assert "equal the live ones" in verified.stdout and "events/s" in verified.stdout

    query(
        server.database_url,
        "update spend_totals set spend = 0 where scope = 'customer' and scope_id = 'rb-customer'",
    )
    planted = rebuild(server.database_url, "--verify-only")
    assert planted.returncode == 1
    assert "DIFFERENT spend_totals" in planted.stderr and "rb-customer" in planted.stderr

    swapped = rebuild(server.database_url)
    assert "swapped in" in (swapped.stdout + swapped.stderr)
    # The running server keeps serving, on the rebuilt tables, and counts on from the truth.
    assert chat(server.base_url, "rb-customer").status_code == 200
    assert customer_info(server.base_url, "rb-customer")["spend"] == 4 * unit_cost()
    assert (
        query(
            server.database_url,
            "select spend from spend_totals where scope = 'customer' and scope_id = 'rb-customer'",
        )[0]["spend"]
        == 4 * unit_cost()
    )
    assert rebuild(server.database_url, "--verify-only").returncode == 0
