"""Seed 002, step by step: customer spend, the default tier, max_budget "0", pricing tiers."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import openai
import pytest

from tests.e2e.conftest import MASTER_KEY, proxy_config
from tests.e2e.enforcement_support import (
    away_from_minute_edge,
    chat,
    customer_info,
    decimal_json,
    post,
    query,
    unit_cost,
)
from tests.fakes.upstream import RunningUpstream
from tests.support import PostgresForTests, RunningServer, run_server

DEFAULT_TIER = "my-default-tier"


@pytest.fixture(scope="module")
def seed_server(postgres: PostgresForTests, upstream: RunningUpstream) -> Iterator[RunningServer]:
    url = postgres.new_database()
    extra = f"litellm_settings:\n  max_end_user_budget_id: {DEFAULT_TIER}\n"
    with run_server(proxy_config(upstream.base_url, extra), url) as running:
        yield running
    postgres.drop_database(url)


def test_the_customers_spend_is_tracked_and_exact(seed_server: RunningServer) -> None:
    for _ in range(3):
        assert chat(seed_server.base_url, "ishaan3").status_code == 200
    info = customer_info(seed_server.base_url, "ishaan3")
    assert info["spend"] == 3 * unit_cost()
    assert set(info) == {
        "user_id",
        "blocked",
        "alias",
        "spend",
        "allowed_model_region",
        "default_model",
        "litellm_budget_table",
    }


def test_the_default_tier_limits_new_customers_and_is_persisted_on_them(seed_server: RunningServer) -> None:
    created = post(
        seed_server.base_url,
        "/budget/new",
        {"budget_id": DEFAULT_TIER, "max_budget": 10, "rpm_limit": 2, "tpm_limit": 1000},
    )
    assert created.status_code == 200, created.text
    away_from_minute_edge()
    statuses = [chat(seed_server.base_url, "my-customer-id").status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    refused = chat(seed_server.base_url, "my-customer-id")
    assert refused.json()["error"]["type"] == "rate_limit_exceeded"
    assert int(refused.headers["retry-after"]) >= 1
    info = customer_info(seed_server.base_url, "my-customer-id")
    assert info["litellm_budget_table"]["budget_id"] == DEFAULT_TIER
    assert info["litellm_budget_table"]["rpm_limit"] == 2
    stored = query(
        seed_server.database_url, "select budget_id from customers where user_id = $1", "my-customer-id"
    )
    assert stored[0]["budget_id"] == DEFAULT_TIER
    # Customers with their own budget are not on the default tier.
    assert (
        post(seed_server.base_url, "/customer/new", {"user_id": "own-budget", "max_budget": 5}).status_code
        == 200
    )
    assert [chat(seed_server.base_url, "own-budget").status_code for _ in range(3)] == [200, 200, 200]


def test_a_customer_with_max_budget_zero_is_refused(seed_server: RunningServer) -> None:
    created = post(seed_server.base_url, "/customer/new", {"user_id": "zero-budget", "max_budget": "0"})
    assert created.status_code == 200, created.text
    refused = chat(seed_server.base_url, "zero-budget")
    assert refused.status_code == 429
    assert refused.headers["x-should-retry"] == "false"
    error = refused.json()["error"]
    assert error["type"] == "budget_exceeded"
    assert "zero-budget" in error["message"] and "Max budget: 0" in error["message"]
    assert customer_info(seed_server.base_url, "zero-budget")["spend"] == 0
    refusals = query(
        seed_server.database_url,
        "select data from events where type = 'RequestRefused' and data->>'customer_id' = $1",
        "zero-budget",
    )
    assert len(refusals) == 1


def test_pricing_tiers_with_the_openai_sdk(seed_server: RunningServer) -> None:
    tier = post(seed_server.base_url, "/budget/new", {"budget_id": "my-free-tier", "max_budget": 4})
    assert tier.status_code == 200, tier.text
    customer = post(
        seed_server.base_url, "/customer/new", {"user_id": "tier-customer", "budget_id": "my-free-tier"}
    )
    assert customer.status_code == 200, customer.text
    client = openai.OpenAI(base_url=seed_server.base_url, api_key=MASTER_KEY)
    completion = client.chat.completions.create(
        model="fake-openai-endpoint",
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hello!"},
        ],
        user="tier-customer",
    )
    assert completion.choices[0].message.content
    info = customer_info(seed_server.base_url, "tier-customer")
    assert info["litellm_budget_table"]["budget_id"] == "my-free-tier"
    assert info["litellm_budget_table"]["max_budget"] == 4
    assert info["spend"] > 0


def test_both_max_budget_and_budget_id_is_a_clear_400(seed_server: RunningServer) -> None:
    response = post(
        seed_server.base_url,
        "/customer/new",
        {"user_id": "both", "max_budget": 1, "budget_id": "my-free-tier"},
    )
    assert response.status_code == 400
    assert decimal_json(response)["error"]["message"] == "Set either 'max_budget' or 'budget_id', not both."
    assert query(seed_server.database_url, "select 1 from events where stream = 'customer:both'") == []


def test_a_blocked_customer_is_refused_whatever_the_key(seed_server: RunningServer) -> None:
    assert chat(seed_server.base_url, "to-block").status_code == 200
    assert post(seed_server.base_url, "/customer/block", {"user_ids": ["to-block"]}).status_code == 200
    refused = chat(seed_server.base_url, "to-block")
    assert refused.status_code == 403
    assert refused.json()["error"]["type"] == "customer_blocked"
    assert post(seed_server.base_url, "/customer/unblock", {"user_ids": ["to-block"]}).status_code == 200
    assert chat(seed_server.base_url, "to-block").status_code == 200
    assert customer_info(seed_server.base_url, "to-block")["spend"] == 2 * unit_cost()
    assert Decimal(0) < unit_cost()
