"""End-to-end fixtures: the fake provider, and `spendledger serve` running against it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.upstream import RunningUpstream, run_fake_upstream
from tests.support import PostgresForTests, RunningServer, run_server

# A key of our own: sk-1234 is publicly known, and `spendledger serve` refuses it (ledger/master_key.py).
MASTER_KEY = "sk-test-5d0c8e2a9f4b7163e1a8"
# Prices chosen so that costs have many decimal places: float arithmetic would show noise.
INPUT_PRICE = "0.0000015"
OUTPUT_PRICE = "0.000002"


def proxy_config(upstream_base_url: str, extra: str = "") -> str:
    return f"""
model_list:
  - model_name: fake-openai-endpoint
    litellm_params:
      model: openai/fake
      api_key: upstream-secret-key
      api_base: {upstream_base_url}
    model_info:
      input_cost_per_token: {INPUT_PRICE}
      output_cost_per_token: {OUTPUT_PRICE}
  - model_name: gpt-3.5-turbo
    litellm_params:
      model: openai/gpt-3.5-turbo
      api_key: upstream-secret-key
      api_base: {upstream_base_url}
  - model_name: gpt-3.5-turbo
    litellm_params:
      model: openai/gpt-3.5-turbo
      api_key: upstream-secret-key
      api_base: {upstream_base_url}
    model_info:
      id: second-deployment
  - model_name: text-embedding-3-small
    litellm_params:
      model: openai/text-embedding-3-small
      api_key: upstream-secret-key
      api_base: {upstream_base_url}
  - model_name: mock-model
    litellm_params:
      model: mock/demo
    model_info:
      input_cost_per_token: 0.000001
      output_cost_per_token: 0.000003
general_settings:
  master_key: {MASTER_KEY}
{extra}
"""


@pytest.fixture(scope="session")
def upstream() -> Iterator[RunningUpstream]:
    with run_fake_upstream() as running:
        yield running


@pytest.fixture(scope="module")
def server(postgres: PostgresForTests, upstream: RunningUpstream) -> Iterator[RunningServer]:
    """One server (and database) per test module; tests use distinct customers and keys."""
    url = postgres.new_database()
    with run_server(proxy_config(upstream.base_url), url) as running:
        yield running
    postgres.drop_database(url)


@pytest.fixture(autouse=True)
def _reset_upstream(upstream: RunningUpstream) -> Iterator[None]:
    upstream.app.reset()
    yield
    upstream.app.reset()
