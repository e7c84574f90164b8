"""Per-deployment rpm / tpm enforced across two server processes sharing PostgreSQL, and the
routing strategies that read them (issue 22): simple-shuffle weighted by rpm, usage-based-routing
by the tokens each deployment used this minute, least-busy by the requests in flight."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest

from tests.e2e.conftest import MASTER_KEY
from tests.e2e.enforcement_support import away_from_minute_edge, wait_until
from tests.fakes.upstream import Failure, RunningUpstream, prompt_tokens_for_messages, reply_for
from tests.support import PostgresForTests, RunningServer, run_server

AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
MESSAGES = [{"role": "user", "content": "count my tokens"}]
TOKENS = prompt_tokens_for_messages(MESSAGES) + len(reply_for(MESSAGES).split())


def deployment(group: str, model: str, base: str, **params: Any) -> str:
    extra = "".join(f"\n      {k}: {v}" for k, v in params.items())
    return f"""
  - model_name: {group}
    litellm_params:
      model: openai/{model}
      api_base: {base}{extra}
    model_info:
      id: {model}
      input_cost_per_token: 0.000001
      output_cost_per_token: 0.000002"""


def config(models: list[str], strategy: str = "simple-shuffle") -> str:
    return f"""
model_list:{"".join(models)}
router_settings:
  routing_strategy: {strategy}
general_settings:
  master_key: {MASTER_KEY}
"""


@pytest.fixture(scope="module")
def database(postgres: PostgresForTests) -> Iterator[str]:
    url = postgres.new_database()
    yield url
    postgres.drop_database(url)


@pytest.fixture(scope="module")
def two_servers(database: str, upstream: RunningUpstream) -> Iterator[tuple[RunningServer, RunningServer]]:
    """Two processes, one database: the deployments' windows are shared."""
    base = upstream.base_url
    text = config(
        [
            deployment("limited", "lim-a", base, rpm=2),
            deployment("limited", "lim-b", base, rpm=2),
            deployment("tokens", "tok", base, tpm=TOKENS + 1),
        ]
    )
    with run_server(text, database) as first, run_server(text, database) as second:
        yield first, second


def ask(server: RunningServer, model: str, user: str | None = None) -> httpx.Response:
    body = {"model": model, "user": user or f"lim-{uuid.uuid4().hex[:10]}", "messages": MESSAGES, "max_tokens": 50}
    return httpx.post(f"{server.base_url}/chat/completions", json=body, headers=AUTH, timeout=60)


def window(database: str, deployment_id: str) -> tuple[int, int]:
    """(requests, tokens) of the deployment's current minute."""

    async def read() -> tuple[int, int]:
        conn = await asyncpg.connect(database)
        try:
            row = await conn.fetchrow(
                "select requests, tokens from rate_usage where scope = 'deployment' and scope_id = $1"
                " and window_start = date_trunc('minute', now())",
                deployment_id,
            )
        finally:
            await conn.close()
        return (0, 0) if row is None else (int(row["requests"]), int(row["tokens"]))

    return asyncio.run(read())


def events_of(database: str, user: str) -> list[dict[str, Any]]:
    async def read() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(database)
        try:
            rows = await conn.fetch(
                "select data::text from events where type = 'UsageRecorded' and data->>'customer_id' = $1", user
            )
        finally:
            await conn.close()
        return [json.loads(r[0], parse_float=Decimal) for r in rows]

    return asyncio.run(read())


