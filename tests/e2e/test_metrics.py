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


def test_time_tokens_and_spend_by_model_group_under_litellm_s_names(
    upstream: RunningUpstream, database_url: str
) -> None:
    from decimal import Decimal

    from tests.e2e.enforcement_support import unit_cost

    config = outbox_config(upstream.base_url)
    upstream.app.delay_s = 0.2  # the provider's time: the gateway's own is what is left
    with run_server(config, database_url) as server:
        chats(server.base_url, [f"timed-{i}" for i in range(4)])
        model = '{model="fake-openai-endpoint"}'
        assert samples(server.base_url, f"litellm_request_total_latency_metric_count{model}") == 4
        upstream_s = samples(server.base_url, f"litellm_llm_api_latency_metric_sum{model}")
        overhead_s = samples(server.base_url, f"litellm_overhead_latency_metric_sum{model}")
        total_s = samples(server.base_url, f"litellm_request_total_latency_metric_sum{model}")
        assert upstream_s >= 4 * 0.2 and 0 < overhead_s < upstream_s  # the provider's time is not the gateway's
        assert abs(total_s - upstream_s - overhead_s) < 1e-6
        spend = samples(server.base_url, f"litellm_spend_metric_total{model}")
        assert abs(Decimal(str(spend)) - 4 * unit_cost()) < Decimal("1e-12")
        tokens = {
            kind: samples(server.base_url, f"litellm_{kind}_tokens_metric_total{model}")
            for kind in ("input", "output", "total")
        }
        assert tokens["total"] == tokens["input"] + tokens["output"] > 0


def test_marked_budgets_show_what_is_left_of_them(upstream: RunningUpstream, database_url: str) -> None:
    from decimal import Decimal

    from tests.e2e.conftest import MASTER_KEY, proxy_config

    admin = {"Authorization": f"Bearer {MASTER_KEY}"}
    config = proxy_config(upstream.base_url, '  budget_gauges: ["customer:gauged", "team:gauged-team"]')
    with run_server(config, database_url) as server:
        for path, body in (("/customer/new", {"user_id": "gauged", "max_budget": 3}),
                           ("/team/new", {"team_id": "gauged-team", "max_budget": 5})):  # fmt: skip
            assert httpx.post(f"{server.base_url}{path}", json=body, headers=admin, timeout=30).status_code == 200
        chats(server.base_url, ["gauged", "gauged"])
        info = httpx.get(f"{server.base_url}/customer/info", params={"end_user_id": "gauged"}, headers=admin).json()
        left = 3 - Decimal(str(info["spend"]))
        customer = 'spendledger_budget_remaining{scope="customer",scope_id="gauged"}'
        assert wait_until(lambda: abs(samples(server.base_url, customer) - float(left)) < 1e-9, 15), left
        assert samples(server.base_url, 'spendledger_budget_max{scope="customer",scope_id="gauged"}') == 3
        assert samples(server.base_url, 'litellm_remaining_team_budget_metric{team="gauged-team"}') == 5
