"""Gemini deployments (`gemini/<model>`) through a real `spendledger serve`, against the fake of Google's
OpenAI-compatible endpoint (tests/fakes/gemini.py): the `openai` SDK and LangChain, streaming and not,
embeddings, the key from GEMINI_API_KEY as a bearer token, Google's errors; each request billed
exactly, in the ledger, at the catalogue's Google prices."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI

from tests.e2e.conftest import MASTER_KEY
from tests.e2e.enforcement_support import customer_info, query
from tests.fakes.gemini import GEMINI_KEY, RunningGemini, run_fake_gemini
from tests.fakes.upstream import REPLY_WORDS, count_tokens, prompt_tokens_for_messages, reply_for
from tests.support import PostgresForTests, RunningServer, run_server

AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
M = Decimal(1_000_000)
# genai-prices, Google: gemini-2.0-flash $0.10 / $0.40 per million, gemini-embedding-001 $0.15.
FLASH = (Decimal("0.1") / M, Decimal("0.4") / M)
EMBED = Decimal("0.15") / M
MESSAGES = [{"role": "user", "content": "explain double-entry bookkeeping briefly"}]


def config(gemini_root: str) -> str:
    # The first names Google's OpenAI-compatible base in full; the others give the API's root,
    # to which the row's /v1beta/openai is added.
    return f"""
model_list:
  - model_name: gemini-flash
    litellm_params:
      model: gemini/gemini-2.0-flash
      api_base: {gemini_root}/v1beta/openai
  - model_name: gemini-embedding
    litellm_params:
      model: gemini/gemini-embedding-001
      api_base: {gemini_root}
  - model_name: gemini-wrong-key
    litellm_params:
      model: gemini/gemini-2.0-flash
      api_base: {gemini_root}
      api_key: AIzaSy-not-the-key
general_settings:
  master_key: {MASTER_KEY}
"""


@pytest.fixture(scope="module")
def gemini() -> Iterator[RunningGemini]:
    with run_fake_gemini() as running:
        yield running


@pytest.fixture(scope="module")
def server(postgres: PostgresForTests, gemini: RunningGemini) -> Iterator[RunningServer]:
    url = postgres.new_database()
    with run_server(config(gemini.root_url), url, env={"GEMINI_API_KEY": GEMINI_KEY}) as running:
        yield running
    postgres.drop_database(url)


@pytest.fixture(autouse=True)
def _reset(gemini: RunningGemini) -> Iterator[None]:
    gemini.app.reset()
    yield
    gemini.app.reset()


@pytest.fixture
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(api_key=MASTER_KEY, base_url=server.base_url, max_retries=0, timeout=30)


def customer() -> str:
    return f"gm-{uuid.uuid4().hex[:10]}"


def flash_cost(messages: list[dict[str, Any]]) -> Decimal:
    return prompt_tokens_for_messages(messages) * FLASH[0] + REPLY_WORDS * FLASH[1]


def usage_event(server: RunningServer, call_id: str) -> dict[str, Any]:
    sql = "select data::text as data from events where type = 'UsageRecorded' and data->>'call_id' = $1"
    (row,) = query(server.database_url, sql, call_id)
    event: dict[str, Any] = json.loads(row["data"], parse_float=Decimal)
    return event


def test_a_chat_completion_goes_to_googles_path_with_the_key_and_is_billed(
    server: RunningServer, gemini: RunningGemini, client: openai.OpenAI
) -> None:
    cust = customer()
    raw = client.chat.completions.with_raw_response.create(model="gemini-flash", messages=MESSAGES, user=cust)
    completion = raw.parse()
    assert completion.choices[0].message.content == reply_for(MESSAGES)
    (sent,) = gemini.app.requests
    assert sent.path == "/v1beta/openai/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {GEMINI_KEY}"  # from GEMINI_API_KEY
    assert sent.json["model"] == "gemini-2.0-flash"
    expected = flash_cost(MESSAGES)
    assert Decimal(raw.headers["x-litellm-response-cost"]) == expected
    assert customer_info(server.base_url, cust)["spend"] == expected
    event = usage_event(server, raw.headers["x-litellm-call-id"])
    assert (event["provider"], event["upstream_model"], event["cost"]) == ("gemini", "gemini-2.0-flash", expected)
    assert event["priced"] is True


@pytest.mark.parametrize("asks_usage", [True, False], ids=["include_usage", "without"])
def test_a_stream_with_usage_on_its_last_chunk_is_billed_exactly(
    server: RunningServer, gemini: RunningGemini, client: openai.OpenAI, asks_usage: bool
) -> None:
    cust = customer()
    options = {"stream_options": {"include_usage": True}} if asks_usage else {}
    with client.chat.completions.with_streaming_response.create(
        model="gemini-flash", messages=MESSAGES, user=cust, stream=True, **options,
    ) as response:  # fmt: skip
        call_id = response.headers["x-litellm-call-id"]
        chunks = list(response.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply_for(MESSAGES)
    assert chunks[-1].choices and chunks[-1].choices[0].finish_reason == "stop"  # usage rode on it
    assert gemini.app.requests[-1].json["stream_options"] == {"include_usage": True}  # asked for, always
    event = usage_event(server, call_id)
    assert event["usage_estimated"] is False
    assert (event["input_tokens"], event["output_tokens"]) == (prompt_tokens_for_messages(MESSAGES), REPLY_WORDS)
    assert customer_info(server.base_url, cust)["spend"] == flash_cost(MESSAGES)


@pytest.mark.parametrize("streaming", [False, True], ids=["invoke", "stream"])
def test_langchain_chat_openai_on_gemini_is_billed_exactly(server: RunningServer, streaming: bool) -> None:
    cust = customer()
    chat = ChatOpenAI(
        base_url=server.base_url, api_key=MASTER_KEY, model="gemini-flash", extra_body={"user": cust},
        max_retries=0, streaming=streaming, stream_usage=True,
    )  # fmt: skip
    answer = chat.invoke([HumanMessage(content=MESSAGES[0]["content"])])
    assert answer.content == reply_for(MESSAGES)
    assert customer_info(server.base_url, cust)["spend"] == flash_cost(MESSAGES)


def test_embeddings_on_the_api_root_given_as_base(
    server: RunningServer, gemini: RunningGemini, client: openai.OpenAI
) -> None:
    cust = customer()
    vectors = client.embeddings.create(model="gemini-embedding", input="ledgers balance debits and credits", user=cust)
    assert len(vectors.data) == 1
    assert gemini.app.requests[-1].path == "/v1beta/openai/embeddings"
    assert customer_info(server.base_url, cust)["spend"] == count_tokens("ledgers balance debits and credits") * EMBED


def test_googles_list_wrapped_errors_become_the_openai_envelope(server: RunningServer, gemini: RunningGemini) -> None:
    cust = customer()
    body = {"model": "gemini-wrong-key", "user": cust, "messages": MESSAGES}
    response = httpx.post(f"{server.base_url}/chat/completions", json=body, headers=AUTH, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["message"], error["code"]) == ("API key not valid. Please pass a valid API key.", "400")
    assert "AIzaSy-not-the-key" not in response.text
    gemini.app.fail_status = 503
    body["model"] = "gemini-flash"
    failed = httpx.post(f"{server.base_url}/chat/completions", json=body, headers=AUTH, timeout=30)
    assert failed.status_code == 502 and failed.json()["error"]["type"] == "upstream_error"
    assert usage_event(server, failed.headers["x-litellm-call-id"])["cost"] == 0
    assert customer_info(server.base_url, cust)["spend"] == 0
