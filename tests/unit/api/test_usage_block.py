"""The usage block of an upstream's answer, decoded into every kind of token (issue 18): OpenAI's
(and Azure's, OpenRouter's) details, LiteLLM's spelling of Anthropic's cache counts, and
Anthropic's own shape — and a hostile or buggy report kept inside its totals."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from spendledger.api.proxy import Usage
from spendledger.ledger.tokens import TokenUsage


def tokens(block: dict[str, Any]) -> TokenUsage:
    return msgspec.json.decode(msgspec.json.encode(block), type=Usage).tokens()


def test_openai_details() -> None:
    block = {
        "prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
        "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 192, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    }  # fmt: skip
    assert tokens(block) == TokenUsage(
        input_tokens=2006, output_tokens=300, cached_input_tokens=1920, reasoning_tokens=192
    )


def test_openai_audio_details() -> None:
    block = {
        "prompt_tokens": 100, "completion_tokens": 80,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 60},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 70},
    }  # fmt: skip
    assert tokens(block) == TokenUsage(input_tokens=100, output_tokens=80, input_audio_tokens=60, output_audio_tokens=70)


def test_image_details() -> None:
    block = {
        "prompt_tokens": 1300, "completion_tokens": 4200,
        "prompt_tokens_details": {"cached_tokens": 0, "image_tokens": 1000, "text_tokens": 300},
        "completion_tokens_details": {"image_tokens": 4160},
    }  # fmt: skip
    assert tokens(block) == TokenUsage(
        input_tokens=1300, output_tokens=4200, input_image_tokens=1000, output_image_tokens=4160
    )


def test_litellm_spelling_of_anthropic_cache_counts() -> None:
    # LiteLLM's OpenAI-shaped answer for Claude: prompt_tokens counts the cache's tokens too.
    block = {
        "prompt_tokens": 3500, "completion_tokens": 40, "total_tokens": 3540,
        "prompt_tokens_details": {"cached_tokens": 2000, "cache_creation_tokens": 1000},
        "cache_creation_input_tokens": 1000, "cache_read_input_tokens": 2000,
    }  # fmt: skip
    assert tokens(block) == TokenUsage(
        input_tokens=3500, output_tokens=40, cached_input_tokens=2000, cache_creation_input_tokens=1000
    )


def test_anthropic_shape_adds_the_cache_to_the_input() -> None:
    block = {"input_tokens": 500, "output_tokens": 40, "cache_creation_input_tokens": 1000,
             "cache_read_input_tokens": 2000}  # fmt: skip
    assert tokens(block) == TokenUsage(
        input_tokens=3500, output_tokens=40, cached_input_tokens=2000, cache_creation_input_tokens=1000
    )


def test_plain_and_null_details() -> None:
    assert tokens({"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}) == TokenUsage(
        input_tokens=9, output_tokens=3
    )
    block = {"prompt_tokens": 9, "completion_tokens": 3, "prompt_tokens_details": None,
             "completion_tokens_details": {"reasoning_tokens": None}}  # fmt: skip
    assert tokens(block) == TokenUsage(input_tokens=9, output_tokens=3)


def test_parts_larger_than_their_totals_are_cut_to_them() -> None:
    block = {
        "prompt_tokens": 100, "completion_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 5000, "audio_tokens": 50},
        "completion_tokens_details": {"reasoning_tokens": 99},
    }  # fmt: skip
    assert tokens(block) == TokenUsage(input_tokens=100, output_tokens=10, cached_input_tokens=100, reasoning_tokens=10)


@pytest.mark.parametrize(
    "block",
    [
        {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": -1}},
        {"prompt_tokens": 10, "completion_tokens_details": {"reasoning_tokens": "many"}},
        {"input_tokens": 10, "cache_read_input_tokens": -5},
    ],
)
def test_negative_or_mistyped_counts_are_refused(block: dict[str, Any]) -> None:
    with pytest.raises(msgspec.ValidationError):
        tokens(block)
