"""Every kind of token priced as providers bill it (issue 18): cached input at its own price, prompt-
cache writes, reasoning, audio, tiers past their threshold — from LiteLLM's `model_info` keys and
from the genai-prices catalogue (whose own calculation our charge must match to the last digit) —
and the hold still an upper bound when a kind costs more than plain input."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
import yaml
from genai_prices import Usage, calc_price
from hypothesis import given, settings
from hypothesis import strategies as st

from spendledger.ledger.config import ConfigError, Deployment, _DecimalLoader, parse_settings
from spendledger.ledger.holds import WorstCase, worst_case_cost
from spendledger.ledger.money import cost_of
from spendledger.ledger.pricing import Price, PriceTier, catalogue_price, charge, from_catalogue, price_for
from spendledger.ledger.tokens import PARENT, TokenUsage

M = Decimal(1_000_000)


def config_deployment(model: str, api_base: str = "http://127.0.0.1:9/v1", **model_info: Any) -> Deployment:
    info = "".join(f"\n      {k}: {v}" for k, v in model_info.items())
    text = f"""
model_list:
  - model_name: group
    litellm_params:
      model: {model}
      api_base: {api_base}
    model_info:
      id: d{info}
general_settings:
  master_key: sk-test-5d0c8e2a9f4b7163e1a8
