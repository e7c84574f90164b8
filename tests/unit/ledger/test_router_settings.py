"""LiteLLM's router settings as spendledger reads them (ledger/router_settings.py)."""

from __future__ import annotations

from typing import Any

import pytest

from spendledger.ledger.config import parse_settings
from spendledger.ledger.config_values import ConfigError


def config(router: dict[str, Any] | None = None, litellm: dict[str, Any] | None = None, **params: Any) -> dict[str, Any]:
    def entry(name: str, model: str, **extra: Any) -> dict[str, Any]:
        return {"model_name": name, "litellm_params": {"model": model, "api_base": "https://u/v1", **extra}}

    raw: dict[str, Any] = {"model_list": [entry("a", "openai/a", **params), entry("b", "openai/b"), entry("c", "openai/c")]}
    if router is not None:
        raw["router_settings"] = router
    if litellm is not None:
        raw["litellm_settings"] = litellm
    return raw


def test_defaults_are_litellms_but_retries() -> None:
    settings = parse_settings(config(), {})
    router = settings.router
    assert (router.allowed_fails, router.cooldown_time_s, router.max_fallbacks) == (3, 5.0, 5)
    assert router.num_retries == 0 and router.routing_strategy == "simple-shuffle"
    assert settings.deployments[0].timeout_s == 600.0 and settings.deployments[0].stream_timeout_s is None


def test_router_settings_win_over_litellm_settings() -> None:
    router = parse_settings(
        config({"num_retries": 4, "fallbacks": [{"a": ["b"]}]}, {"num_retries": 1, "fallbacks": [{"a": ["c"]}]}), {}
    ).router
    assert router.num_retries == 4 and router.fallbacks_for("a") == ("b",)
    from_litellm = parse_settings(config(None, {"num_retries": 1, "allowed_fails": 7}), {}).router
    assert (from_litellm.num_retries, from_litellm.allowed_fails) == (1, 7)


def test_fallbacks_in_order_and_context_window_ones_first_for_a_context_window_error() -> None:
    router = parse_settings(
        config({"fallbacks": [{"a": ["c", "b", "a"]}], "context_window_fallbacks": [{"a": ["b"]}]}), {}
    ).router
    assert router.fallbacks_for("a") == ("c", "b")  # a group never falls back to itself
    assert router.fallbacks_for("a", context_window=True) == ("b",)
    assert router.fallbacks_for("b") == () and router.fallbacks_for("b", context_window=True) == ()


def test_timeouts_per_deployment_over_the_routers_over_request_timeout() -> None:
    settings = parse_settings(config({"timeout": 30, "stream_timeout": 5}, {"request_timeout": 90}, timeout=12), {})
    a, b, _ = settings.deployments
    assert (a.timeout_s, a.stream_timeout_s) == (12.0, 5.0)
    assert (b.timeout_s, b.stream_timeout_s) == (30.0, 5.0)
    assert parse_settings(config(None, {"request_timeout": 90}), {}).deployments[1].timeout_s == 90.0


def test_strategy_names_as_litellm_spells_them() -> None:
    assert parse_settings(config({"routing_strategy": "usage-based-routing-v2"}), {}).router.routing_strategy == (
        "usage-based-routing"
    )
    with pytest.raises(ConfigError, match="latency-based-routing' is not supported"):
        parse_settings(config({"routing_strategy": "latency-based-routing"}), {})


@pytest.mark.parametrize(
    ("fallbacks", "message"),
    [
        ([{"a": ["nope"]}], "names model group 'nope'"),
        ([{"nope": ["a"]}], "names model group 'nope'"),
        ({"a": ["b"]}, "must be a list of mappings"),
        ([["a", "b"]], "must be a list of mappings"),
    ],
)
def test_a_bad_fallback_stops_start_up_in_one_line(fallbacks: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        parse_settings(config({"fallbacks": fallbacks}), {})
    assert "\n" not in str(raised.value) and "router_settings.fallbacks" in str(raised.value)


def test_deployment_router_params_are_read() -> None:
    a = parse_settings(config(rpm=10, tpm=1000, weight=3, max_retries=2, stream_timeout=7), {}).deployments[0]
    assert (a.rpm, a.tpm, a.weight, a.max_retries, a.stream_timeout_s) == (10, 1000, 3, 2, 7.0)
