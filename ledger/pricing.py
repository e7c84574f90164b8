"""The cost of a usage: tokens × per-token price, from `model_info` overrides or `genai-prices`.

Prices are resolved once per deployment at start-up (a `PriceBook`), so the hot path multiplies two
Decimals and adds them. Events carry the prices they were charged at: a replay never re-prices.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Final

import msgspec
from genai_prices import Usage, calc_price

from ledger.config import OPENAI_COMPATIBLE, Deployment
from ledger.money import MONEY_CONTEXT, ZERO, add, cost_of

_PER_MILLION: Final = Decimal(1_000_000)


class Price(msgspec.Struct, frozen=True, kw_only=True):
    input_cost_per_token: Decimal
    output_cost_per_token: Decimal
    source: str  # "config" (model_info) or "genai-prices"


class Cost(msgspec.Struct, frozen=True, kw_only=True):
    input_cost: Decimal
    output_cost: Decimal
    total: Decimal
    priced: bool


UNPRICED_COST: Final = Cost(input_cost=ZERO, output_cost=ZERO, total=ZERO, priced=False)


def catalogue_price(provider: str, model: str) -> Price | None:
    """Per-token price from the genai-prices catalogue, or None if it does not know the model."""
    provider_id = "openai" if provider in OPENAI_COMPATIBLE else provider
    try:
        found = calc_price(Usage(input_tokens=0, output_tokens=0), model_ref=model, provider_id=provider_id)
    except LookupError:
        return None
    input_mtok = found.model_price.input_mtok
    output_mtok = found.model_price.output_mtok
    if output_mtok is None:  # input-only models (embeddings) have no output price: it is 0
        output_mtok = ZERO
    if not isinstance(input_mtok, Decimal) or not isinstance(output_mtok, Decimal):
        return None  # tiered prices: not representable per token; configure model_info instead
    return Price(
        input_cost_per_token=MONEY_CONTEXT.divide(input_mtok, _PER_MILLION),
        output_cost_per_token=MONEY_CONTEXT.divide(output_mtok, _PER_MILLION),
        source="genai-prices",
    )


def price_for(deployment: Deployment) -> Price | None:
    """`model_info` prices win; a missing half of them is taken from the catalogue, else 0."""
    configured_in = deployment.input_cost_per_token
    configured_out = deployment.output_cost_per_token
    if configured_in is not None and configured_out is not None:
        return Price(
            input_cost_per_token=configured_in, output_cost_per_token=configured_out, source="config"
        )
    if deployment.provider == "mock":
        catalogue = None
    else:
        catalogue = catalogue_price(deployment.provider, deployment.upstream_model)
    if catalogue is None:
        if configured_in is None and configured_out is None:
            return None
        return Price(
            input_cost_per_token=configured_in or ZERO,
            output_cost_per_token=configured_out or ZERO,
            source="config",
        )
    if configured_in is None and configured_out is None:
        return catalogue
    return Price(
        input_cost_per_token=configured_in if configured_in is not None else catalogue.input_cost_per_token,
        output_cost_per_token=configured_out
        if configured_out is not None
        else catalogue.output_cost_per_token,
        source="config",
    )


def cost_of_usage(price: Price | None, input_tokens: int, output_tokens: int) -> Cost:
    if price is None:
        return UNPRICED_COST
    input_cost = cost_of(input_tokens, price.input_cost_per_token)
    output_cost = cost_of(output_tokens, price.output_cost_per_token)
    return Cost(
        input_cost=input_cost, output_cost=output_cost, total=add(input_cost, output_cost), priced=True
    )


class PriceBook:
    """Prices of every deployment, resolved once."""

    def __init__(self, deployments: tuple[Deployment, ...]) -> None:
        self._prices = {d.deployment_id: price_for(d) for d in deployments}

    def price(self, deployment_id: str) -> Price | None:
        return self._prices.get(deployment_id)

    def unpriced(self) -> list[str]:
        return [deployment_id for deployment_id, price in self._prices.items() if price is None]
