"""The worst case of a request shape, case by case (the property test is tests/adversarial/)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from spendledger.ledger.config import Deployment
from spendledger.ledger.holds import (
    DEFAULT_MEDIA_TOKENS,
    DEFAULT_OUTPUT_CAP,
    RequestShape,
    WorstCase,
    worst_case_cost,
    worst_case_tokens,
)
from spendledger.ledger.pricing import ModelLimits, Price, limits_for

UNKNOWN = ModelLimits()
GPT = ModelLimits(max_input_tokens=128_000, max_output_tokens=16_384)


def test_text_is_bounded_by_its_bytes_and_the_output_by_max_tokens() -> None:
    worst = worst_case_tokens(RequestShape(text_tokens=300, output_cap=16), UNKNOWN)
    assert worst == WorstCase(input_tokens=300, output_tokens=16)


def test_every_choice_and_every_prompt_is_billed() -> None:
    chat = worst_case_tokens(RequestShape(text_tokens=100, completions=128, output_cap=10), UNKNOWN)
    assert chat.output_tokens == 1280
    completions = worst_case_tokens(RequestShape(text_tokens=100, prompts=50, completions=3, output_cap=10), UNKNOWN)
    assert completions.output_tokens == 1500


def test_media_parts_are_bounded_by_the_context_window() -> None:
    known = worst_case_tokens(RequestShape(text_tokens=500, media_parts=20, output_cap=1), GPT)
    assert known.input_tokens == 128_000 and known.assumed == ()  # 20 parts, but one context window
    unknown = worst_case_tokens(RequestShape(text_tokens=500, media_parts=2, output_cap=1), UNKNOWN)
    assert unknown.input_tokens == 500 + 2 * DEFAULT_MEDIA_TOKENS and unknown.assumed == ("media",)


def test_a_prompt_list_may_fill_one_window_per_prompt() -> None:
    shape = RequestShape(text_tokens=10**6, prompts=3, output_cap=1)
    assert worst_case_tokens(shape, GPT).input_tokens == 3 * 128_000


def test_without_max_tokens_the_models_output_limit_or_the_assumed_default() -> None:
    assert worst_case_tokens(RequestShape(text_tokens=10), GPT).output_tokens == 16_384
    unknown = worst_case_tokens(RequestShape(text_tokens=10), UNKNOWN)
    assert unknown.output_tokens == DEFAULT_OUTPUT_CAP and unknown.assumed == ("output",)


def test_max_tokens_above_the_models_limit_is_cut_to_it() -> None:
    assert worst_case_tokens(RequestShape(text_tokens=10, output_cap=10**9), GPT).output_tokens == 16_384


def test_embeddings_generate_nothing_and_take_no_context_cap() -> None:
    worst = worst_case_tokens(RequestShape(text_tokens=10**6, generates=False, bounded_by_context=False), GPT)
    assert worst == WorstCase(input_tokens=10**6, output_tokens=0)


def test_the_cost_of_the_worst_case() -> None:
    price = Price(input_cost_per_token=Decimal("0.0000015"), output_cost_per_token=Decimal("0.000002"), source="x")
    assert worst_case_cost(price, WorstCase(input_tokens=100, output_tokens=16)) == Decimal("0.000182")
    assert worst_case_cost(None, WorstCase(input_tokens=100, output_tokens=16)) == 0


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        ({}, ModelLimits(max_input_tokens=128_000, max_output_tokens=128_000)),  # the catalogue's window
        ({"max_output_tokens": 16_384}, ModelLimits(max_input_tokens=128_000, max_output_tokens=16_384)),
        ({"max_input_tokens": 1000, "max_output_tokens": 10}, ModelLimits(max_input_tokens=1000, max_output_tokens=10)),
    ],
)
def test_limits_come_from_model_info_else_the_catalogue(info: dict[str, int], expected: ModelLimits) -> None:
    deployment = Deployment(
        model_name="m", deployment_id="d", provider="openai", upstream_model="gpt-4o-mini", api_base="http://x", **info
    )
    assert limits_for(deployment) == expected


def test_a_model_nobody_knows_has_no_limits() -> None:
    deployment = Deployment(model_name="m", deployment_id="d", provider="openai", upstream_model="fake", api_base="x")
    assert limits_for(deployment) == UNKNOWN
