"""Exact money at volume: 1,000 concurrent requests add up to the last digit, once each."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from decimal import Decimal

import asyncpg
import httpx

from tests.e2e.conftest import INPUT_PRICE, MASTER_KEY, OUTPUT_PRICE
from tests.fakes.upstream import REPLY_WORDS, prompt_tokens_for_messages
from tests.support import RunningServer

AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
REQUESTS = 1000
CONCURRENCY = 16


async def test_a_thousand_requests_sum_to_the_exact_spend(server: RunningServer) -> None:
    customer = f"money-{uuid.uuid4().hex[:10]}"
    messages = [{"role": "user", "content": "count my money to the last digit please"}]
    unit = prompt_tokens_for_messages(messages) * Decimal(INPUT_PRICE) + REPLY_WORDS * Decimal(OUTPUT_PRICE)
    body = {"model": "fake-openai-endpoint", "user": customer, "messages": messages}
    gate = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)

    async def one(http: httpx.AsyncClient) -> httpx.Response:
        async with gate:
            return await http.post("/chat/completions", json=body)

    started = time.monotonic()
    async with httpx.AsyncClient(base_url=server.base_url, headers=AUTH, limits=limits, timeout=30) as http:
        responses = await asyncio.gather(*(one(http) for _ in range(REQUESTS)))
        elapsed = time.monotonic() - started
        bad = [(r.status_code, r.text) for r in responses if r.status_code != 200]
        assert not bad, bad[:3]
        info = await http.get("/customer/info", params={"end_user_id": customer})
    assert elapsed < 30, f"{REQUESTS} requests took {elapsed:.1f}s"

    header_costs = [Decimal(r.headers["x-litellm-response-cost"]) for r in responses]
    assert all(c == unit for c in header_costs)
    call_ids = {r.headers["x-litellm-call-id"] for r in responses}
    assert len(call_ids) == REQUESTS

    assert info.status_code == 200, info.text
    spend = json.loads(info.text, parse_float=Decimal)["spend"]
    expected = REQUESTS * unit
    assert isinstance(spend, Decimal)
    assert spend == expected, f"{spend} != {expected}"
    # Digit for digit: the same number with no float residue (trailing zeros aside).
    assert spend.normalize() == expected.normalize()
    assert format(spend.normalize(), "f") == format(expected.normalize(), "f")

    conn = await asyncpg.connect(server.database_url)
    try:
        rows = await conn.fetch(
            "select data->>'call_id' as call_id, (data->>'cost')::numeric as cost, data->>'status' as status"
            " from events where type = 'UsageRecorded' and data->>'customer_id' = $1",
            customer,
        )
        total = await conn.fetchval(
            "select sum((data->>'cost')::numeric) from events"
            " where type = 'UsageRecorded' and data->>'customer_id' = $1",
            customer,
        )
    finally:
        await conn.close()
    assert len(rows) == REQUESTS
    assert {row["call_id"] for row in rows} == call_ids
    assert all(row["status"] == "success" and row["cost"] == unit for row in rows)
    assert total == expected


def test_a_group_with_two_deployments_alternates(server: RunningServer) -> None:
    model_ids = []
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=30) as http:
        for i in range(4):
            response = http.post(
                "/chat/completions",
                json={
                    "model": "gpt-3.5-turbo",
                    "user": "alternation-check",
                    "messages": [{"role": "user", "content": f"request {i}"}],
                },
            )
            assert response.status_code == 200, response.text
            assert response.headers["x-litellm-model-group"] == "gpt-3.5-turbo"
            model_ids.append(response.headers["x-litellm-model-id"])
    assert len(set(model_ids)) == 2, model_ids
    assert "second-deployment" in model_ids
    assert all(a != b for a, b in itertools.pairwise(model_ids)), model_ids
