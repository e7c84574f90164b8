"""The seed's first curl commands, raw HTTP against a real server process."""

from __future__ import annotations

import json
from decimal import Decimal

import httpx

from tests.e2e.conftest import INPUT_PRICE, MASTER_KEY, OUTPUT_PRICE
from tests.fakes.upstream import REPLY_WORDS, prompt_tokens_for_messages
from tests.support import RunningServer

AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}


def test_customer_spend_is_exact_after_a_chat_completion(server: RunningServer) -> None:
    messages = [{"role": "user", "content": "what time is it"}]
    response = httpx.post(
        f"{server.base_url}/chat/completions",
        headers=AUTH,
        json={"model": "fake-openai-endpoint", "user": "ishaan3", "messages": messages},
    )
    assert response.status_code == 200, response.text
    expected = prompt_tokens_for_messages(messages) * Decimal(INPUT_PRICE) + REPLY_WORDS * Decimal(
        OUTPUT_PRICE
    )
    assert Decimal(response.headers["x-litellm-response-cost"]) == expected
    info = httpx.get(f"{server.base_url}/customer/info", params={"end_user_id": "ishaan3"}, headers=AUTH)
    assert info.status_code == 200
    body = json.loads(info.text, parse_float=Decimal)
    assert body["spend"] == expected
    assert body["user_id"] == "ishaan3" and body["blocked"] is False and body["litellm_budget_table"] is None


def test_both_of_litellm_s_liveness_spellings_answer_without_a_key(server: RunningServer) -> None:
    for path in ("/health/liveliness", "/health/liveness"):
        response = httpx.get(f"{server.base_url}{path}")
        assert response.status_code == 200 and response.json() == "I'm alive!", path


def test_a_browser_may_call_the_api_from_another_origin_as_with_litellm(server: RunningServer) -> None:
    preflight = httpx.options(
        f"{server.base_url}/chat/completions",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code in (200, 204), preflight.text
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in preflight.headers  # any origin: no credentials
    answer = httpx.get(f"{server.base_url}/health/liveness", headers={"Origin": "https://app.example"})
    assert answer.headers["access-control-allow-origin"] == "*"
    assert "x-litellm-call-id" in answer.headers.get("access-control-expose-headers", "")


def test_the_api_docs_page_works_offline(server: RunningServer) -> None:
    """The docs UI's scripts and styles come from the gateway itself, never from a CDN."""
    for path in ("/schema", "/schema/swagger"):
        page = httpx.get(f"{server.base_url}{path}", timeout=10)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), path
        assert "/schema/assets/swagger-ui-bundle.js" in page.text
        assert "cdn." not in page.text and "//unpkg" not in page.text, path
    script = httpx.get(f"{server.base_url}/schema/assets/swagger-ui-bundle.js", timeout=10)
    assert script.status_code == 200 and len(script.content) > 100_000
    assert "javascript" in script.headers["content-type"]
    assert httpx.get(f"{server.base_url}/schema/openapi.json", timeout=10).json()["openapi"].startswith("3.1")
