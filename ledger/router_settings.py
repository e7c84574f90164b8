"""LiteLLM's router settings → `RouterSettings`: retries, fallbacks, cooldowns, timeouts, strategy.

Read as LiteLLM's Router reads them: `router_settings` first, then `litellm_settings` (where LiteLLM
sets the `litellm.*` module defaults the Router falls back to), then LiteLLM's defaults — except
`num_retries`, whose default here is 0, not LiteLLM's 2 (openai's DEFAULT_MAX_RETRIES): a retry is
a second call a provider may bill, and an operator asks for it (README, "Router settings").

`fallbacks` and `context_window_fallbacks` take LiteLLM's shape, a list of one-key mappings
(`[{"gpt-4o": ["gpt-4o-mini", "claude"]}]`); each group they name must be a `model_name` of the
config, or start-up stops naming it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Literal, TypeAlias

import msgspec

from spendledger.ledger.config_values import ConfigError, flag, optional_int, positive_float

RoutingStrategy: TypeAlias = Literal["simple-shuffle", "least-busy", "usage-based-routing"]
# LiteLLM's names of the strategies honoured, by the strategy each means here.
_STRATEGIES: Final[dict[str, RoutingStrategy]] = {
    "simple-shuffle": "simple-shuffle",
    "least-busy": "least-busy",
    "usage-based-routing": "usage-based-routing",
    "usage-based-routing-v2": "usage-based-routing",
}
DEFAULT_ALLOWED_FAILS: Final = 3  # litellm.allowed_fails
DEFAULT_COOLDOWN_TIME_S: Final = 5.0  # LiteLLM's DEFAULT_COOLDOWN_TIME_SECONDS
DEFAULT_MAX_FALLBACKS: Final = 5  # LiteLLM's ROUTER_MAX_FALLBACKS
DEFAULT_TIMEOUT_S: Final = 600.0  # litellm.request_timeout

# The keys of router_settings read here (the rest are reported as unknown).
ROUTER_KEYS: Final = frozenset(
    {
        "num_retries",
        "fallbacks",
        "context_window_fallbacks",
        "allowed_fails",
        "cooldown_time",
        "disable_cooldowns",
        "routing_strategy",
        "timeout",
        "stream_timeout",
        "max_fallbacks",
    }
)
# The router's keys LiteLLM also reads from litellm_settings (the `litellm.*` defaults).
LITELLM_KEYS: Final = frozenset({"num_retries", "fallbacks", "context_window_fallbacks", "allowed_fails"})

Fallbacks: TypeAlias = tuple[tuple[str, tuple[str, ...]], ...]


class RouterSettings(msgspec.Struct, frozen=True, kw_only=True):
    num_retries: int = 0
    fallbacks: Fallbacks = ()
    context_window_fallbacks: Fallbacks = ()
    max_fallbacks: int = DEFAULT_MAX_FALLBACKS
    allowed_fails: int = DEFAULT_ALLOWED_FAILS
    cooldown_time_s: float = DEFAULT_COOLDOWN_TIME_S
    disable_cooldowns: bool = False
    routing_strategy: RoutingStrategy = "simple-shuffle"
    timeout_s: float = DEFAULT_TIMEOUT_S  # a deployment's, unless it sets its own
    stream_timeout_s: float | None = None  # a streaming request's, unless the deployment sets one

    def fallbacks_for(self, group: str, context_window: bool = False) -> tuple[str, ...]:
        """The groups to fall back to from `group`, in order (for a context-window error, the
        context-window fallbacks if any are set for it, else the plain ones, as LiteLLM)."""
        if context_window:
            found = _lookup(self.context_window_fallbacks, group)
            if found:
                return found[: self.max_fallbacks]
        return _lookup(self.fallbacks, group)[: self.max_fallbacks]


DEFAULT_ROUTER_SETTINGS: Final = RouterSettings()


def _lookup(fallbacks: Fallbacks, group: str) -> tuple[str, ...]:
    return next((targets for source, targets in fallbacks if source == group), ())


def parse_router_settings(
    router: Mapping[str, Any], litellm: Mapping[str, Any], model_names: tuple[str, ...], source: str
) -> RouterSettings:
    """`router_settings` over `litellm_settings`, checked against the config's model groups."""

    def pick(key: str) -> tuple[Any, str]:
        if router.get(key) is not None:
            return router[key], f"router_settings.{key}"
        if key in LITELLM_KEYS and litellm.get(key) is not None:
            return litellm[key], f"litellm_settings.{key}"
        return None, key

    def count(key: str, default: int) -> int:
        value, name = pick(key)
        number = optional_int(value, f"{source}: {name}")
        return default if number is None else number

    strategy_text, strategy_name = pick("routing_strategy")
    strategy: RoutingStrategy = "simple-shuffle"
    if strategy_text is not None:
        if strategy_text not in _STRATEGIES:
            raise ConfigError(
                f"{source}: {strategy_name} {str(strategy_text)[:60]!r} is not supported; use one of "
                f"{', '.join(_STRATEGIES)}"
            )
        strategy = _STRATEGIES[strategy_text]
    timeout, timeout_name = pick("timeout")
    if timeout is None and litellm.get("request_timeout") is not None:
        timeout, timeout_name = litellm["request_timeout"], "litellm_settings.request_timeout"
    stream_timeout, stream_timeout_name = pick("stream_timeout")
    cooldown, cooldown_name = pick("cooldown_time")
    disable, disable_name = pick("disable_cooldowns")
    fallbacks, fallbacks_name = pick("fallbacks")
    window, window_name = pick("context_window_fallbacks")
    return RouterSettings(
        num_retries=count("num_retries", 0),
        fallbacks=_fallbacks(fallbacks, fallbacks_name, model_names, source),
        context_window_fallbacks=_fallbacks(window, window_name, model_names, source),
        max_fallbacks=count("max_fallbacks", DEFAULT_MAX_FALLBACKS),
        allowed_fails=count("allowed_fails", DEFAULT_ALLOWED_FAILS),
        cooldown_time_s=DEFAULT_COOLDOWN_TIME_S
        if cooldown is None
        else _non_negative_seconds(cooldown, cooldown_name, source),
        disable_cooldowns=False if disable is None else flag(disable, disable_name, source),
        routing_strategy=strategy,
        timeout_s=DEFAULT_TIMEOUT_S if timeout is None else positive_float(timeout, timeout_name, source),
        stream_timeout_s=None
        if stream_timeout is None
        else positive_float(stream_timeout, stream_timeout_name, source),
    )


