"""Helpers for the enforcement tests: exact request bytes, their hold, and ledger queries."""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal
from typing import Any

import asyncpg
import httpx

from tests.e2e.conftest import INPUT_PRICE, MASTER_KEY, OUTPUT_PRICE
from tests.fakes.upstream import REPLY_WORDS, prompt_tokens_for_messages

AUTH = {"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"}
MESSAGES = [{"role": "user", "content": "what time is it"}]
MAX_TOKENS = REPLY_WORDS


def chat_body(customer: str, model: str = "fake-openai-endpoint", max_tokens: int = MAX_TOKENS) -> bytes:
    body = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "user": customer}
    return json.dumps(body, separators=(",", ":")).encode()


def hold_input_tokens(messages: list[dict[str, str]]) -> int:
    """The hold's input bound for plain text messages: OpenAI's chat format (3 per message, 3 to
    prime the reply) with every byte of the role and the text a token."""
    return 3 + sum(3 + len(m["role"].encode()) + len(m["content"].encode()) for m in messages)


def hold_of(max_tokens: int = MAX_TOKENS) -> Decimal:
    """The worst-case cost the proxy holds: the input bound × input price + max_tokens × output price
    (the customer and the other parameters are not prompt)."""
    return hold_input_tokens(MESSAGES) * Decimal(INPUT_PRICE) + max_tokens * Decimal(OUTPUT_PRICE)


def unit_cost(reply_tokens: int = REPLY_WORDS) -> Decimal:
    """What a chat request really costs: the fake's prompt count and a reply of `reply_tokens`."""
    return prompt_tokens_for_messages(MESSAGES) * Decimal(INPUT_PRICE) + reply_tokens * Decimal(OUTPUT_PRICE)


def decimal_json(response: httpx.Response) -> Any:
    return json.loads(response.text, parse_float=Decimal)


def post(base_url: str, path: str, body: dict[str, Any], key: str = MASTER_KEY) -> httpx.Response:
    return httpx.post(f"{base_url}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def chat(base_url: str, customer: str, key: str = MASTER_KEY, max_tokens: int = MAX_TOKENS) -> httpx.Response:
    headers = {**AUTH, "Authorization": f"Bearer {key}"}
    return httpx.post(
        f"{base_url}/chat/completions", content=chat_body(customer, max_tokens=max_tokens), headers=headers,
        timeout=30,
    )


def customer_info(base_url: str, customer: str) -> dict[str, Any]:
    response = httpx.get(f"{base_url}/customer/info", params={"end_user_id": customer}, headers=AUTH)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = decimal_json(response)
    return result


def query(database_url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(database_url)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


def wait_until(predicate: Any, timeout_s: float, interval_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


def away_from_minute_edge(margin_s: float = 8.0) -> None:
    """Rate windows are calendar minutes: start a rate test well inside one."""
    into_minute = time.time() % 60
    if into_minute > 60 - margin_s:
        time.sleep(60 - into_minute + 0.5)
