"""The cost of a usage: tokens × per-token price, from `model_info` overrides or `genai-prices`.

Prices are resolved once per deployment at start-up (a `PriceBook`), so the hot path multiplies two
Decimals and adds them. Events carry the prices they were charged at: a replay never re-prices.
The same catalogue entry gives the model's limits (its context window), which bound the hold.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Final

import msgspec
from genai_prices import Usage, calc_price
from genai_prices.types import PriceCalculation

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


class ModelLimits(msgspec.Struct, frozen=True, kw_only=True):
    """What a model accepts: its context window and its longest answer, where known."""

    max_input_tokens: int | None = None
    max_output_tokens: int | None = None


def _catalogue_entry(provider: str, model: str) -> PriceCalculation | None:
    provider_id = "openai" if provider in OPENAI_COMPATIBLE else provider
    try:
        return calc_price(Usage(input_tokens=0, output_tokens=0), model_ref=model, provider_id=provider_id)
    except LookupError:
        return None


def catalogue_price(provider: str, model: str) -> Price | None:
    """Per-token price from the genai-prices catalogue, or None if it does not know the model."""
    found = _catalogue_entry(provider, model)
    if found is None:
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


def limits_for(deployment: Deployment) -> ModelLimits:
    """`model_info` limits win; else the catalogue's context window, which bounds the input and
    (as input and output share it) the output too; else unknown."""
    window = None
    if deployment.provider != "mock" and (
        deployment.max_input_tokens is None or deployment.max_output_tokens is None
    ):
        found = _catalogue_entry(deployment.provider, deployment.upstream_model)
        window = found.model.context_window if found is not None else None
    return ModelLimits(
        max_input_tokens=deployment.max_input_tokens or window,
        max_output_tokens=deployment.max_output_tokens or window,
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
        self._limits = {d.deployment_id: limits_for(d) for d in deployments}

    def price(self, deployment_id: str) -> Price | None:
        return self._prices.get(deployment_id)

    def limits(self, deployment_id: str) -> ModelLimits:
        return self._limits.get(deployment_id, ModelLimits())

    def unpriced(self) -> list[str]:
        return [deployment_id for deployment_id, price in self._prices.items() if price is None]