def _non_negative_seconds(value: Any, name: str, source: str) -> float:
    if value == 0:
        return 0.0
    return positive_float(value, name, source)


def _fallbacks(value: Any, name: str, model_names: tuple[str, ...], source: str) -> Fallbacks:
    """LiteLLM's `[{"group": ["fallback", …]}, …]`: every group named must exist."""
    if value is None:
        return ()
    shape = f"{source}: {name} must be a list of mappings like [{{'gpt-4o': ['gpt-4o-mini']}}]"
    if not isinstance(value, list):
        raise ConfigError(shape)
    known = set(model_names)
    parsed: list[tuple[str, tuple[str, ...]]] = []
    for entry in value:
        if not isinstance(entry, dict):
            raise ConfigError(shape)
        for group, targets in entry.items():
            if isinstance(targets, str):
                targets = [targets]
            if not isinstance(group, str) or not isinstance(targets, list) or not all(
                isinstance(t, str) for t in targets
            ):
                raise ConfigError(shape)
            for named in (group, *targets):
                if named not in known:
                    raise ConfigError(
                        f"{source}: {name} names model group {named[:60]!r}, which is not a model_name "
                        "of model_list"
                    )
            parsed.append((group, tuple(t for t in dict.fromkeys(targets) if t != group)))
    return tuple(parsed)
