"""Strict budgets under concurrency (two server processes), budget periods, rate limits, holds."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import httpx
import pytest

from tests.e2e.conftest import proxy_config
from tests.e2e.enforcement_support import (
    AUTH,
    away_from_minute_edge,
    chat,
    customer_info,
    decimal_json,
    hold_of,
    post,
    query,
    unit_cost,
    wait_until,
)
from tests.fakes.upstream import RunningUpstream
from tests.support import PostgresForTests, RunningServer, run_server


@pytest.fixture(scope="module")
def two_servers(
    postgres: PostgresForTests, upstream: RunningUpstream
) -> Iterator[tuple[RunningServer, RunningServer]]:
    """Two server processes sharing one database, as two replicas would."""
    url = postgres.new_database()
    config = proxy_config(upstream.base_url)
    with run_server(config, url) as first, run_server(config, url) as second:
        yield first, second
    postgres.drop_database(url)


def test_concurrent_requests_never_overspend_a_budget_shared_by_two_processes(
    two_servers: tuple[RunningServer, RunningServer], upstream: RunningUpstream
) -> None:
    first, second = two_servers
    customer = "contended-customer"
    room = 10
    max_budget = room * hold_of() + hold_of() / 2  # room for exactly 10 holds
    assert (
        post(
            first.base_url, "/customer/new", {"user_id": customer, "max_budget": str(max_budget)}
        ).status_code
        == 200
    )
    upstream.app.delay_s = 4  # every admitted request is still in flight while the others arrive
    start = threading.Barrier(100)

    def send(index: int) -> int:
        server = first if index % 2 else second
        start.wait()
        return chat(server.base_url, customer).status_code

    with ThreadPoolExecutor(max_workers=100) as pool:
        statuses = list(pool.map(send, range(100)))
    admitted = statuses.count(200)
    assert set(statuses) <= {200, 429}
    assert 1 <= admitted <= room
    assert statuses.count(429) == 100 - admitted
    spend = customer_info(first.base_url, customer)["spend"]
    assert spend == admitted * unit_cost()
    assert spend <= max_budget
    usage = query(
        first.database_url,
        "select held, spent from budget_usage where scope = 'customer' and scope_id = $1",
        customer,
    )
    assert usage[0]["held"] == 0 and usage[0]["spent"] == spend
    refused = query(
        first.database_url,
        "select count(*) as n from events where type = 'RequestRefused' and data->>'customer_id' = $1",
        customer,
    )
    assert refused[0]["n"] == 100 - admitted


def test_a_budget_with_room_for_ten_real_requests_admits_at_least_six_of_fifty_at_once(
    two_servers: tuple[RunningServer, RunningServer], upstream: RunningUpstream
) -> None:
    """Issue 18's target for a tight hold: a short message with `max_tokens` 16, each request really
    costing a tenth of the budget; 50 arrive at once across two processes, all in flight together.
    The hold bounds the prompt by its text (one token per byte, OpenAI's chat format), not by the
    body's JSON: on the JSON bound one request of the 50 was admitted."""
    first, second = two_servers
    customer = "ten-real-requests"
    upstream.app.reply_words = 16  # each reply uses its whole max_tokens
    real_cost = unit_cost(reply_tokens=16)
    budget = 10 * real_cost
    assert post(first.base_url, "/customer/new", {"user_id": customer, "max_budget": str(budget)}).status_code == 200
    upstream.app.delay_s = 4  # every admitted request is still in flight while the others arrive
    start = threading.Barrier(50)

    def send(index: int) -> int:
        start.wait()
        return chat((first if index % 2 else second).base_url, customer, max_tokens=16).status_code

    with ThreadPoolExecutor(max_workers=50) as pool:
        statuses = list(pool.map(send, range(50)))
    admitted = statuses.count(200)
    assert statuses.count(429) == 50 - admitted
    assert admitted == int(budget / hold_of(max_tokens=16)) >= 6  # every hold that fits, and no fewer than 6
    spend = customer_info(first.base_url, customer)["spend"]
    assert spend == admitted * real_cost <= budget


def test_a_customer_blocked_elsewhere_is_refused_by_a_process_that_leased_their_budget(
    two_servers: tuple[RunningServer, RunningServer],
) -> None:
    """Budget leases (ledger/leases.py) admit without asking PostgreSQL; a change made through
    another process still reaches them at once (sl_scope_changed): no request is admitted on what
    the lease knew."""
    first, second = two_servers
    customer = "leased-then-blocked"
    assert post(first.base_url, "/customer/new", {"user_id": customer, "max_budget": 5}).status_code == 200
    leases = "select amount from holds where call_id like 'lease:%'"
    for _ in range(50):
        assert chat(first.base_url, customer).status_code == 200
        if query(first.database_url, leases):
            break
    assert query(first.database_url, leases), "the first process never leased the customer's budget"
    assert chat(first.base_url, customer).status_code == 200
    assert post(second.base_url, "/customer/block", {"user_ids": [customer]}).status_code == 200
    time.sleep(0.2)  # the notification's way to the first process
    refused = chat(first.base_url, customer)
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "customer_blocked"
    assert wait_until(lambda: not query(first.database_url, leases), timeout_s=5)  # given back
    usage = query(
        first.database_url,
        "select held, spent from budget_usage where scope = 'customer' and scope_id = $1",
        customer,
    )
    assert usage[0]["held"] == 0 and usage[0]["spent"] == customer_info(first.base_url, customer)["spend"]


def _metrics(base_url: str) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return {
        name: float(value)
        for name, _, value in (line.rpartition(" ") for line in text.splitlines())
        if name.startswith(("spendledger_requests_total{", "spendledger_admissions_total{"))
    }


def test_metrics_count_requests_and_how_their_admissions_were_decided(
    two_servers: tuple[RunningServer, RunningServer],
) -> None:
    server = two_servers[0]
    assert post(server.base_url, "/customer/new", {"user_id": "counted", "max_budget": 5}).status_code == 200
    assert post(server.base_url, "/customer/new", {"user_id": "broke", "max_budget": 0}).status_code == 200
    before = _metrics(server.base_url)
    for _ in range(20):
        assert chat(server.base_url, "counted").status_code == 200
        time.sleep(0.01)  # time for the first request's lease to be granted
    assert chat(server.base_url, "broke").status_code == 429
    after = _metrics(server.base_url)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta('spendledger_requests_total{route="chat.completions",status="success"}') == 20
    assert delta('spendledger_requests_total{route="chat.completions",status="refused"}') == 1
    under_lease = delta('spendledger_admissions_total{outcome="admitted",path="lease"}')
    one_by_one = delta('spendledger_admissions_total{outcome="admitted",path="database"}')
    assert under_lease + one_by_one == 20 and under_lease >= 10 and one_by_one >= 1
    assert delta('spendledger_admissions_total{outcome="refused",path="database"}') == 1


def test_a_new_budget_period_starts_at_zero_without_overwriting_the_last(
    two_servers: tuple[RunningServer, RunningServer],
) -> None:
    server = two_servers[0]
    customer = "periodic-customer"
    budget = hold_of() + unit_cost() / 2  # one request fits a period, a second does not
    created = post(
        server.base_url,
        "/customer/new",
        {"user_id": customer, "max_budget": str(budget), "budget_duration": "4s"},
    )
    assert created.status_code == 200, created.text
    info = customer_info(server.base_url, customer)
    reset_at = info["litellm_budget_table"]["budget_reset_at"]
    assert reset_at is not None
    # Start right after a period begins, so that two requests surely fall into one period.
    wait_until(
        lambda: (
            customer_info(server.base_url, customer)["litellm_budget_table"]["budget_reset_at"] != reset_at
        ),
        timeout_s=6,
        interval_s=0.05,
    )
    assert chat(server.base_url, customer).status_code == 200
    assert chat(server.base_url, customer).status_code == 429
    assert customer_info(server.base_url, customer)["spend"] == unit_cost()
    time.sleep(4.2)
    assert customer_info(server.base_url, customer)["spend"] == 0
    assert chat(server.base_url, customer).status_code == 200
    assert customer_info(server.base_url, customer)["spend"] == unit_cost()
    periods = query(
        server.database_url,
        "select spent from budget_usage where scope = 'customer' "
        "and scope_id = $1 and spent > 0 order by period_start",
        customer,
    )
    assert [row["spent"] for row in periods] == [unit_cost(), unit_cost()]


def test_tpm_counts_total_tokens_and_refuses_within_the_minute(
    two_servers: tuple[RunningServer, RunningServer],
) -> None:
    first, second = two_servers
    assert post(first.base_url, "/budget/new", {"budget_id": "tpm-tier", "tpm_limit": 20}).status_code == 200
    assert (
        post(
            first.base_url, "/customer/new", {"user_id": "tpm-customer", "budget_id": "tpm-tier"}
        ).status_code
        == 200
    )
    away_from_minute_edge()
    ok = chat(first.base_url, "tpm-customer")
    assert ok.status_code == 200
    assert ok.json()["usage"]["total_tokens"] >= 20
    refused = chat(second.base_url, "tpm-customer")  # the other process sees the same counter
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "rate_limit_exceeded"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert 1 <= int(refused.headers["retry-after"]) <= 60


def test_max_parallel_requests_is_shared_across_processes(
    two_servers: tuple[RunningServer, RunningServer], upstream: RunningUpstream
) -> None:
    first, second = two_servers
    assert (
        post(
            first.base_url, "/budget/new", {"budget_id": "serial-tier", "max_parallel_requests": 1}
        ).status_code
        == 200
    )
    assert (
        post(
            first.base_url, "/customer/new", {"user_id": "serial-customer", "budget_id": "serial-tier"}
        ).status_code
        == 200
    )
    upstream.app.delay_s = 1.0
    results: list[int] = []
    slow = threading.Thread(
        target=lambda: results.append(chat(first.base_url, "serial-customer").status_code)
    )
    slow.start()
    time.sleep(0.4)
    refused = chat(second.base_url, "serial-customer")
    slow.join()
    assert results == [200]
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_exceeded"
    assert chat(second.base_url, "serial-customer").status_code == 200  # the slot came back on settle


def test_key_budget_and_rpm_are_enforced(two_servers: tuple[RunningServer, RunningServer]) -> None:
    server = two_servers[0]
    generated = post(server.base_url, "/key/generate", {"max_budget": "0.00001"})
    key = generated.json()["key"]
    refused = chat(server.base_url, "key-budget-customer", key=key)
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "budget_exceeded"
    assert "Key" in refused.json()["error"]["message"]
    away_from_minute_edge()
    limited = post(server.base_url, "/key/generate", {"rpm_limit": 1}).json()["key"]
    first = chat(server.base_url, "rpm-customer", key=limited)
    assert first.status_code == 200 and first.headers["x-ratelimit-remaining-requests"] == "0"
    second = chat(server.base_url, "rpm-customer", key=limited)
    assert second.status_code == 429 and second.headers["x-ratelimit-remaining-requests"] == "0"


def test_spend_logs_and_the_global_report_show_exact_spend(
    two_servers: tuple[RunningServer, RunningServer],
) -> None:
    server = two_servers[0]
    key = post(server.base_url, "/key/generate", {"team_id": "report-team"}).json()["key"]
    for _ in range(2):
        assert chat(server.base_url, "report-customer", key=key).status_code == 200
    logs = httpx.get(f"{server.base_url}/spend/logs", params={"api_key": key}, headers=AUTH)
    rows = decimal_json(logs)
    assert len(rows) == 2 and all(row["spend"] == unit_cost() for row in rows)
    assert {row["end_user"] for row in rows} == {"report-customer"}
    report = decimal_json(
        httpx.get(f"{server.base_url}/global/spend/report", params={"group_by": "team"}, headers=AUTH)
    )
    teams = [team for day in report for team in day["teams"] if team["team_name"] == "report-team"]
    assert sum(team["total_spend"] for team in teams) == 2 * unit_cost()


def test_the_global_max_budget_refuses_everyone(
    postgres: PostgresForTests, upstream: RunningUpstream
) -> None:
    url = postgres.new_database()
    extra = "litellm_settings:\n  max_budget: 0\n"
    with run_server(proxy_config(upstream.base_url, extra), url) as server:
        refused = chat(server.base_url, "anyone")
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "budget_exceeded"
        assert "Global" in refused.json()["error"]["message"]
    postgres.drop_database(url)


def test_the_hold_of_a_killed_process_expires(postgres: PostgresForTests, upstream: RunningUpstream) -> None:
    url = postgres.new_database()
    config = proxy_config(upstream.base_url)
    env = {"SPENDLEDGER_HOLD_GRACE_S": "1"}
    customer = "crash-customer"
    with run_server(config, url, env=env) as survivor:
        assert (
            post(survivor.base_url, "/customer/new", {"user_id": customer, "max_budget": 1}).status_code
            == 200
        )
        with run_server(config, url, env=env) as doomed:
            upstream.app.delay_s = 30
            threading.Thread(
                target=lambda: _ignore_errors(chat, doomed.base_url, customer), daemon=True
            ).start()
            assert wait_until(lambda: bool(query(url, "select 1 from holds")), timeout_s=5)
            # The request holds its hold; the process may also hold a lease for the next ones.
            (row,) = query(
                url,
                "select (select held from budget_usage where scope = 'customer' and scope_id = $1) as held, "
                "(select sum(amount) from holds) as holds, "
                "(select sum(amount) from holds where call_id not like 'lease:%') as own",
                customer,
            )
            assert row["own"] == hold_of() and row["held"] == row["holds"]
            doomed.process.kill()  # SIGKILL: no chance to settle or release
            doomed.process.wait()
        upstream.app.delay_s = 0
        # A request's hold lives for its upstream timeout (600 s by default for this deployment) plus the
        # grace: the killed one would wait that long. Shorten it as a sweeper in any process would see it.
        query(url, "update holds set expires_at = now() + interval '1 second'")
        assert wait_until(lambda: not query(url, "select 1 from holds"), timeout_s=10)
        held = query(
            url, "select held from budget_usage where scope = 'customer' and scope_id = $1", customer
        )
        assert held[0]["held"] == 0
        assert query(url, "select 1 from events where type = 'UsageRecorded'") == []
        assert chat(survivor.base_url, customer).status_code == 200
    postgres.drop_database(url)


def _ignore_errors(function: Callable[..., object], *args: object) -> None:
    with contextlib.suppress(httpx.HTTPError):
        function(*args)


def test_hold_math_matches_the_proxy(two_servers: tuple[RunningServer, RunningServer]) -> None:
    """The helper's hold formula is the proxy's: a budget one unit short of a hold refuses."""
    server = two_servers[0]
    customer = "exact-hold"
    short = hold_of() - Decimal("0.000000001")
    assert (
        post(server.base_url, "/customer/new", {"user_id": customer, "max_budget": str(short)}).status_code
        == 200
    )
    assert chat(server.base_url, customer).status_code == 429
    assert (
        post(
            server.base_url, "/customer/update", {"user_id": customer, "max_budget": str(hold_of())}
        ).status_code
        == 200
    )
    assert chat(server.base_url, customer).status_code == 200
