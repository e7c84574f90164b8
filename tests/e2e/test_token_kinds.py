"""Every kind of token billed as providers bill it, through the gateway (issue 18): a response with
cached prompt tokens and reasoning tokens costs, to the last digit, what the configured prices or the
catalogue's say; the event keeps each kind's unit price and cost, and the Lago event carries the
breakdown; streamed answers cost the same."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest

from tests.e2e.conftest import MASTER_KEY
from tests.e2e.enforcement_support import wait_until
from tests.e2e.outbox_support import lago_env
from tests.fakes.lago import FakeLago, RunningLago, run_fake_lago
from tests.fakes.upstream import RunningUpstream, prompt_tokens_for_messages, reply_for
from tests.support import PostgresForTests, RunningServer, run_server

AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
M = Decimal(1_000_000)
MESSAGES = [{"role": "user", "content": "a long shared system prompt that the provider has cached already"}]
PROMPT = prompt_tokens_for_messages(MESSAGES)
REPLY = len(reply_for(MESSAGES, 16).split())  # max_tokens 16 below
CACHED, REASONING = 9, 5
TEXT_OUT = len(reply_for(MESSAGES, 16 - REASONING).split())  # reasoning counts within max_tokens


def config(upstream: str) -> str:
    return f"""
model_list:
  - model_name: claude-like
    litellm_params:
      model: openai/fake
      api_base: {upstream}
    model_info:
      input_cost_per_token: 0.000003
      output_cost_per_token: 0.000015
      cache_read_input_token_cost: 0.0000003
      output_cost_per_reasoning_token: 0.00002
  - model_name: gpt-4o
    litellm_params:
      model: openai/gpt-4o
      api_base: {upstream}
  - model_name: router-4o
    litellm_params:
      model: openrouter/openai/gpt-4o
      api_base: {upstream}
litellm_settings:
  callbacks: ["lago"]
general_settings:
  master_key: {MASTER_KEY}
