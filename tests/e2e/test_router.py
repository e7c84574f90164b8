"""The router under induced failures (issue 22): retries, fallbacks, cooldowns, timeouts, streams
retried only before their first byte — each request billed exactly once, in the ledger and in Lago,
for the call that answered and for any failed call the provider billed."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import openai
import pytest

from tests.e2e.conftest import MASTER_KEY
from tests.e2e.enforcement_support import wait_until
from tests.e2e.outbox_support import lago_env
from tests.fakes.lago import FakeLago, RunningLago, run_fake_lago
from tests.fakes.upstream import (
    FAILED_COMPLETION_TOKENS,
    FAILED_PROMPT_TOKENS,
    Failure,
    RunningUpstream,
    prompt_tokens_for_messages,
    reply_for,
)
from tests.support import PostgresForTests, RunningServer, run_server

AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
IN, OUT = Decimal("0.000001"), Decimal("0.000002")
DEAR_IN, DEAR_OUT = Decimal("0.00001"), Decimal("0.00003")
MESSAGES = [{"role": "user", "content": "route this one well"}]
PROMPT = prompt_tokens_for_messages(MESSAGES)
REPLY = len(reply_for(MESSAGES).split())
ANSWER = PROMPT * IN + REPLY * OUT


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def deployment(group: str, model: str, base: str, price: tuple[Decimal, Decimal] = (IN, OUT), **params: Any) -> str:
    extra = "".join(f"\n      {k}: {v}" for k, v in params.items())
    return f"""
  - model_name: {group}
    litellm_params:
      model: openai/{model}
      api_base: {base}{extra}
    model_info:
      id: {model}
      input_cost_per_token: {price[0]}
      output_cost_per_token: {price[1]}"""


def config(upstream: str) -> str:
    gone = f"http://127.0.0.1:{closed_port()}/v1"
    models = "".join(
        [
            deployment("primary", "primary-a", upstream),
            deployment("primary", "primary-b", upstream),
            deployment("solo", "solo", upstream, timeout=1),
            deployment("dear", "dear", upstream, (DEAR_IN, DEAR_OUT)),
            deployment("unreachable", "gone", gone),
            deployment("small-context", "small", upstream),
            deployment("big-context", "big", upstream),
        ]
    )
    return f"""
model_list:{models}
router_settings:
  num_retries: 2
  allowed_fails: 1
  cooldown_time: 30
  fallbacks: [{{"unreachable": ["dear"]}}, {{"solo": ["dear"]}}]
  context_window_fallbacks: [{{"small-context": ["big-context"]}}]
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


def customer() -> str:
    return f"router-{uuid.uuid4().hex[:10]}"


def ask(server: RunningServer, model: str, user: str, stream: bool = False) -> httpx.Response:
    body: dict[str, Any] = {"model": model, "user": user, "messages": MESSAGES, "max_tokens": 50}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return httpx.post(f"{server.base_url}/chat/completions", json=body, headers=AUTH, timeout=60)


