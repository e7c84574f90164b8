"""Checks that the Azure and Gemini fakes answer as the real services do: their paths, query, headers,
answer shapes and refusals, and their failures on demand."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import pytest

from tests.fakes.azure import AZURE_KEY, FILTERED_MESSAGE, RunningAzure, run_fake_azure
from tests.fakes.gemini import GEMINI_KEY, RunningGemini, run_fake_gemini
from tests.fakes.upstream import REPLY_WORDS, prompt_tokens_for_messages

MESSAGES = [{"role": "user", "content": "hello there"}]
CHAT = "/openai/deployments/gpt-4o-mini/chat/completions"


@pytest.fixture(scope="module")
def azure() -> Iterator[RunningAzure]:
    with run_fake_azure() as running:
        yield running


@pytest.fixture(scope="module")
def gemini() -> Iterator[RunningGemini]:
    with run_fake_gemini() as running:
        yield running


def post(base: str, path: str, body: dict[str, Any], headers: dict[str, str], **params: str) -> httpx.Response:
    return httpx.post(f"{base}{path}", json=body, headers=headers, params=params, timeout=10)


def sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    frames = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    return [msgspec.json.decode(frame) for frame in frames[:-1]]


def test_azure_answers_on_a_deployment_path_with_its_model_and_filter_results(azure: RunningAzure) -> None:
    azure.app.reset()
    body = {"model": "ignored", "messages": MESSAGES}
    answer = post(azure.base_url, CHAT, body, {"api-key": AZURE_KEY}, **{"api-version": "2024-10-21"})
    assert answer.status_code == 200 and "apim-request-id" in answer.headers
    payload = answer.json()
    assert payload["model"] == "gpt-4o-mini" and payload["prompt_filter_results"][0]["prompt_index"] == 0
    assert payload["choices"][0]["content_filter_results"]["hate"] == {"filtered": False, "severity": "safe"}
    assert payload["usage"]["prompt_tokens"] == prompt_tokens_for_messages(MESSAGES)
    v1 = post(azure.base_url, "/openai/v1/chat/completions", {"model": "gpt-4o-mini", "messages": MESSAGES},
              {"api-key": AZURE_KEY})  # fmt: skip
    assert v1.status_code == 200


def test_azure_streams_open_with_the_prompt_filter_chunk(azure: RunningAzure) -> None:
    body = {"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    answer = post(azure.base_url, CHAT, body, {"api-key": AZURE_KEY}, **{"api-version": "2024-10-21"})
    events = sse_events(answer)
    assert events[0]["choices"] == [] and events[0]["model"] == "" and "prompt_filter_results" in events[0]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == REPLY_WORDS


@pytest.mark.parametrize(
    ("path", "query", "headers", "status", "code"),
    [
        (CHAT, {"api-version": "2024-10-21"}, {"api-key": "wrong"}, 401, "401"),
        (CHAT, {"api-version": "2024-10-21"}, {"authorization": f"Bearer {AZURE_KEY}"}, 401, "401"),
        (CHAT, {}, {"api-key": AZURE_KEY}, 404, "404"),
        (CHAT, {"api-version": "1999-01-01"}, {"api-key": AZURE_KEY}, 400, "BadRequest"),
        ("/openai/deployments/nope/chat/completions", {"api-version": "2024-10-21"}, {"api-key": AZURE_KEY}, 404,
         "DeploymentNotFound"),
        ("/v1/chat/completions", {}, {"api-key": AZURE_KEY}, 404, "404"),
    ],
)  # fmt: skip
def test_azure_refuses_as_azure(
    azure: RunningAzure, path: str, query: dict[str, str], headers: dict[str, str], status: int, code: str
) -> None:
    answer = post(azure.base_url, path, {"messages": MESSAGES}, headers, **query)
    assert answer.status_code == status
    assert answer.json()["error"]["code"] == code and "type" not in answer.json()["error"]


def test_azure_fails_on_demand(azure: RunningAzure) -> None:
    azure.app.reset()
    azure.app.content_filter = True
    refused = post(azure.base_url, CHAT, {"messages": MESSAGES}, {"api-key": AZURE_KEY}, **{"api-version": "2024-10-21"})
    error = refused.json()["error"]
    assert (refused.status_code, error["code"], error["message"]) == (400, "content_filter", FILTERED_MESSAGE)
    assert error["innererror"]["content_filter_result"]["hate"]["filtered"] is True
    azure.app.reset()
    azure.app.fail_status = 429
    throttled = post(azure.base_url, CHAT, {"messages": MESSAGES}, {"api-key": AZURE_KEY}, **{"api-version": "2024-10-21"})
    assert (throttled.status_code, throttled.headers["retry-after"]) == (429, "6")
    azure.app.reset()


def test_gemini_answers_on_googles_paths_and_puts_stream_usage_on_the_last_chunk(gemini: RunningGemini) -> None:
    gemini.app.reset()
    auth = {"authorization": f"Bearer {GEMINI_KEY}"}
    body: dict[str, Any] = {"model": "gemini-2.0-flash", "messages": MESSAGES}
    answer = post(gemini.base_url, "/chat/completions", body, auth)
    assert answer.status_code == 200 and "system_fingerprint" not in answer.json()
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    events = sse_events(post(gemini.base_url, "/chat/completions", body, auth))
    assert events[-1]["choices"][0]["finish_reason"] == "stop" and events[-1]["usage"]["completion_tokens"] == REPLY_WORDS
    assert all("usage" not in event for event in events[:-1])
    embedded = post(gemini.base_url, "/embeddings", {"model": "gemini-embedding-001", "input": "a b"}, auth)
    assert embedded.status_code == 200
    assert post(gemini.base_url, "/completions", {"model": "gemini-2.0-flash", "prompt": "x"}, auth).status_code == 404


@pytest.mark.parametrize(
    ("headers", "model", "fail", "status", "google_status"),
    [
        ({}, "gemini-2.0-flash", None, 403, "PERMISSION_DENIED"),
        ({"authorization": "Bearer wrong"}, "gemini-2.0-flash", None, 400, "INVALID_ARGUMENT"),
        ({"authorization": f"Bearer {GEMINI_KEY}"}, "gemini-9", None, 404, "NOT_FOUND"),
        ({"authorization": f"Bearer {GEMINI_KEY}"}, "gemini-2.0-flash", 429, 429, "RESOURCE_EXHAUSTED"),
    ],
)
def test_gemini_refuses_with_googles_list_wrapped_error(
    gemini: RunningGemini, headers: dict[str, str], model: str, fail: int | None, status: int, google_status: str
) -> None:
    gemini.app.reset()
    gemini.app.fail_status = fail
    answer = post(gemini.base_url, "/chat/completions", {"model": model, "messages": MESSAGES}, headers)
    assert answer.status_code == status
    (wrapped,) = answer.json()
    assert (wrapped["error"]["code"], wrapped["error"]["status"]) == (status, google_status)
    gemini.app.reset()