"""


@pytest.fixture(scope="module")
def lago() -> Iterator[RunningLago]:
    with run_fake_lago(FakeLago()) as running:
        yield running


@pytest.fixture(scope="module")
def server(postgres: PostgresForTests, upstream: RunningUpstream, lago: RunningLago) -> Iterator[RunningServer]:
    url = postgres.new_database()
    with run_server(config(upstream.base_url), url, env=lago_env(lago.base_url)) as running:
        yield running
    postgres.drop_database(url)


def ask(server: RunningServer, model: str, customer: str, stream: bool = False) -> httpx.Response:
    body: dict[str, Any] = {"model": model, "user": customer, "messages": MESSAGES, "max_tokens": 16}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    response = httpx.post(f"{server.base_url}/chat/completions", json=body, headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    return response


def spend_log(server: RunningServer, call_id: str) -> dict[str, Any]:
    logs = httpx.get(f"{server.base_url}/spend/logs", params={"request_id": call_id}, headers=AUTH, timeout=30)
    assert logs.status_code == 200, logs.text
    (log,) = json.loads(logs.text, parse_float=Decimal)
    assert isinstance(log, dict)
    return log


def metrics_text(server: RunningServer) -> str:
    return httpx.get(f"{server.base_url}/metrics", headers=AUTH, timeout=30).text


async def usage_event(server: RunningServer, call_id: str) -> dict[str, Any]:
    conn = await asyncpg.connect(server.database_url)
    try:
        data = await conn.fetchval(
            "select data::text from events where type = 'UsageRecorded' and data->>'call_id' = $1", call_id
        )
    finally:
        await conn.close()
    event: dict[str, Any] = json.loads(data, parse_float=Decimal)
    return event


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_cached_and_reasoning_tokens_at_their_configured_prices(
    server: RunningServer, upstream: RunningUpstream, lago: RunningLago, stream: bool
) -> None:
    upstream.app.cached_prompt_tokens, upstream.app.reasoning_tokens = CACHED, REASONING
    customer = f"kinds-{uuid.uuid4().hex[:8]}"
    response = ask(server, "claude-like", customer, stream=stream)
    expected = (
        (PROMPT - CACHED) * Decimal("0.000003")
        + CACHED * Decimal("0.0000003")
        + TEXT_OUT * Decimal("0.000015")
        + REASONING * Decimal("0.00002")
    )
    event = await usage_event(server, response.headers["x-litellm-call-id"])
    if not stream:
        assert Decimal(response.headers["x-litellm-response-cost"]) == expected
    assert event["cost"] == expected
    assert (event["input_tokens"], event["output_tokens"]) == (PROMPT, TEXT_OUT + REASONING)
    assert (event["cached_input_tokens"], event["reasoning_tokens"]) == (CACHED, REASONING)
    assert event["unit_prices"] == {
        "input": Decimal("0.000003"), "cache_read": Decimal("0.0000003"),
        "output": Decimal("0.000015"), "reasoning": Decimal("0.00002"),
    }  # fmt: skip
    assert event["costs"]["cache_read"] == CACHED * Decimal("0.0000003")
    assert sum(event["costs"].values()) == expected

    log = spend_log(server, event["call_id"])
    assert log["metadata"]["usage_object"]["prompt_tokens_details"]["cached_tokens"] == CACHED
    assert log["metadata"]["usage_object"]["completion_tokens_details"]["reasoning_tokens"] == REASONING
    assert log["metadata"]["cost_breakdown"] == event["costs"]

    assert wait_until(lambda: len(lago.app.events_for(customer)) == 1, 30)
    properties = lago.app.events_for(customer)[0]["properties"]
    assert properties["input_tokens"] == PROMPT and properties["output_tokens"] == TEXT_OUT + REASONING
    assert properties["cached_input_tokens"] == CACHED and properties["reasoning_tokens"] == REASONING
    assert Decimal(str(properties["response_cost"])) == expected


async def test_a_catalogue_model_bills_cached_tokens_at_the_catalogue_price(
    server: RunningServer, upstream: RunningUpstream
) -> None:
    upstream.app.cached_prompt_tokens = CACHED
    response = ask(server, "gpt-4o", f"kinds-{uuid.uuid4().hex[:8]}")
    # gpt-4o in genai-prices: $2.50 input, $1.25 cached input, $10 output per million.
    expected = (PROMPT - CACHED) * Decimal("2.5") / M + CACHED * Decimal("1.25") / M + REPLY * Decimal(10) / M
    assert Decimal(response.headers["x-litellm-response-cost"]) == expected
    event = await usage_event(server, response.headers["x-litellm-call-id"])
    assert event["priced"] is True and event["cost"] == expected


async def test_an_openrouter_model_is_priced_from_the_catalogue(server: RunningServer) -> None:
    response = ask(server, "router-4o", f"kinds-{uuid.uuid4().hex[:8]}")
    expected = PROMPT * Decimal("2.5") / M + REPLY * Decimal(10) / M
    assert Decimal(response.headers["x-litellm-response-cost"]) == expected
    event = await usage_event(server, response.headers["x-litellm-call-id"])
    assert event["priced"] is True and event["provider"] == "openrouter"


async def test_audio_without_a_price_is_billed_as_input_and_named(server: RunningServer, upstream: RunningUpstream) -> None:
    upstream.app.audio_prompt_tokens = 4
    responses = [ask(server, "claude-like", f"kinds-{uuid.uuid4().hex[:8]}") for _ in range(2)]
    for response in responses:
        event = await usage_event(server, response.headers["x-litellm-call-id"])
        assert event["unpriced_kinds"] == ["input_audio"]
        assert event["unit_prices"]["input_audio"] == Decimal("0.000003")  # the plain input price
        assert event["cost"] == PROMPT * Decimal("0.000003") + REPLY * Decimal("0.000015")
    assert 'spendledger_unpriced_token_kinds_total{kind="input_audio",model="claude-like"} 2.0' in metrics_text(server)
    assert server.log_path.read_text().count("token_kind_unpriced") == 1  # once per deployment and kind
    [line] = [line for line in server.log_path.read_text().splitlines() if "token_kind_unpriced" in line]
    assert json.loads(line)["call_id"] == responses[0].headers["x-litellm-call-id"]  # the request it was logged in