async def usage_events(server: RunningServer, user: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(server.database_url)
    try:
        rows = await conn.fetch(
            "select data::text from events where type = 'UsageRecorded' and data->>'customer_id' = $1", user
        )
    finally:
        await conn.close()
    return [json.loads(row[0], parse_float=Decimal) for row in rows]


def billed_in_lago(lago: RunningLago, user: str) -> Decimal:
    assert wait_until(lambda: len(lago.app.events_for(user)) == 1, 30), lago.app.events_for(user)
    return Decimal(str(lago.app.events_for(user)[0]["properties"]["response_cost"]))


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_429_is_retried_after_the_providers_retry_after(
    server: RunningServer, upstream: RunningUpstream, lago: RunningLago, stream: bool
) -> None:
    upstream.app.fail_next(Failure(status=429, retry_after="1"), model="solo")
    user = customer()
    began = time.monotonic()
    response = ask(server, "solo", user, stream)
    assert response.status_code == 200, response.text
    assert time.monotonic() - began >= 1.0  # the provider asked for a second
    assert upstream.app.served("solo") == 2
    headers = response.headers
    assert (headers["x-litellm-attempted-retries"], headers["x-litellm-attempted-fallbacks"]) == ("1", "0")
    assert headers["x-litellm-model-id"] == "solo"
    assert float(headers["x-litellm-response-duration-ms"]) >= float(headers["x-litellm-overhead-duration-ms"]) >= 0
    assert headers["llm_provider-x-request-id"] and headers["llm_provider-x-ratelimit-limit-requests"] == "10000"
    [event] = await usage_events(server, user)
    assert [(a["deployment_id"], a["http_status"]) for a in event["attempts"]] == [("solo", 429), ("solo", 200)]
    assert all(isinstance(a["latency_ms"], int) for a in event["attempts"])
    assert event["status"] == "success" and event["cost"] == ANSWER
    assert billed_in_lago(lago, user) == ANSWER


async def test_a_failing_deployment_is_passed_over_at_once_then_cooled_down(
    server: RunningServer, upstream: RunningUpstream
) -> None:
    upstream.app.fail_always(Failure(status=500), model="primary-a")
    users = [customer() for _ in range(6)]
    for user in users:
        response = ask(server, "primary", user)
        assert response.status_code == 200, response.text
        assert response.headers["x-litellm-model-id"] == "primary-b"
    # allowed_fails 1: its second failure within the minute cools it down for 30 s.
    assert upstream.app.served("primary-a") == 2
    for user in users:
        [event] = await usage_events(server, user)
        assert event["cost"] == ANSWER and event["deployment_id"] == "primary-b"


async def test_an_unreachable_group_falls_back_to_a_dearer_one_whose_price_the_hold_covered(
    server: RunningServer, lago: RunningLago
) -> None:
    direct, routed = customer(), customer()
    assert ask(server, "dear", direct).status_code == 200
    response = ask(server, "unreachable", routed)
    assert response.status_code == 200, response.text
    assert (response.headers["x-litellm-attempted-retries"], response.headers["x-litellm-attempted-fallbacks"]) == (
        "2",
        "1",
    )
    assert response.headers["x-litellm-model-id"] == "dear"
    [plain] = await usage_events(server, direct)
    [event] = await usage_events(server, routed)
    expected = PROMPT * DEAR_IN + REPLY * DEAR_OUT
    assert event["cost"] == plain["cost"] == expected
    assert event["hold"] == plain["hold"]  # held at the dearest deployment's price from the start
    assert event["model_group"] == "unreachable" and event["deployment_id"] == "dear"
    assert [(a["deployment_id"], a["http_status"]) for a in event["attempts"]] == [
        ("gone", 502), ("gone", 502), ("gone", 502), ("dear", 200)
    ]  # fmt: skip
    assert billed_in_lago(lago, routed) == expected


async def test_a_failed_call_the_provider_billed_is_charged_with_the_answer(
    server: RunningServer, upstream: RunningUpstream, lago: RunningLago
) -> None:
    upstream.app.fail_next(Failure(status=500, usage=True), model="solo")
    user = customer()
    response = ask(server, "solo", user)
    assert response.status_code == 200, response.text
    failed = FAILED_PROMPT_TOKENS * IN + FAILED_COMPLETION_TOKENS * OUT
    assert Decimal(response.headers["x-litellm-response-cost"]) == ANSWER + failed
    [event] = await usage_events(server, user)
    assert event["cost"] == ANSWER + failed
    assert (event["input_tokens"], event["output_tokens"]) == (PROMPT + FAILED_PROMPT_TOKENS, REPLY + FAILED_COMPLETION_TOKENS)
    assert event["attempts"][0]["cost"] == failed and event["attempts"][0]["http_status"] == 500
    assert billed_in_lago(lago, user) == ANSWER + failed


async def test_a_context_window_error_goes_to_the_context_window_fallback_without_retries(
    server: RunningServer, upstream: RunningUpstream
) -> None:
    upstream.app.fail_always(Failure(context_window=True), model="small")
    user = customer()
    response = ask(server, "small-context", user)
    assert response.status_code == 200, response.text
    assert upstream.app.served("small") == 1
    assert (response.headers["x-litellm-attempted-retries"], response.headers["x-litellm-model-id"]) == ("0", "big")
    [event] = await usage_events(server, user)
    assert event["cost"] == ANSWER and [a["http_status"] for a in event["attempts"]] == [400, 200]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_timeout_is_retried(server: RunningServer, upstream: RunningUpstream, stream: bool) -> None:
    upstream.app.fail_next(Failure(delay_s=2.5), model="solo")  # the deployment's timeout is 1 s
    user = customer()
    response = ask(server, "solo", user, stream)
    assert response.status_code == 200, response.text
    [event] = await usage_events(server, user)
    assert [(a["http_status"], a["error_type"]) for a in event["attempts"]] == [(504, "upstream_timeout"), (200, None)]
    assert event["cost"] == ANSWER


async def test_a_stream_broken_before_its_first_byte_is_retried(
    server: RunningServer, upstream: RunningUpstream
) -> None:
    upstream.app.fail_next(Failure(break_after=0), model="solo")
    user = customer()
    response = ask(server, "solo", user, stream=True)
    assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n"), response.text
    assert upstream.app.served("solo") == 2
    [event] = await usage_events(server, user)
    assert event["status"] == "success" and event["cost"] == ANSWER and len(event["attempts"]) == 2


async def test_a_stream_broken_after_its_first_byte_is_not_retried(
    server: RunningServer, upstream: RunningUpstream
) -> None:
    upstream.app.fail_next(Failure(break_after=3), model="solo")
    user = customer()
    response = ask(server, "solo", user, stream=True)
    assert response.status_code == 200  # the stream had begun: it ends with an error event
    assert '"upstream_error"' in response.text and "[DONE]" not in response.text
    assert upstream.app.served("solo") == 1
    [event] = await usage_events(server, user)
    assert event["status"] == "failure" and event["attempts"] == []
    assert event["output_tokens"] > 0 and event["cost"] > 0  # what was generated is billed (estimated)


async def test_every_deployment_failing_is_one_failure_at_cost_0(
    server: RunningServer, upstream: RunningUpstream, lago: RunningLago
) -> None:
    upstream.app.fail_always(Failure(status=503), model="solo")
    upstream.app.fail_always(Failure(status=503), model="dear")
    user = customer()
    response = ask(server, "solo", user)
    assert response.status_code == 502, response.text
    assert response.json()["error"]["type"] == "upstream_error"
    assert (response.headers["x-litellm-attempted-retries"], response.headers["x-litellm-attempted-fallbacks"]) == (
        "4",
        "1",
    )
    [event] = await usage_events(server, user)
    assert event["status"] == "failure" and event["cost"] == 0
    assert [a["deployment_id"] for a in event["attempts"]] == ["solo"] * 3 + ["dear"] * 3
    assert billed_in_lago(lago, user) == 0


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_the_openai_sdk_sees_one_answer_after_a_retry(
    server: RunningServer, upstream: RunningUpstream, stream: bool
) -> None:
    upstream.app.fail_next(Failure(status=502), model="solo")
    client = openai.OpenAI(base_url=server.base_url, api_key=MASTER_KEY, max_retries=0)
    if stream:
        chunks = list(
            client.chat.completions.create(
                model="solo", messages=MESSAGES, stream=True, stream_options={"include_usage": True}, user=customer()
            )  # type: ignore[arg-type]
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == reply_for(MESSAGES)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == REPLY
    else:
        raw = client.chat.completions.with_raw_response.create(model="solo", messages=MESSAGES, user=customer())  # type: ignore[arg-type]
        completion = raw.parse()
        assert completion.choices[0].message.content == reply_for(MESSAGES)
        assert raw.headers["x-litellm-attempted-retries"] == "1"
        assert Decimal(raw.headers["x-litellm-response-cost"]) == ANSWER
    assert upstream.app.served("solo") == 2
