"""Azure OpenAI deployments (`azure/<deployment>`) through a real `spendledger serve`, against the fake
Azure resource (tests/fakes/azure.py): seed 002's curl, the `openai` SDK and LangChain, streaming and
not, chat, completions and embeddings, the v1 API, Entra ID tokens, content-filter refusals; each
request billed exactly, in the ledger and in Lago, at the catalogue's Azure prices."""

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
from tests.e2e.enforcement_support import customer_info, query, wait_until
from tests.e2e.outbox_support import lago_env
from tests.fakes.azure import (
    AZURE_KEY,
    FILTERED_MESSAGE,
    VERDICT_HATE,
    FakeAzure,
    RunningAzure,
    run_fake_azure,
)
from tests.fakes.lago import FakeLago, RunningLago, run_fake_lago
from tests.fakes.upstream import REPLY_WORDS, count_tokens, prompt_tokens_for_messages, reply_for
from tests.support import PostgresForTests, RunningServer, run_server

AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
M = Decimal(1_000_000)
# genai-prices, Azure (its gpt-3.5-turbo matches Azure's name gpt-35-turbo): $0.50 / $1.50 per
# million; gpt-4o-mini $0.15 / $0.60; text-embedding-3-small $0.02.
GPT35 = (Decimal("0.5") / M, Decimal("1.5") / M)
MINI = (Decimal("0.15") / M, Decimal("0.6") / M)
EMBED = Decimal("0.02") / M
AD_TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOi-fake-entra-token"
SEED_MESSAGES = [{"role": "user", "content": "what time is it"}]


def config(azure: str) -> str:
    return f"""
model_list:
  - model_name: azure-gpt-3.5            # seed 002's model; the key from AZURE_API_KEY
    litellm_params:
      model: azure/gpt-35-turbo
      api_base: {azure}
      api_version: "2024-10-21"
  - model_name: azure-embedding
    litellm_params:
      model: azure/text-embedding-3-small
      api_base: {azure}
      api_version: "2024-10-21"
      api_key: os.environ/AZURE_API_KEY
  - model_name: azure-v1                 # Azure's v1 API: the deployment goes in the body
    litellm_params:
      model: azure/gpt-4o-mini
      api_base: {azure}
      api_version: v1
  - model_name: azure-entra              # an Entra ID token instead of a key
    litellm_params:
      model: azure/my-team-deployment
      api_base: {azure}/
      api_version: "2024-06-01"
      api_key: ""
      azure_ad_token: os.environ/SL_TEST_AD_TOKEN
    model_info:
      base_model: azure/gpt-4o-mini      # the deployment's name is not a model: priced as this
litellm_settings:
  callbacks: ["lago"]
general_settings:
  master_key: {MASTER_KEY}
"""


@pytest.fixture(scope="module")
def azure() -> Iterator[RunningAzure]:
    app = FakeAzure()
    app.deployments["my-team-deployment"] = "gpt-4o-mini"
    with run_fake_azure(app) as running:
        yield running


@pytest.fixture(scope="module")
def lago() -> Iterator[RunningLago]:
    with run_fake_lago(FakeLago()) as running:
        yield running


@pytest.fixture(scope="module")
def server(postgres: PostgresForTests, azure: RunningAzure, lago: RunningLago) -> Iterator[RunningServer]:
    url = postgres.new_database()
    env = {**lago_env(lago.base_url), "AZURE_OPENAI_API_KEY": "", "AZURE_API_KEY": AZURE_KEY, "SL_TEST_AD_TOKEN": AD_TOKEN}
    with run_server(config(azure.base_url), url, env=env) as running:
        yield running
    postgres.drop_database(url)


@pytest.fixture(autouse=True)
def _reset(azure: RunningAzure) -> Iterator[None]:
    azure.app.reset()
    azure.app.ad_token = AD_TOKEN
    yield
    azure.app.reset()


def customer() -> str:
    return f"az-{uuid.uuid4().hex[:10]}"