def test_deployment_rpm_holds_across_two_processes_under_concurrency(
    two_servers: tuple[RunningServer, RunningServer], database: str, upstream: RunningUpstream
) -> None:
    away_from_minute_edge(20)
    users = [f"lim-{uuid.uuid4().hex[:10]}" for _ in range(10)]
    with ThreadPoolExecutor(max_workers=10) as pool:
        responses = list(pool.map(lambda i: ask(two_servers[i % 2], "limited", users[i]), range(10)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 4 + [429] * 6, [r.text for r in responses]
    assert sorted(r.headers["x-litellm-model-id"] for r in responses if r.status_code == 200) == [
        "lim-a", "lim-a", "lim-b", "lim-b"
    ]  # fmt: skip
    assert upstream.app.served("lim-a") + upstream.app.served("lim-b") == 4  # the refused were never sent
    assert window(database, "lim-a")[0] == 2 and window(database, "lim-b")[0] == 2
    for response, user in zip(responses, users, strict=True):
        [event] = events_of(database, user)
        if response.status_code == 429:
            assert response.json()["error"]["type"] == "rate_limit_exceeded"
            assert int(response.headers["retry-after"]) >= 1
            assert event["status"] == "failure" and event["cost"] == 0 and event["http_status"] == 429
        else:
            assert event["status"] == "success" and event["cost"] > 0


def test_deployment_tpm_counts_the_tokens_of_both_processes(
    two_servers: tuple[RunningServer, RunningServer], database: str
) -> None:
    away_from_minute_edge(20)
    first, second = two_servers
    assert ask(first, "tokens").status_code == 200
    assert wait_until(lambda: window(database, "tok")[1] == TOKENS, 10)  # counted after the settle
    assert ask(second, "tokens").status_code == 200  # TOKENS < tpm: room for one more
    assert wait_until(lambda: window(database, "tok")[1] == 2 * TOKENS, 10)
    refused = ask(first, "tokens")
    assert refused.status_code == 429, refused.text
    assert "No deployments available" in refused.json()["error"]["message"]


@pytest.fixture(scope="module")
def usage_based(postgres: PostgresForTests, upstream: RunningUpstream) -> Iterator[RunningServer]:
    url = postgres.new_database()
    base = upstream.base_url
    text = config([deployment("ub", "ub-a", base), deployment("ub", "ub-b", base)], "usage-based-routing-v2")
    with run_server(text, url) as running:
        yield running
    postgres.drop_database(url)


def test_usage_based_routing_sends_requests_to_the_deployment_with_the_fewest_tokens(
    usage_based: RunningServer, upstream: RunningUpstream
) -> None:
    away_from_minute_edge(20)
    database = usage_based.database_url
    upstream.app.reply_words = 40  # a long answer: ub-a has used more than two short ones
    first = ask(usage_based, "ub")
    assert first.headers["x-litellm-model-id"] == "ub-a"
    assert wait_until(lambda: window(database, "ub-a")[1] > 2 * TOKENS, 10)
    heavy = window(database, "ub-a")[1]
    upstream.app.reply_words = len(reply_for(MESSAGES).split())
    picked = []
    assert 2 * TOKENS < heavy < 3 * TOKENS  # so: ub-b for three short answers, then ub-a again
    for done in range(1, 5):
        picked.append(ask(usage_based, "ub").headers["x-litellm-model-id"])
        total = heavy + done * TOKENS
        assert wait_until(lambda t=total: window(database, "ub-a")[1] + window(database, "ub-b")[1] == t, 10)
    assert picked == ["ub-b", "ub-b", "ub-b", "ub-a"], picked
    assert window(database, "ub-a")[0] == 2 and window(database, "ub-b")[0] == 3


@pytest.fixture(scope="module")
def least_busy(postgres: PostgresForTests, upstream: RunningUpstream) -> Iterator[RunningServer]:
    url = postgres.new_database()
    base = upstream.base_url
    with run_server(config([deployment("lb", "lb-a", base), deployment("lb", "lb-b", base)], "least-busy"), url) as running:
        yield running
    postgres.drop_database(url)


def test_least_busy_passes_over_the_deployment_with_a_request_in_flight(
    least_busy: RunningServer, upstream: RunningUpstream
) -> None:
    upstream.app.fail_always(Failure(delay_s=3.0), model="lb-a")  # slow, not failing
    upstream.app.fail_always(Failure(delay_s=3.0), model="lb-b")
    with ThreadPoolExecutor(max_workers=1) as pool:
        slow = pool.submit(ask, least_busy, "lb")
        assert wait_until(lambda: len(upstream.app.requests) == 1, 10)
        busy = upstream.app.requests[0].json["model"]
        upstream.app.failing.clear()
        others = [ask(least_busy, "lb").headers["x-litellm-model-id"] for _ in range(3)]
        assert slow.result().status_code == 200
    idle = "lb-b" if busy == "lb-a" else "lb-a"
    assert others == [idle] * 3
