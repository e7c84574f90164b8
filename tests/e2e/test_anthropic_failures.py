"""Anthropic's failures through a real `spendledger serve`, against the fake Messages API: its errors
mapped as LiteLLM maps them (429 passed on as a rate limit, 529 and 500 the gateway's 502, a 400
passed on), a request that cannot be translated refused before anything is sent, a stream that
breaks midway ended with an error chunk; each request recorded exactly once, failures at cost 0."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.e2e import anthropic_support as support
from tests.e2e.anthropic_support import (
    AUTH,
    KEY,
    cost,
    customer,
    customer_events,
    sent_prompt_tokens,
    usage_event,
)
from tests.e2e.enforcement_support import customer_info
from tests.fakes.anthropic import RunningAnthropic
from tests.support import RunningServer

anthropic, server, client, _reset = support.anthropic, support.server, support.client, support._reset

MESSAGES = [{"role": "user", "content": "reconcile my accounts please"}]


def post(server: RunningServer, cust: str, path: str = "/chat/completions", **fields: Any) -> httpx.Response:
    body = {"model": "claude-haiku", "user": cust, "messages": MESSAGES, **fields}
    return httpx.post(f"{server.base_url}{path}", json=body, headers=AUTH, timeout=30)


def stream_events(server: RunningServer, cust: str) -> tuple[str, list[bytes]]:
    body = {"model": "claude-haiku", "user": cust, "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body, headers=AUTH, timeout=30) as response:
        assert response.status_code == 200
        data = b"".join(response.iter_bytes())
    return response.headers["x-litellm-call-id"], [e for e in data.split(b"\n\n") if e]


def assert_failed_at_no_cost(server: RunningServer, response: httpx.Response, http_status: int) -> dict[str, Any]:
    event = usage_event(server, response.headers["x-litellm-call-id"])
    assert (event["status"], event["http_status"], event["cost"]) == ("failure", http_status, 0)
    return event


def test_a_rate_limit_is_passed_on_as_a_429(server: RunningServer, anthropic: RunningAnthropic) -> None:
    anthropic.app.fail_status, anthropic.app.retry_after_s = 429, 7
    cust = customer()
    response = post(server, cust)
    assert response.status_code == 429
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "429")
    assert error["message"].startswith("AnthropicException - Number of request tokens")
    assert response.headers["llm_provider-retry-after"] == "7"  # Anthropic's own, as LiteLLM passes it on
    assert_failed_at_no_cost(server, response, 429)
    assert customer_info(server.base_url, cust)["spend"] == 0


@pytest.mark.parametrize("status", [529, 500], ids=["overloaded", "api_error"])
def test_anthropics_server_errors_are_the_gateways_502_at_no_cost(
    server: RunningServer, anthropic: RunningAnthropic, status: int
) -> None:
    anthropic.app.fail_status = status
    cust = customer()
    response = post(server, cust)
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "upstream_error"
    assert_failed_at_no_cost(server, response, 502)
    assert customer_info(server.base_url, cust)["spend"] == 0


def test_a_request_anthropic_refuses_is_passed_on_as_its_400(server: RunningServer, anthropic: RunningAnthropic) -> None:
    cust = customer()
    response = post(server, cust, temperature=1.5)  # OpenAI takes up to 2, Anthropic up to 1
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "400")
    assert "temperature" in error["message"] and KEY not in response.text
    assert len(anthropic.app.requests) == 1
    assert_failed_at_no_cost(server, response, 400)


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [("/chat/completions", {"n": 2}, "n"), ("/chat/completions", {"frequency_penalty": 0.5}, "frequency_penalty"),
     ("/completions", {"prompt": "hello"}, None)],
    ids=["n", "penalty", "completions"],
)  # fmt: skip
def test_a_request_that_cannot_be_translated_is_refused_before_anything_is_sent(
    server: RunningServer, anthropic: RunningAnthropic, path: str, fields: dict[str, Any], param: str | None
) -> None:
    cust = customer()
    if path == "/completions":
        body = {"model": "claude-haiku", "user": cust, **fields}
        response = httpx.post(f"{server.base_url}{path}", json=body, headers=AUTH, timeout=30)
    else:
        response = post(server, cust, **fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert ("chat completions only" in error["message"]) is (path == "/completions")
    assert anthropic.app.requests == []
    assert_failed_at_no_cost(server, response, 400)


def test_an_error_event_midway_ends_the_stream_with_an_error_chunk(
    server: RunningServer, anthropic: RunningAnthropic, client: openai.OpenAI
) -> None:
    anthropic.app.stream_error_after = 3
    cust = customer()
    call_id, events = stream_events(server, cust)
    contents = [e for e in events if b'"content":' in e]
    assert len(contents) == 1 + 3  # the role chunk, then the three deltas sent before the error
    errors = [e for e in events if b'"error"' in e]
    assert errors and b"AnthropicException - Overloaded" in errors[0]
    assert b"[DONE]" not in events[-1]
    assert not any(b'"usage"' in e for e in events)  # the usage chunk held back, the client did not ask
    (event,) = support.usage_events(server, call_id)
    assert (event["status"], event["http_status"]) == ("failure", 502)
    # Billed for what was generated: message_start's exact input, the output estimated (and said so).
    prompt = sent_prompt_tokens(anthropic.app.requests[-1].json)
    assert (event["input_tokens"], event["usage_estimated"]) == (prompt, True)
    assert event["output_tokens"] >= 1
    assert customer_info(server.base_url, cust)["spend"] == event["cost"] > 0
    with pytest.raises(openai.APIError, match="Overloaded"):  # the SDK raises on the error chunk
        list(client.chat.completions.create(model="claude-haiku", messages=MESSAGES, stream=True))


def test_a_stream_cut_before_message_stop_is_recorded_as_a_failure(
    server: RunningServer, anthropic: RunningAnthropic
) -> None:
    anthropic.app.cut_stream_after = 2
    call_id, events = stream_events(server, customer())
    assert b"[DONE]" not in events[-1] and b'"error"' in events[-1]
    event = usage_event(server, call_id)
    assert (event["status"], event["http_status"], event["error_type"]) == ("failure", 502, "upstream_error")
    assert event["input_tokens"] == sent_prompt_tokens(anthropic.app.requests[-1].json)


def test_no_request_goes_unrecorded(server: RunningServer, anthropic: RunningAnthropic) -> None:
    """Successes and every kind of failure, each recorded by exactly one UsageRecorded."""
    cust = customer()
    call_ids = []

    def ask(**fields: Any) -> None:
        call_ids.append(post(server, cust, **fields).headers["x-litellm-call-id"])

    ask()
    ask(n=3)
    anthropic.app.fail_status, anthropic.app.fail_times = 529, 1
    ask()
    anthropic.app.fail_status, anthropic.app.fail_times = 429, 1
    ask()
    ask(temperature=1.7)
    anthropic.app.stream_error_after = 1
    call_ids.append(stream_events(server, cust)[0])
    anthropic.app.stream_error_after = None
    call_ids.append(stream_events(server, cust)[0])
    events = customer_events(server, cust)
    assert sorted(e["call_id"] for e in events) == sorted(call_ids)  # each once, none missing
    assert [e["status"] for e in events].count("success") == 2
    successes = [e for e in events if e["status"] == "success"]
    assert all(e["cost"] == cost(e["input_tokens"], e["output_tokens"]) for e in successes)
    assert customer_info(server.base_url, cust)["spend"] == sum(e["cost"] for e in events)
