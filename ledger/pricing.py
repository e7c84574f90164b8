"""The cost of a usage: each kind of token (ledger/tokens.py) × its price, exactly.

Prices come from the deployment's `model_info` (LiteLLM's keys, ledger/config.py: `PRICE_KEYS`)
or from the `genai-prices` catalogue for the deployment's provider (resolved from its `api_base`
first, so an `openai/` deployment on OpenRouter's URL is looked up as OpenRouter, then from its
prefix). Both become one `Price`: a per-token price for input and output, the kinds priced apart
(prompt-cache reads and writes, audio, reasoning) and tiers — prices that apply to every token of a
request whose input passes a threshold, the cliff providers bill. A kind without a price of its own
is billed at its parent's (tokens.PARENT), as providers and LiteLLM do; audio and image tokens
without one are billed so too but named as unpriced (their real price is usually far higher).

Prices are resolved once per deployment at start-up (a `PriceBook`). Events carry the unit prices
and the cost of each kind they were charged: a replay never re-prices. The same catalogue entry
gives the model's limits (its context window), which bound the hold.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from decimal import Decimal
from typing import Final

import msgspec
from genai_prices import Usage, calc_price
from genai_prices.types import ModelPrice, PriceCalculation, TieredPrices

from spendledger.ledger.config import PRICE_KEYS, Deployment, tier_of_price_key
from spendledger.ledger.money import MONEY_CONTEXT, ZERO, add, cost_of
from spendledger.ledger.providers import catalogue_model_ref, provider_spec
from spendledger.ledger.tokens import KINDS, PARENT, TokenKind, TokenUsage

_PER_MILLION: Final = Decimal(1_000_000)
# The catalogue's per-million prices of the kinds we bill (others — per request, per search — are
# not token prices; see docs/ledger.md).
_CATALOGUE_KINDS: Final[dict[str, TokenKind]] = {
    "input_mtok": "input",
    "output_mtok": "output",
    "cache_read_mtok": "cache_read",
    "cache_write_mtok": "cache_write",
    "input_audio_mtok": "input_audio",
    "output_audio_mtok": "output_audio",
    "input_image_mtok": "input_image",
    "output_image_mtok": "output_image",
    "output_reasoning_mtok": "reasoning",
}
_INPUT_SIDE: Final = frozenset(k for k in KINDS if k == "input" or PARENT.get(k) == "input")
_NAMED_WHEN_UNPRICED: Final[frozenset[TokenKind]] = frozenset(
    {"input_audio", "output_audio", "input_image", "output_image"}
)


class PriceTier(msgspec.Struct, frozen=True, kw_only=True):
    """Per-token prices that replace the base ones for every token of a request whose input
    tokens are more than `above`."""

    above: int
    unit_prices: dict[TokenKind, Decimal]


class Price(msgspec.Struct, frozen=True, kw_only=True):
    input_cost_per_token: Decimal
    output_cost_per_token: Decimal
    # The kinds priced apart from their parent (tokens.PARENT), per token.
    kinds: dict[TokenKind, Decimal] = {}
    tiers: tuple[PriceTier, ...] = ()  # ascending by `above`
    source: str  # "config" (model_info) or "genai-prices"

    def unit_prices(self, input_tokens: int) -> tuple[dict[TokenKind, Decimal], frozenset[TokenKind]]:
        """Every kind's per-token price for a request of `input_tokens` input tokens, and the kinds
        priced only by their parent's price."""
        own: dict[TokenKind, Decimal] = {
            "input": self.input_cost_per_token, "output": self.output_cost_per_token, **self.kinds,
        }  # fmt: skip
        for tier in self.tiers:
            if input_tokens > tier.above:
                own.update(tier.unit_prices)
        resolved: dict[TokenKind, Decimal] = {}
        borrowed: set[TokenKind] = set()
        for kind in KINDS:
            if kind in own:
                resolved[kind] = own[kind]
            else:
                resolved[kind] = resolved[PARENT[kind]]
                borrowed.add(kind)
        return resolved, frozenset(borrowed)

    def most_per_token(self, input_tokens: int) -> tuple[Decimal, Decimal]:
        """The highest per-token price an input token and an output token can be charged in a
        request of at most `input_tokens` input tokens (what the hold multiplies)."""
        counts = [0, *(t.above + 1 for t in self.tiers if t.above < input_tokens)]
        most_in, most_out = ZERO, ZERO
        for count in counts:
            prices, _ = self.unit_prices(count)
            most_in = max(most_in, *(p for k, p in prices.items() if k in _INPUT_SIDE))
            most_out = max(most_out, *(p for k, p in prices.items() if k not in _INPUT_SIDE))
        return most_in, most_out


