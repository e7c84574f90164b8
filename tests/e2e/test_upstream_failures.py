"""When the provider fails, times out, or the client hangs up mid-stream: what the caller sees and
what the ledger keeps."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest

from tests.e2e.conftest import MASTER_KEY
from tests.fakes.upstream import RunningUpstream, error_body
from tests.support import PostgresForTests, RunningServer, run_server

AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
ENVELOPE_KEYS = {"message", "type", "param", "code"}


def customer() -> str:
    return f"fail-{uuid.uuid4().hex[:10]}"


def chat_body(user: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "fake-openai-endpoint",
        "user": user,
        "messages": [{"role": "user", "content": "will this one work"}],
        **extra,
    }


def usage_events(database_url: str, customer_id: str) -> list[dict[str, Any]]:
    async def fetch() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch(
                "select data::text as data from events"
                " where type = 'UsageRecorded' and data->>'customer_id' = $1 order by position",
                customer_id,
            )
        finally:
            await conn.close()
        return [json.loads(row["data"], parse_float=Decimal) for row in rows]

    return asyncio.run(fetch())


def spend_of(server: RunningServer, end_user_id: str) -> Decimal:
    info = httpx.get(f"{server.base_url}/customer/info", params={"end_user_id": end_user_id}, headers=AUTH)
    assert info.status_code == 200, info.text
    return Decimal(json.loads(info.text, parse_float=Decimal)["spend"])


def assert_envelope(response: httpx.Response, status: int, type_: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ENVELOPE_KEYS, error
    assert error["type"] == type_
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["code"], str) and error["code"]
    assert error["param"] is None or isinstance(error["param"], str)
    return error


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_upstream_500_is_a_502_and_a_recorded_failure(
    server: RunningServer, upstream: RunningUpstream, stream: bool
) -> None:
    upstream.app.fail_status = 500
    cust = customer()
    response = httpx.post(
        f"{server.base_url}/chat/completions", headers=AUTH, json=chat_body(cust, stream=stream), timeout=30
    )
    error = assert_envelope(response, 502, "upstream_error")
    assert "Fake upstream failure" not in error["message"]  # the provider's text is not echoed
    assert len(upstream.app.requests) == 1  # no hidden retries against a failing provider

    events = usage_events(server.database_url, cust)
    assert len(events) == 1, events
    event = events[0]
    assert event["status"] == "failure"
    assert event["http_status"] == 502
    assert event["error_type"] == "upstream_error"
    assert event["cost"] == 0 and event["input_tokens"] == 0 and event["output_tokens"] == 0
    assert event["stream"] is stream
    assert event["call_id"] == response.headers["x-litellm-call-id"]


def test_upstream_400_passes_through_with_the_upstream_body(
    server: RunningServer, upstream: RunningUpstream
) -> None:
    upstream.app.fail_status = 400
    cust = customer()
    response = httpx.post(
        f"{server.base_url}/chat/completions", headers=AUTH, json=chat_body(cust), timeout=30
    )
    assert response.status_code == 400, response.text
    assert response.json() == error_body("Fake upstream failure (status 400)", "invalid_request_error")
    events = usage_events(server.database_url, cust)
    assert len(events) == 1, events
    assert events[0]["status"] == "failure"
    assert events[0]["http_status"] == 400
    assert events[0]["cost"] == 0
    assert events[0]["call_id"] == response.headers["x-litellm-call-id"]


TIMEOUT_CONFIG = """
model_list:
  - model_name: slow-model
    litellm_params:
      model: openai/slow
      api_key: upstream-secret-key
      api_base: {api_base}
      timeout: 1
    model_info:
      input_cost_per_token: 0.0000015
      output_cost_per_token: 0.000002
general_settings:
  master_key: {master_key}
"""


@pytest.fixture(scope="module")
def slow_server(postgres: PostgresForTests, upstream: RunningUpstream) -> Iterator[RunningServer]:
    url = postgres.new_database()
    config = TIMEOUT_CONFIG.format(api_base=upstream.base_url, master_key=MASTER_KEY)
    with run_server(config, url) as running:
        yield running
    postgres.drop_database(url)


def test_upstream_slower_than_the_deployment_timeout_is_a_504(
    slow_server: RunningServer, upstream: RunningUpstream
) -> None:
    upstream.app.delay_s = 3
    cust = customer()
    body = chat_body(cust, model="slow-model")
    started = time.monotonic()
    response = httpx.post(f"{slow_server.base_url}/chat/completions", headers=AUTH, json=body, timeout=30)
    elapsed = time.monotonic() - started
    assert_envelope(response, 504, "upstream_timeout")
    assert 0.9 <= elapsed < 2.9, f"answered after {elapsed:.2f}s with a 1s deployment timeout"
    events = usage_events(slow_server.database_url, cust)
    assert len(events) == 1, events
    assert events[0]["status"] == "failure"
    assert events[0]["http_status"] == 504
    assert events[0]["error_type"] == "upstream_timeout"
    assert events[0]["call_id"] == response.headers["x-litellm-call-id"]


def test_client_disconnect_mid_stream_is_billed_as_estimated(
    server: RunningServer, upstream: RunningUpstream
) -> None:
    upstream.app.chunk_delay_s = 0.5  # 14 events: the full stream would take ~6.5 s
    cust = customer()
    received: list[str] = []
    started = time.monotonic()
    with (
        httpx.Client(base_url=server.base_url, headers=AUTH, timeout=30) as http,
        http.stream("POST", "/chat/completions", json=chat_body(cust, stream=True)) as response,
    ):
        assert response.status_code == 200
        call_id = response.headers["x-litellm-call-id"]
        for line in response.iter_lines():
            if line.startswith("data:"):
                received.append(line)
            if len(received) == 2:
                break
    assert all("[DONE]" not in line for line in received)

    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        events = usage_events(server.database_url, cust)
        if events:
            break
        time.sleep(0.1)
    recorded_after = time.monotonic() - started
    assert len(events) == 1, f"no UsageRecorded within 5s of the disconnect: {events}"
    event = events[0]
    assert event["call_id"] == call_id
    assert event["usage_estimated"] is True
    assert event["status"] == "success"
    assert event["error_type"] == "client_disconnected"
    assert event["stream"] is True
    assert event["input_tokens"] > 0
    assert 1 <= event["output_tokens"] < 12  # what was generated up to the hang-up, not the full reply
    assert event["cost"] > 0
    assert recorded_after < 6, f"recorded only after {recorded_after:.1f}s: was the whole stream drained?"

    spend = spend_of(server, cust)
    assert spend > 0
    assert spend == event["cost"]
    time.sleep(0.5)
    assert len(usage_events(server.database_url, cust)) == 1  # billed once, not again at stream end