def chat_cost(prices: tuple[Decimal, Decimal], messages: list[dict[str, Any]], reply_tokens: int = REPLY_WORDS) -> Decimal:
    return prompt_tokens_for_messages(messages) * prices[0] + reply_tokens * prices[1]


def usage_event(server: RunningServer, call_id: str) -> dict[str, Any]:
    """The request's one UsageRecorded event."""
    sql = "select data::text as data from events where type = 'UsageRecorded' and data->>'call_id' = $1"
    (row,) = query(server.database_url, sql, call_id)
    event: dict[str, Any] = json.loads(row["data"], parse_float=Decimal)
    return event


def test_seed_002_curl_on_an_azure_deployment_bills_the_customer(
    server: RunningServer, azure: RunningAzure, lago: RunningLago
) -> None:
    body = {"model": "azure-gpt-3.5", "user": "ishaan3", "messages": SEED_MESSAGES}
    response = httpx.post(f"{server.base_url}/chat/completions", json=body, headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"] == "gpt-35-turbo"  # Azure names the deployment's model
    assert answer["choices"][0]["message"]["content"] == reply_for(SEED_MESSAGES)
    assert answer["prompt_filter_results"][0]["content_filter_results"]["hate"]["filtered"] is False

    (sent,) = azure.app.requests
    assert sent.path == "/openai/deployments/gpt-35-turbo/chat/completions"
    assert sent.query == "api-version=2024-10-21"
    assert sent.headers["api-key"] == AZURE_KEY  # from AZURE_API_KEY: the deployment names none
    assert "authorization" not in sent.headers
    assert sent.json["messages"] == SEED_MESSAGES and sent.json["user"] == "ishaan3"

    expected = chat_cost(GPT35, SEED_MESSAGES)
    assert Decimal(response.headers["x-litellm-response-cost"]) == expected
    assert customer_info(server.base_url, "ishaan3")["spend"] == expected
    event = usage_event(server, response.headers["x-litellm-call-id"])
    assert (event["provider"], event["upstream_model"], event["cost"]) == ("azure", "gpt-35-turbo", expected)
    assert event["priced"] is True and event["usage_estimated"] is False
    assert wait_until(lambda: len(lago.app.events_for("ishaan3")) == 1, 30)
    assert Decimal(str(lago.app.events_for("ishaan3")[0]["properties"]["response_cost"])) == expected


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_the_openai_sdk_on_azure_is_billed_exactly(server: RunningServer, azure: RunningAzure, stream: bool) -> None:
    client = openai.OpenAI(api_key=MASTER_KEY, base_url=server.base_url, max_retries=0, timeout=30)
    cust = customer()
    messages = [{"role": "user", "content": "write a haiku about ledgers"}]
    if stream:
        chunks = list(
            client.chat.completions.create(
                model="azure-gpt-3.5", messages=messages, user=cust, stream=True,
                stream_options={"include_usage": True},
            )
        )  # fmt: skip
        assert chunks[0].choices == []  # Azure's first chunk: the prompt's filter results only
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
    else:
        completion = client.chat.completions.create(model="azure-gpt-3.5", messages=messages, user=cust)
        text, usage = completion.choices[0].message.content or "", completion.usage
    assert text == reply_for(messages)
    assert usage is not None and usage.completion_tokens == REPLY_WORDS
    assert customer_info(server.base_url, cust)["spend"] == chat_cost(GPT35, messages)


@pytest.mark.parametrize("streaming", [False, True], ids=["invoke", "stream"])
def test_langchain_chat_openai_on_azure_is_billed_exactly(server: RunningServer, streaming: bool) -> None:
    cust = customer()
    chat = ChatOpenAI(
        base_url=server.base_url, api_key=MASTER_KEY, model="azure-gpt-3.5", extra_body={"user": cust},
        max_retries=0, streaming=streaming, stream_usage=True,
    )  # fmt: skip
    question = "tell me why ledgers are amazing in 1 sentence"
    answer = chat.invoke([HumanMessage(content=question)])
    messages = [{"role": "user", "content": question}]
    assert answer.content == reply_for(messages)
    assert customer_info(server.base_url, cust)["spend"] == chat_cost(GPT35, messages)


def test_completions_and_embeddings_take_azure_paths(server: RunningServer, azure: RunningAzure) -> None:
    client = openai.OpenAI(api_key=MASTER_KEY, base_url=server.base_url, max_retries=0, timeout=30)
    cust = customer()
    text = client.completions.create(model="azure-gpt-3.5", prompt="say this is a test", user=cust)
    assert azure.app.requests[-1].path == "/openai/deployments/gpt-35-turbo/completions"
    assert text.choices[0].text == reply_for(None)
    vectors = client.embeddings.create(model="azure-embedding", input=["one two three", "four five"], user=cust)
    assert len(vectors.data) == 2
    assert azure.app.requests[-1].path == "/openai/deployments/text-embedding-3-small/embeddings"
    assert azure.app.requests[-1].query == "api-version=2024-10-21"
    expected = count_tokens("say this is a test") * GPT35[0] + REPLY_WORDS * GPT35[1] + 5 * EMBED
    assert customer_info(server.base_url, cust)["spend"] == expected


def test_the_v1_api_names_the_deployment_in_the_body(server: RunningServer, azure: RunningAzure) -> None:
    cust = customer()
    body = {"model": "azure-v1", "user": cust, "messages": SEED_MESSAGES}
    response = httpx.post(f"{server.base_url}/chat/completions", json=body, headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    sent = azure.app.requests[-1]
    assert (sent.path, sent.query, sent.json["model"]) == ("/openai/v1/chat/completions", "", "gpt-4o-mini")
    assert customer_info(server.base_url, cust)["spend"] == chat_cost(MINI, SEED_MESSAGES)


def test_an_entra_token_is_a_bearer_and_base_model_prices_the_deployment(
    server: RunningServer, azure: RunningAzure
) -> None:
    cust = customer()
    body = {"model": "azure-entra", "user": cust, "messages": SEED_MESSAGES, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body, headers=AUTH, timeout=30) as response:
        assert response.status_code == 200
        frames = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "data: [DONE]"
    sent = azure.app.requests[-1]
    assert sent.path == "/openai/deployments/my-team-deployment/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {AD_TOKEN}" and "api-key" not in sent.headers
    assert customer_info(server.base_url, cust)["spend"] == chat_cost(MINI, SEED_MESSAGES)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_content_filter_refusal_is_passed_on_as_litellm_does_and_costs_nothing(
    server: RunningServer, azure: RunningAzure, stream: bool
) -> None:
    azure.app.content_filter = True
    cust = customer()
    body = {"model": "azure-gpt-3.5", "user": cust, "messages": SEED_MESSAGES, "stream": stream}
    response = httpx.post(f"{server.base_url}/chat/completions", json=body, headers=AUTH, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["message"], error["code"], error["param"]) == (FILTERED_MESSAGE, "content_filter", "prompt")
    assert error["type"] == "invalid_request_error"  # Azure's is null
    inner = error["provider_specific_fields"]["innererror"]
    assert inner == {"code": "ResponsibleAIPolicyViolation", "content_filter_result": VERDICT_HATE}
    event = usage_event(server, response.headers["x-litellm-call-id"])
    assert (event["status"], event["http_status"], event["cost"]) == ("failure", 400, 0)
    assert customer_info(server.base_url, cust)["spend"] == 0


def test_azure_throttling_is_passed_on_and_recorded(server: RunningServer, azure: RunningAzure) -> None:
    azure.app.fail_status = 429
    body = {"model": "azure-gpt-3.5", "user": customer(), "messages": SEED_MESSAGES}
    response = httpx.post(f"{server.base_url}/chat/completions", json=body, headers=AUTH, timeout=30)
    assert response.status_code == 429
    error = response.json()["error"]
    assert error["code"] == "429" and "Please retry after 6 seconds" in error["message"]
    assert "provider_specific_fields" not in error
    event = usage_event(server, response.headers["x-litellm-call-id"])
    assert (event["status"], event["cost"]) == ("failure", 0)
