"""`ledger.pricing`: config prices beat the catalogue, halves combine, unknown models cost 0; every
kind of token priced (cache reads and writes, audio, reasoning), tiers past their threshold, to the
last digit and as genai-prices' own calculation prices the catalogue's models."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from spendledger.ledger.config import Deployment
from spendledger.ledger.money import ZERO
from spendledger.ledger.pricing import UNPRICED, Price, PriceBook, catalogue_price, charge, price_for
from spendledger.ledger.tokens import TokenUsage

# genai-prices: gpt-4o-mini is $0.15 / $0.60 per million tokens.
MINI_IN = Decimal("0.15") / Decimal(1_000_000)
MINI_OUT = Decimal("0.6") / Decimal(1_000_000)


def deployment(upstream_model: str = "gpt-4o-mini", provider: str = "openai", **fields: Any) -> Deployment:
    values: dict[str, Any] = {
        "model_name": "group",
        "deployment_id": f"{provider}/{upstream_model}/{sorted(fields.items())}",
        "provider": provider,
        "upstream_model": upstream_model,
        "api_base": None if provider == "mock" else "https://u/v1",
    }
    values.update(fields)
    return Deployment(**values)


def usage(input_tokens: int, output_tokens: int, **kinds: int) -> TokenUsage:
    return TokenUsage.reported(input_tokens, output_tokens, **kinds)


def test_catalogue_price_for_gpt_4o_mini_is_per_million_over_a_million() -> None:
    price = catalogue_price(deployment())
    assert price is not None
    assert price.source == "genai-prices"
    assert price.input_cost_per_token == Decimal("0.00000015") == MINI_IN
    assert price.output_cost_per_token == Decimal("0.0000006") == MINI_OUT
    assert type(price.input_cost_per_token) is Decimal
    assert price.input_cost_per_token != Decimal(0.15 / 1e6)  # the float path, for contrast


@pytest.mark.parametrize("provider", ["hosted_vllm", "openai_like", "custom_openai"])
def test_openai_compatible_providers_use_the_openai_catalogue(provider: str) -> None:
    assert catalogue_price(deployment(provider=provider)) == catalogue_price(deployment())


def test_catalogue_does_not_know_an_invented_model() -> None:
    assert catalogue_price(deployment("no-such-model-7f3a9")) is None


def test_catalogue_price_is_used_without_config() -> None:
    price = price_for(deployment())
    assert price is not None
    assert (price.input_cost_per_token, price.output_cost_per_token) == (MINI_IN, MINI_OUT)
    assert price.kinds == {"cache_read": Decimal("0.000000075")}  # $0.075 per million cached
    assert price.source == "genai-prices"


def test_model_info_override_beats_catalogue() -> None:
    price = price_for(
        deployment(input_cost_per_token=Decimal("0.0000015"), output_cost_per_token=Decimal("0.000002"))
    )
    assert price == Price(
        input_cost_per_token=Decimal("0.0000015"), output_cost_per_token=Decimal("0.000002"), source="config"
    )


def test_zero_override_beats_catalogue() -> None:
    price = price_for(deployment(input_cost_per_token=ZERO, output_cost_per_token=ZERO))
    assert price is not None
    assert price.input_cost_per_token == ZERO and price.output_cost_per_token == ZERO
    assert price.source == "config"


def test_input_half_from_config_output_half_from_catalogue() -> None:
    price = price_for(deployment(input_cost_per_token=Decimal("0.000001")))
    assert price is not None and price.source == "config"
    assert (price.input_cost_per_token, price.output_cost_per_token) == (Decimal("0.000001"), MINI_OUT)


def test_output_half_from_config_input_half_from_catalogue() -> None:
    price = price_for(deployment(output_cost_per_token=Decimal("0.000003")))
    assert price is not None and price.source == "config"
    assert (price.input_cost_per_token, price.output_cost_per_token) == (MINI_IN, Decimal("0.000003"))


def test_zero_half_from_config_is_kept_not_replaced_by_catalogue() -> None:
    price = price_for(deployment(input_cost_per_token=ZERO))
    assert price is not None
    assert price.input_cost_per_token == ZERO
    assert price.output_cost_per_token == MINI_OUT


def test_half_from_config_for_an_unknown_model_leaves_the_other_half_zero() -> None:
    price = price_for(deployment("no-such-model-7f3a9", input_cost_per_token=Decimal("0.000001")))
    assert price == Price(
        input_cost_per_token=Decimal("0.000001"), output_cost_per_token=ZERO, source="config"
    )


def test_unknown_model_has_no_price_and_costs_zero_unpriced() -> None:
    price = price_for(deployment("no-such-model-7f3a9"))
    assert price is None
    cost = charge(price, usage(1000, 500))
    assert cost == UNPRICED
    assert cost.total == ZERO and cost.input_cost == ZERO and cost.output_cost == ZERO
    assert cost.priced is False


def test_mock_provider_is_never_looked_up_in_the_catalogue() -> None:
    assert price_for(deployment("gpt-4o-mini", provider="mock")) is None


def test_charge_is_exact() -> None:
    price = Price(
        input_cost_per_token=Decimal("0.0000015"), output_cost_per_token=Decimal("0.000002"), source="config"
    )
    cost = charge(price, usage(1234, 567))
    assert cost.costs == {"input": Decimal("0.0018510"), "output": Decimal("0.001134")}
    assert cost.unit_prices == {"input": Decimal("0.0000015"), "output": Decimal("0.000002")}
    assert (cost.input_cost, cost.output_cost, cost.total) == (
        Decimal("0.0018510"), Decimal("0.001134"), Decimal("0.0029850"),
    )  # fmt: skip
    assert cost.priced is True
    assert charge(price, usage(0, 0)).total == ZERO
    assert charge(price, usage(0, 0)).priced is True


def test_charge_with_catalogue_price() -> None:
    cost = charge(price_for(deployment()), usage(1_000_000, 1_000_000))
    assert cost.input_cost == Decimal("0.15")
    assert cost.output_cost == Decimal("0.6")
    assert cost.total == Decimal("0.75")


def test_price_book_resolves_every_deployment_once() -> None:
    priced = deployment(input_cost_per_token=Decimal("0.1"), output_cost_per_token=Decimal("0.2"))
    catalogued = deployment()
    unknown = deployment("no-such-model-7f3a9")
    book = PriceBook((priced, catalogued, unknown))
    assert book.price(priced.deployment_id) == price_for(priced)
    assert book.price(catalogued.deployment_id) == price_for(catalogued)
    assert book.price(unknown.deployment_id) is None
    assert book.price("never-configured") is None
    assert book.unpriced() == [unknown.deployment_id]


def test_a_model_named_as_litellm_names_it_is_found_in_the_catalogue() -> None:
    from spendledger.ledger.pricing import catalogue_model_price

    bare = catalogue_model_price("gpt-4o-mini")
    prefixed = catalogue_model_price("openai/gpt-4o-mini")
    assert bare is not None and prefixed is not None
    assert (bare.provider, bare.model) == (prefixed.provider, prefixed.model) == ("openai", "gpt-4o-mini")
    assert bare.price.input_cost_per_token == Decimal("0.00000015")
    claude = catalogue_model_price("anthropic/claude-3-5-sonnet-20241022")
    assert claude is not None and claude.provider == "anthropic"
    assert catalogue_model_price("no-such-model") is None
    assert catalogue_model_price("no-such-provider/no-such-model") is None