"""
    return parse_settings(yaml.load(text, Loader=_DecimalLoader), {}).deployments[0]


def test_openai_cached_tokens_are_billed_at_the_catalogue_cached_price() -> None:
    # gpt-4o: $2.50 input, $1.25 cached input, $10 output per million.
    price = price_for(config_deployment("openai/gpt-4o"))
    cost = charge(price, TokenUsage.reported(1000, 100, cache_read=400))
    assert cost.costs == {
        "input": 600 * Decimal("2.5") / M,
        "cache_read": 400 * Decimal("1.25") / M,
        "output": 100 * Decimal(10) / M,
    }
    assert cost.total == Decimal("0.003")  # 0.0015 + 0.0005 + 0.001, not 0.0035 at the full input price
    assert cost.unit_prices["cache_read"] == Decimal("0.00000125")


def test_configured_cache_and_reasoning_prices_are_used_kind_by_kind() -> None:
    price = price_for(
        config_deployment(
            "openai/fake",
            input_cost_per_token="0.000003",
            output_cost_per_token="0.000015",
            cache_read_input_token_cost="0.0000003",
            cache_creation_input_token_cost="0.00000375",
            output_cost_per_reasoning_token="0.00002",
        )
    )
    assert price is not None and price.source == "config"
    cost = charge(price, TokenUsage.reported(10_000, 2_000, cache_read=6_000, cache_write=3_000, reasoning=1_500))
    assert cost.costs == {
        "input": Decimal("0.003000"),  # 1,000 plain
        "cache_read": Decimal("0.0018000"),
        "cache_write": Decimal("0.01125000"),
        "output": Decimal("0.007500"),  # 500 plain
        "reasoning": Decimal("0.0300000"),
    }
    assert cost.total == Decimal("0.0535500")
    assert cost.input_cost == Decimal("0.0160500") and cost.output_cost == Decimal("0.0375000")


def test_a_kind_without_a_price_of_its_own_is_billed_at_its_parents() -> None:
    price = Price(input_cost_per_token=Decimal("0.000002"), output_cost_per_token=Decimal("0.000008"), source="config")
    cost = charge(price, TokenUsage.reported(1000, 500, cache_read=300, reasoning=200))
    assert cost.total == 1000 * Decimal("0.000002") + 500 * Decimal("0.000008")
    assert cost.unit_prices["cache_read"] == Decimal("0.000002")
    assert cost.unit_prices["reasoning"] == Decimal("0.000008")
    assert cost.unpriced_kinds == ()


def test_audio_without_an_audio_price_is_named_unpriced() -> None:
    price = Price(input_cost_per_token=Decimal("0.000002"), output_cost_per_token=Decimal("0.000008"), source="config")
    cost = charge(price, TokenUsage.reported(1000, 500, input_audio=100, output_audio=50))
    assert cost.unpriced_kinds == ("input_audio", "output_audio")
    priced = Price(
        input_cost_per_token=Decimal("0.000002"), output_cost_per_token=Decimal("0.000008"),
        kinds={"input_audio": Decimal("0.00004"), "output_audio": Decimal("0.00008")}, source="config",
    )  # fmt: skip
    cost = charge(priced, TokenUsage.reported(1000, 500, input_audio=100, output_audio=50))
    assert cost.unpriced_kinds == ()
    assert cost.costs["input_audio"] == Decimal("0.00400") and cost.costs["output_audio"] == Decimal("0.00400")


def test_a_configured_tier_applies_to_every_token_past_its_threshold() -> None:
    deployment = config_deployment(
        "openai/fake",
        input_cost_per_token="0.000001",
        output_cost_per_token="0.000002",
        input_cost_per_token_above_128k_tokens="0.000002",
        output_cost_per_token_above_128k_tokens="0.000004",
    )
    price = price_for(deployment)
    assert price is not None
    assert price.tiers == (
        PriceTier(above=128_000, unit_prices={"input": Decimal("0.000002"), "output": Decimal("0.000004")}),
    )
    at = charge(price, TokenUsage.reported(128_000, 1000))  # at the threshold: not past it
    assert at.total == 128_000 * Decimal("0.000001") + 1000 * Decimal("0.000002")
    past = charge(price, TokenUsage.reported(128_001, 1000))
    assert past.total == 128_001 * Decimal("0.000002") + 1000 * Decimal("0.000004")
    assert (past.input_cost_per_token, past.output_cost_per_token) == (Decimal("0.000002"), Decimal("0.000004"))


def test_a_catalogue_tier_past_its_threshold() -> None:
    # gemini-2.5-pro: $1.25 / $10 per million, $2.50 / $15 past 200,000 input tokens.
    # (Google is not a provider spendledger forwards to yet: the catalogue's prices, converted.)
    found = calc_price(Usage(input_tokens=0, output_tokens=0), model_ref="gemini-2.5-pro", provider_id="google")
    price = from_catalogue(found.model_price)
    assert price is not None
    below = charge(price, TokenUsage.reported(200_000, 1000))
    past = charge(price, TokenUsage.reported(200_001, 1000, cache_read=1))
    assert below.total == 200_000 * Decimal("1.25") / M + 1000 * Decimal(10) / M
    assert past.total == 200_000 * Decimal("2.5") / M + 1 * Decimal("0.25") / M + 1000 * Decimal(15) / M


def test_an_openrouter_model_is_priced_from_the_openrouter_catalogue() -> None:
    deployment = config_deployment("openrouter/openai/gpt-4o")
    price = price_for(deployment)
    assert price is not None and price.source == "genai-prices"
    cost = charge(price, TokenUsage.reported(1_000_000, 1_000_000))
    assert cost.total == Decimal("12.5")
    # On OpenRouter's own URL an `openai/` deployment is found by its API's address.
    by_url = catalogue_price(config_deployment("openai/openai/gpt-4o", api_base="https://openrouter.ai/api/v1"))
    assert by_url == price


CATALOGUE = [
    ("openai", "gpt-4o"),
    ("openai", "gpt-4o-mini"),
    ("openai", "o3"),
    ("openai", "gpt-4o-audio-preview"),
    ("anthropic", "claude-sonnet-4"),
    ("google", "gemini-2.5-pro"),
    ("openrouter", "openai/gpt-4o"),
    ("openai", "gpt-image-1"),
]


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(CATALOGUE),
    st.integers(0, 400_000),
    st.integers(0, 100_000),
    st.integers(0, 400_000),
    st.integers(0, 400_000),
    st.integers(0, 50_000),
    st.integers(0, 50_000),
    st.integers(0, 50_000),
    st.integers(0, 50_000),
)
def test_our_charge_is_genai_prices_own_calculation(
    model: tuple[str, str], input_tokens: int, output_tokens: int, cached: int, written: int, audio_in: int,
    audio_out: int, image_in: int, image_out: int,
) -> None:  # fmt: skip
    provider, ref = model
    tokens = TokenUsage.reported(
        input_tokens, output_tokens, cache_read=cached, cache_write=written, input_audio=audio_in,
        output_audio=audio_out, input_image=image_in, output_image=image_out,
    )  # fmt: skip
    found = calc_price(Usage(input_tokens=0, output_tokens=0), model_ref=ref, provider_id=provider)
    ours = charge(from_catalogue(found.model_price), tokens)
    theirs = calc_price(
        Usage(
            input_tokens=tokens.input_tokens, output_tokens=tokens.output_tokens,
            cache_read_tokens=tokens.cached_input_tokens, cache_write_tokens=tokens.cache_creation_input_tokens,
            input_audio_tokens=tokens.input_audio_tokens, output_audio_tokens=tokens.output_audio_tokens,
            input_image_tokens=tokens.input_image_tokens, output_image_tokens=tokens.output_image_tokens,
            # Our parts are disjoint: cached tokens are not also audio or image tokens.
            cache_audio_read_tokens=0, cache_image_read_tokens=0,
        ),
        model_ref=ref,
        provider_id=provider,
    )  # fmt: skip
    assert ours.total == theirs.total_price
    assert ours.input_cost == theirs.input_price and ours.output_cost == theirs.output_price


@given(
    st.integers(0, 10**9), st.integers(0, 10**9), st.integers(0, 10**10), st.integers(0, 10**10),
    st.integers(0, 10**10), st.integers(0, 10**10), st.integers(0, 10**10), st.integers(0, 10**10),
    st.integers(0, 10**10),
)  # fmt: skip
def test_a_reported_usage_keeps_every_part_inside_its_total(
    input_tokens: int, output_tokens: int, cached: int, written: int, audio: int, image: int, reasoning: int,
    audio_out: int, image_out: int,
) -> None:  # fmt: skip
    usage = TokenUsage.reported(
        input_tokens, output_tokens, cache_read=cached, cache_write=written, input_audio=audio, input_image=image,
        reasoning=reasoning, output_audio=audio_out, output_image=image_out,
    )  # fmt: skip
    parts = usage.by_kind()
    assert all(n > 0 for n in parts.values())
    assert sum(n for k, n in parts.items() if k == "input" or PARENT.get(k) == "input") == input_tokens
    assert sum(n for k, n in parts.items() if k == "output" or PARENT.get(k) == "output") == output_tokens


def test_the_hold_covers_the_dearest_kind_and_the_tier_it_may_reach() -> None:
    price = Price(
        input_cost_per_token=Decimal("0.000003"), output_cost_per_token=Decimal("0.000015"),
        kinds={"cache_write": Decimal("0.00000375"), "reasoning": Decimal("0.00002")},
        tiers=(PriceTier(above=200_000, unit_prices={"input": Decimal("0.000006")}),),
        source="config",
    )  # fmt: skip
    small = WorstCase(input_tokens=1000, output_tokens=100, assumed=())
    assert worst_case_cost(price, small) == cost_of(1000, Decimal("0.00000375")) + cost_of(100, Decimal("0.00002"))
    large = WorstCase(input_tokens=300_000, output_tokens=100, assumed=())
    assert worst_case_cost(price, large) == cost_of(300_000, Decimal("0.000006")) + cost_of(100, Decimal("0.00002"))
    # Whatever the usage within the worst case, its charge is at most the hold.
    for usage in (
        TokenUsage.reported(1000, 100, cache_write=1000, reasoning=100),
        TokenUsage.reported(1000, 100, cache_read=1000),
    ):
        assert charge(price, usage).total <= worst_case_cost(price, small)


def test_a_bad_price_key_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="cache_read_input_token_cost"):
        config_deployment("openai/fake", input_cost_per_token="0.1", output_cost_per_token="0.1",
                          cache_read_input_token_cost="-1")  # fmt: skip