class Charge(msgspec.Struct, frozen=True, kw_only=True):
    """What a usage was charged: the per-token price and the cost of each kind it used."""

    unit_prices: dict[TokenKind, Decimal]
    costs: dict[TokenKind, Decimal]
    total: Decimal
    priced: bool
    unpriced_kinds: tuple[TokenKind, ...] = ()  # used, with no price of their own (audio, image)
    # The per-token input and output prices that applied (a tier's, past its threshold).
    input_cost_per_token: Decimal | None = None
    output_cost_per_token: Decimal | None = None

    @property
    def input_cost(self) -> Decimal:
        return _sum(c for k, c in self.costs.items() if k in _INPUT_SIDE)

    @property
    def output_cost(self) -> Decimal:
        return _sum(c for k, c in self.costs.items() if k not in _INPUT_SIDE)


UNPRICED: Final = Charge(unit_prices={}, costs={}, total=ZERO, priced=False)


class ModelLimits(msgspec.Struct, frozen=True, kw_only=True):
    """What a model accepts: its context window and its longest answer, where known."""

    max_input_tokens: int | None = None
    max_output_tokens: int | None = None


def _sum(values: Iterable[Decimal]) -> Decimal:
    total = ZERO
    for value in values:
        total = add(total, value)
    return total


def charge(price: Price | None, usage: TokenUsage) -> Charge:
    """The cost of `usage` at `price`, kind by kind (an unpriced model costs 0, `priced` false)."""
    if price is None:
        return UNPRICED
    prices, borrowed = price.unit_prices(usage.input_tokens)
    counts = usage.by_kind()
    costs = {kind: cost_of(n, prices[kind]) for kind, n in counts.items()}
    return Charge(
        unit_prices={kind: prices[kind] for kind in counts},
        costs=costs,
        total=_sum(costs.values()),
        priced=True,
        unpriced_kinds=tuple(k for k in counts if k in borrowed and k in _NAMED_WHEN_UNPRICED),
        input_cost_per_token=prices["input"],
        output_cost_per_token=prices["output"],
    )


def _per_token(per_million: Decimal) -> Decimal:
    return MONEY_CONTEXT.divide(per_million, _PER_MILLION)


def _catalogue_entry(deployment: Deployment) -> PriceCalculation | None:
    """The catalogue's model for a deployment: by its API's URL, else by its provider's catalogue id
    (ledger/providers.py); the model is `model_info.base_model` when given, else the upstream one."""
    empty = Usage(input_tokens=0, output_tokens=0)
    spec = provider_spec(deployment.provider)
    model = catalogue_model_ref(spec, deployment.upstream_model, deployment.base_model)
    if deployment.api_base:
        try:
            return calc_price(empty, model_ref=model, provider_api_url=deployment.api_base)
        except LookupError:
            pass
    if spec.catalogue is None:
        return None
    try:
        return calc_price(empty, model_ref=model, provider_id=spec.catalogue)
    except LookupError:
        return None


def from_catalogue(model_price: ModelPrice) -> Price | None:
    """A catalogue model's per-million prices (flat or tiered) as a per-token `Price`."""
    own: dict[TokenKind, Decimal] = {}
    tiers: dict[int, dict[TokenKind, Decimal]] = {}
    for key, kind in _CATALOGUE_KINDS.items():
        value = getattr(model_price, key, None)
        if isinstance(value, TieredPrices):
            own[kind] = _per_token(value.base)
            for tier in value.tiers:
                tiers.setdefault(tier.start, {})[kind] = _per_token(tier.price)
        elif isinstance(value, Decimal):
            own[kind] = _per_token(value)
    if "input" not in own:
        return None  # priced per request, per character or per image only: not a token model
    return Price(
        input_cost_per_token=own.pop("input"),
        output_cost_per_token=own.pop("output", ZERO),  # input-only models (embeddings)
        kinds=own,
        tiers=tuple(PriceTier(above=above, unit_prices=tiers[above]) for above in sorted(tiers)),
        source="genai-prices",
    )


