"""A config naming every prefix of the provider table starts and serves: the OpenAI-compatible family
reaches the provider with the key from its LiteLLM variable, and a local server's root gets its /v1.
Azure, Gemini and Anthropic, which need fakes of their own APIs, are tested end to end in
tests/e2e/test_azure.py, test_gemini.py and test_anthropic.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest

from spendledger.ledger.providers import PROVIDERS
from tests.e2e.conftest import MASTER_KEY
from tests.e2e.enforcement_support import customer_info
from tests.fakes.upstream import REPLY_WORDS, RunningUpstream, prompt_tokens_for_messages
from tests.support import PostgresForTests, RunningServer, run_server

AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
MESSAGES = [{"role": "user", "content": "count my tokens please"}]
PRICES = "    model_info: {input_cost_per_token: 0.000001, output_cost_per_token: 0.000004}\n"
# Every row's key variable, set: each deployment without its own key must send its row's.
KEYS = {spec.key_env[0]: f"key-of-{prefix}" for prefix, spec in PROVIDERS.items() if spec.key_env}


def config(upstream_root: str) -> str:
    """One deployment per prefix, all on the fake (a root for the rows that add a path to it), but
    Gemini's and Anthropic's, which speak to nothing here (they only have to start)."""
    entries = []
    for prefix, spec in PROVIDERS.items():
        params = f"model: {prefix}/gpt-4o-mini"
        if prefix == "azure":
            continue  # tests/e2e/test_azure.py: its paths need its own fake
        if spec.base_suffix == "/v1":
            params += f", api_base: {upstream_root}"  # Ollama's, LM Studio's, Mistral's root
        elif spec.base_suffix or spec.wire == "anthropic":
            params += ", api_base: http://127.0.0.1:9"  # tests/e2e/test_gemini.py, test_anthropic.py
        elif prefix != "mock":
            params += f", api_base: {upstream_root}/v1"
        entries.append(f"  - model_name: via-{prefix}\n    litellm_params: {{{params}}}\n{PRICES}")
    return "model_list:\n" + "".join(entries) + f"general_settings:\n  master_key: {MASTER_KEY}\n"


@pytest.fixture(scope="module")
def server(postgres: PostgresForTests, upstream: RunningUpstream) -> Iterator[RunningServer]:
    url = postgres.new_database()
    with run_server(config(upstream.root_url), url, env=KEYS) as running:
        yield running
    postgres.drop_database(url)


def ask(server: RunningServer, model: str, customer: str) -> httpx.Response:
    body: dict[str, Any] = {"model": model, "user": customer, "messages": MESSAGES}
    return httpx.post(f"{server.base_url}/chat/completions", json=body, headers=AUTH, timeout=30)


def test_every_prefix_is_served(server: RunningServer) -> None:
    listed = httpx.get(f"{server.base_url}/models", headers=AUTH, timeout=30).json()["data"]
    expected = {f"via-{prefix}" for prefix in PROVIDERS if prefix != "azure"}
    assert {model["id"] for model in listed} == expected


@pytest.mark.parametrize(
    "prefix", [p for p, s in PROVIDERS.items() if s.wire == "openai" and s.base_suffix in ("", "/v1") and p != "mock"]
)
def test_the_openai_compatible_family_sends_its_key_and_is_billed(
    server: RunningServer, upstream: RunningUpstream, prefix: str
) -> None:
    customer = f"px-{uuid.uuid4().hex[:10]}"
    response = ask(server, f"via-{prefix}", customer)
    assert response.status_code == 200, response.text
    expected = prompt_tokens_for_messages(MESSAGES) * Decimal("0.000001") + REPLY_WORDS * Decimal("0.000004")
    assert customer_info(server.base_url, customer)["spend"] == expected
    sent = upstream.app.requests[-1]
    assert sent.path == "/v1/chat/completions"
    spec = PROVIDERS[prefix]
    key = KEYS[spec.key_env[0]] if spec.key_env else None  # (rows may share a variable)
    assert sent.headers.get("authorization") == (f"Bearer {key}" if key else None)
    namespace = spec.model_namespace
    assert sent.json["model"] == f"{namespace}gpt-4o-mini"
