"""What the Anthropic end-to-end tests share: the config, the fake and the server, and the exact cost
of an answer at the catalogue's prices for claude-3-5-haiku (genai-prices, Anthropic)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import openai
import pytest

from tests.e2e.conftest import MASTER_KEY
from tests.e2e.enforcement_support import query
from tests.fakes.anthropic import RunningAnthropic, run_fake_anthropic
from tests.fakes.anthropic_rules import prompt_tokens
from tests.support import PostgresForTests, RunningServer, run_server

AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
KEY = "sk-ant-api03-test-6f1d2c9b"
MODEL = "claude-3-5-haiku-20241022"
M = Decimal(1_000_000)
# genai-prices, Anthropic, claude-3-5-haiku: $0.80 input, $4 output, $0.08 cache read, $1 cache write
# per million tokens.
INPUT, OUTPUT, CACHE_READ, CACHE_WRITE = (Decimal(p) / M for p in ("0.8", "4", "0.08", "1"))
SMALL_OUTPUT = 1000  # model_info.max_output_tokens of the `claude-small` deployment


def config(anthropic_root: str) -> str:
    return f"""
model_list:
  - model_name: claude-haiku              # the key from ANTHROPIC_API_KEY
    litellm_params:
      model: anthropic/{MODEL}
      api_base: {anthropic_root}
  - model_name: claude-small              # an output limit below the translation's default
    litellm_params:
      model: anthropic/{MODEL}
      api_base: {anthropic_root}/v1
    model_info:
      max_output_tokens: {SMALL_OUTPUT}
general_settings:
  master_key: {MASTER_KEY}
"""


@pytest.fixture(scope="module")
def anthropic() -> Iterator[RunningAnthropic]:
    with run_fake_anthropic() as running:
        yield running


@pytest.fixture(scope="module")
def server(postgres: PostgresForTests, anthropic: RunningAnthropic) -> Iterator[RunningServer]:
    url = postgres.new_database()
    with run_server(config(anthropic.root_url), url, env={"ANTHROPIC_API_KEY": KEY}) as running:
        yield running
    postgres.drop_database(url)


@pytest.fixture(autouse=True)
def _reset(anthropic: RunningAnthropic) -> Iterator[None]:
    anthropic.app.reset()
    anthropic.app.required_api_key = KEY  # a request without the deployment's key is refused
    yield
    anthropic.app.reset()


@pytest.fixture
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(api_key=MASTER_KEY, base_url=server.base_url, max_retries=0, timeout=30)


def customer() -> str:
    return f"an-{uuid.uuid4().hex[:10]}"


def sent_prompt_tokens(body: dict[str, Any]) -> int:
    """The input tokens the fake counts for the Messages request it was sent."""
    return prompt_tokens(body)[0]


def cost(prompt: int, output: int, *, read: int = 0, write: int = 0) -> Decimal:
    """`prompt` counts every input token, the cache's included (OpenAI's `prompt_tokens`)."""
    return (prompt - read - write) * INPUT + read * CACHE_READ + write * CACHE_WRITE + output * OUTPUT


def usage_events(server: RunningServer, call_id: str) -> list[dict[str, Any]]:
    sql = "select data::text as data from events where type = 'UsageRecorded' and data->>'call_id' = $1"
    return [json.loads(row["data"], parse_float=Decimal) for row in query(server.database_url, sql, call_id)]


def usage_event(server: RunningServer, call_id: str) -> dict[str, Any]:
    (event,) = usage_events(server, call_id)
    return event


def customer_events(server: RunningServer, cust: str) -> list[dict[str, Any]]:
    sql = "select data::text as data from events where type = 'UsageRecorded' and data->>'customer_id' = $1"
    return [json.loads(row["data"], parse_float=Decimal) for row in query(server.database_url, sql, cust)]