def catalogue_price(deployment: Deployment) -> Price | None:
    """The deployment's model's prices from the genai-prices catalogue, or None if it does not
    know the model."""
    found = _catalogue_entry(deployment)
    return from_catalogue(found.model_price) if found is not None else None


class CataloguePrice(msgspec.Struct, frozen=True, kw_only=True):
    provider: str
    model: str
    price: Price


@functools.lru_cache(maxsize=1024)
def catalogue_model_price(model: str) -> CataloguePrice | None:
    """A model named as LiteLLM names it (`gpt-4o-mini`, `anthropic/claude-3-5-sonnet-20241022`)
    priced from the genai-prices catalogue, for usage of calls that did not come through a
    deployment of the config (POST /usage); None if the catalogue does not know it. A name that
    nobody will ever find is looked up once per process: the cache is bounded."""
    empty = Usage(input_tokens=0, output_tokens=0)
    provider, _, rest = model.partition("/")
    attempts: list[tuple[str, str | None]] = [(rest, provider)] if rest else []
    attempts.append((model, None))
    for model_ref, provider_id in attempts:
        try:
            found = calc_price(empty, model_ref=model_ref, provider_id=provider_id)
        except LookupError:
            continue
        price = from_catalogue(found.model_price)
        if price is not None:
            return CataloguePrice(provider=found.provider.id, model=found.model.id, price=price)
    return None


def _configured(deployment: Deployment) -> tuple[dict[TokenKind, Decimal], tuple[PriceTier, ...]]:
    own: dict[TokenKind, Decimal] = {}
    if deployment.input_cost_per_token is not None:
        own["input"] = deployment.input_cost_per_token
    if deployment.output_cost_per_token is not None:
        own["output"] = deployment.output_cost_per_token
    tiers: dict[int, dict[TokenKind, Decimal]] = {}
    for key, value in deployment.prices.items():
        tier = tier_of_price_key(key)
        if tier is None:
            own[PRICE_KEYS[key]] = value
        else:
            base_key, above = tier
            tiers.setdefault(above, {})[PRICE_KEYS[base_key]] = value
    return own, tuple(PriceTier(above=a, unit_prices=tiers[a]) for a in sorted(tiers))


def price_for(deployment: Deployment) -> Price | None:
    """`model_info` prices win kind by kind. With both an input and an output price configured the
    catalogue is not asked (LiteLLM's custom pricing: a kind not configured is billed at its
    parent's); with one half, the other half, the other kinds and the tiers the config does not
    set come from the catalogue; with neither, the catalogue's, else no price."""
    own, tiers = _configured(deployment)
    if "input" in own and "output" in own:
        return Price(
            input_cost_per_token=own.pop("input"), output_cost_per_token=own.pop("output"),
            kinds=own, tiers=tiers, source="config",
        )  # fmt: skip
    catalogue = None if deployment.provider == "mock" else catalogue_price(deployment)
    if catalogue is None:
        if not own:
            return None
        return Price(
            input_cost_per_token=own.pop("input", ZERO), output_cost_per_token=own.pop("output", ZERO),
            kinds=own, tiers=tiers, source="config",
        )  # fmt: skip
    if not own and not tiers:
        return catalogue
    merged_tiers = {t.above: dict(t.unit_prices) for t in catalogue.tiers}
    for tier in tiers:
        merged_tiers.setdefault(tier.above, {}).update(tier.unit_prices)
    return Price(
        input_cost_per_token=own.pop("input", catalogue.input_cost_per_token),
        output_cost_per_token=own.pop("output", catalogue.output_cost_per_token),
        kinds={**catalogue.kinds, **own},
        tiers=tuple(PriceTier(above=a, unit_prices=merged_tiers[a]) for a in sorted(merged_tiers)),
        source="config",
    )


def limits_for(deployment: Deployment) -> ModelLimits:
    """`model_info` limits win; else the catalogue's context window, which bounds the input and
    (as input and output share it) the output too; else unknown."""
    window = None
    if deployment.provider != "mock" and (
        deployment.max_input_tokens is None or deployment.max_output_tokens is None
    ):
        found = _catalogue_entry(deployment)
        window = found.model.context_window if found is not None else None
    return ModelLimits(
        max_input_tokens=deployment.max_input_tokens or window,
        max_output_tokens=deployment.max_output_tokens or window,
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
