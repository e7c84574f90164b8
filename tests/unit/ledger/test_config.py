"""`ledger.config`: LiteLLM's config.yaml read unchanged into typed settings, refused with a message
that names the place when it cannot be served."""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from spendledger.ledger.config import ConfigError, Settings, _DecimalLoader, load_settings, parse_settings

CONTRACT_CONFIG = """
model_list:
  - model_name: fake-openai-endpoint
    litellm_params:
      model: openai/fake
      api_key: os.environ/OPENAI_API_KEY
      api_base: https://example.com/v1
      rpm: 600
    model_info:
      input_cost_per_token: 0.0000015
      output_cost_per_token: 0.000002
  - model_name: fake-openai-endpoint
    litellm_params:
      model: openai/fake-b
      api_key: os.environ/OPENAI_API_KEY_B
      api_base: https://other.example.com/v1/
      tpm: 100000
    model_info:
      id: deployment-b
      input_cost_per_token: 0.0000003
      output_cost_per_token: 0.0000012
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
      api_key: os.environ/OPENAI_API_KEY
litellm_settings:
  callbacks: ["lago"]
  success_callback: ["lago", "webhook"]
  max_end_user_budget_id: "my-default-tier"
  budget_duration: 30d
general_settings:
  master_key: os.environ/LITELLM_MASTER_KEY
  database_url: postgresql://user:pw@db/ledger
  alerting: ["webhook"]
  max_request_size_mb: 0.5
"""

ENV = {
    "OPENAI_API_KEY": "sk-upstream-a",
    "OPENAI_API_KEY_B": "sk-upstream-b",
    "LITELLM_MASTER_KEY": "sk-1234",
    "LAGO_API_BASE": "http://localhost:3000",
    "LAGO_API_KEY": "lago-key",
    "LAGO_API_EVENT_CODE": "openai_tokens",
    "WEBHOOK_URL": "http://localhost:9000/hook",
}
LAGO_ENV = {k: v for k, v in ENV.items() if k.startswith("LAGO_")}


def parse(text: str, environ: dict[str, str] | None = None) -> Settings:
    return parse_settings(yaml.load(text, Loader=_DecimalLoader), environ or {})


def minimal(**extra: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "model_list": [
            {"model_name": "m", "litellm_params": {"model": "openai/x", "api_base": "https://u/v1"}}
        ]
    }
    raw.update(extra)
    return raw


def unknown_key_warnings(settings: Settings) -> list[str]:
    return [w for w in settings.warnings if "unknown" in w]


# --- the contract's shape --------------------------------------------------------------------------


def test_contract_config_parses() -> None:
    settings = parse(CONTRACT_CONFIG, ENV)

    assert len(settings.deployments) == 3
    assert settings.model_names == ("fake-openai-endpoint", "gpt-4o-mini")
    group = [d for d in settings.deployments if d.model_name == "fake-openai-endpoint"]
    assert [d.upstream_model for d in group] == ["fake", "fake-b"]
    assert {d.provider for d in settings.deployments} == {"openai"}
    a, b, c = settings.deployments
    assert a.api_base == "https://example.com/v1"
    assert b.api_base == "https://other.example.com/v1"  # trailing slash dropped
    assert c.api_base == "https://api.openai.com/v1"  # the provider's default
    assert a.rpm == 600 and a.tpm is None
    assert b.tpm == 100000
    assert b.deployment_id == "deployment-b"
    assert len({d.deployment_id for d in settings.deployments}) == 3
    assert c.input_cost_per_token is None and c.output_cost_per_token is None

    assert settings.master_key == "sk-1234"
    assert settings.database_url == "postgresql://user:pw@db/ledger"
    assert settings.callbacks == ("lago", "webhook")
    assert settings.alerting == ("webhook",)
    assert settings.max_end_user_budget_id == "my-default-tier"
    assert settings.budget_duration == "30d"
    assert settings.max_request_size_mb == Decimal("0.5")
    assert settings.max_request_size_bytes == 512 * 1024
    # The contract's rpm / tpm per deployment are enforced (api/deployment_limits.py): no warning.
    assert settings.warnings == ()
    assert (settings.deployments[0].rpm, settings.deployments[0].tpm) == (600, None)
    assert (settings.deployments[1].rpm, settings.deployments[1].tpm) == (None, 100000)


def test_model_info_prices_are_exact_decimals() -> None:
    a, b, _ = parse(CONTRACT_CONFIG, ENV).deployments

    for value in (a.input_cost_per_token, a.output_cost_per_token, b.input_cost_per_token):
        assert type(value) is Decimal
    # Exactly what was typed: not Decimal(0.0000015) = 1.49999999999999993...e-06.
    assert a.input_cost_per_token == Decimal("0.0000015")
    assert str(a.input_cost_per_token) == "0.0000015"
    assert a.input_cost_per_token != Decimal.from_float(0.0000015)
    assert a.output_cost_per_token == Decimal("0.000002")
    assert b.input_cost_per_token == Decimal("0.0000003")
    assert b.output_cost_per_token == Decimal("0.0000012")


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("0.0000015", "0.0000015"),
        ("1.5e-6", "0.0000015"),
        ("2e-6", "0.000002"),
        ("'0.1'", "0.1"),
        ("0", "0"),
        ("3", "3"),
        ("0.30000000000000004", "0.30000000000000004"),
    ],
)
def test_price_forms_are_read_exactly(typed: str, expected: str) -> None:
    text = f"""
model_list:
  - model_name: m
    litellm_params: {{model: openai/x, api_base: "https://u/v1"}}
    model_info: {{input_cost_per_token: {typed}, output_cost_per_token: {typed}}}
"""
    (deployment,) = parse(text).deployments
    assert deployment.input_cost_per_token == Decimal(expected)
    assert deployment.output_cost_per_token == Decimal(expected)
    assert type(deployment.input_cost_per_token) is Decimal


def test_litellm_params_prices_are_read_when_model_info_has_none() -> None:
    text = """
model_list:
  - model_name: m
    litellm_params:
      model: openai/x
      api_base: https://u/v1
      input_cost_per_token: 0.0000011
      output_cost_per_token: 0.0000022
    model_info:
      output_cost_per_token: 0.0000033
"""
    (deployment,) = parse(text).deployments
    assert deployment.input_cost_per_token == Decimal("0.0000011")
    assert deployment.output_cost_per_token == Decimal("0.0000033")  # model_info wins


def test_environ_argument_resolves_os_environ_references() -> None:
    settings = parse(CONTRACT_CONFIG, ENV)
    assert [d.api_key for d in settings.deployments] == ["sk-upstream-a", "sk-upstream-b", "sk-upstream-a"]
    assert settings.master_key == "sk-1234"


def test_environ_argument_is_used_not_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "from-process")
    settings = parse(CONTRACT_CONFIG, {**ENV, "OPENAI_API_KEY": "from-argument"})
    assert settings.deployments[0].api_key == "from-argument"


def test_os_environ_resolves_in_prices_and_settings() -> None:
    text = """
model_list:
  - model_name: m
    litellm_params: {model: openai/x, api_base: os.environ/BASE}
    model_info: {input_cost_per_token: os.environ/PRICE_IN, output_cost_per_token: 0}
litellm_settings:
  max_end_user_budget_id: os.environ/TIER
"""
    settings = parse(text, {"BASE": "https://env/v1", "PRICE_IN": "0.0000015", "TIER": "gold"})
    (deployment,) = settings.deployments
    assert deployment.api_base == "https://env/v1"
    assert deployment.input_cost_per_token == Decimal("0.0000015")
    assert settings.max_end_user_budget_id == "gold"


def test_unset_environment_variable_is_none_with_a_warning_naming_it() -> None:
    settings = parse(CONTRACT_CONFIG, {"OPENAI_API_KEY": "k", "OPENAI_API_KEY_B": "k", **LAGO_ENV, "WEBHOOK_URL": "u"})
    assert settings.master_key is None
    assert any("LITELLM_MASTER_KEY" in w for w in settings.warnings)


def test_callbacks_and_success_callback_merge_without_duplicates() -> None:
    settings = parse_settings(
        minimal(litellm_settings={"callbacks": "lago", "success_callback": ["webhook", "lago"]}), LAGO_ENV
    )
    assert settings.callbacks == ("lago", "webhook")
    only_success = parse_settings(minimal(litellm_settings={"success_callback": ["lago"]}), LAGO_ENV)
    assert only_success.callbacks == ("lago",)
    assert parse_settings(minimal(), {}).callbacks == ()


def test_defaults() -> None:
    settings = parse_settings(minimal(), {})
    assert settings.max_request_size_mb == Decimal(32)
    assert settings.max_request_size_bytes == 32 * 1024 * 1024
    assert settings.alerting == ()
    assert settings.max_end_user_budget_id is None
    assert settings.master_key is None
    assert settings.warnings == ()


def test_model_without_provider_prefix_is_openai() -> None:
    raw = {"model_list": [{"model_name": "m", "litellm_params": {"model": "gpt-4o"}}]}
    (deployment,) = parse_settings(raw, {}).deployments
    assert deployment.provider == "openai"
    assert deployment.upstream_model == "gpt-4o"


def test_mock_provider_needs_no_api_base() -> None:
    raw = {"model_list": [{"model_name": "m", "litellm_params": {"model": "mock/echo"}}]}
    (deployment,) = parse_settings(raw, {}).deployments
    assert deployment.provider == "mock"
    assert deployment.api_base is None


def test_deployment_ids_are_stable_across_parses() -> None:
    first = parse(CONTRACT_CONFIG, ENV)
    second = parse(CONTRACT_CONFIG, ENV)
    assert [d.deployment_id for d in first.deployments] == [d.deployment_id for d in second.deployments]


def test_load_settings_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONTRACT_CONFIG)
    settings = load_settings(path, environ=ENV)
    assert settings.master_key == "sk-1234"
    assert settings.deployments[0].input_cost_per_token == Decimal("0.0000015")


# --- unknown keys: one warning naming them ---------------------------------------------------------


def test_unknown_keys_give_exactly_one_warning_naming_them() -> None:
    text = """
model_list:
  - model_name: m
    litellm_params: {model: openai/x, api_base: "https://u/v1", weird_param: 1}
    model_info: {input_cost_per_token: 0.1, output_cost_per_token: 0.2, odd_info: 2}
  - model_name: m
    litellm_params: {model: openai/y, api_base: "https://u/v1", weird_param: 1}
litellm_settings: {callbacks: [prometheus], mystery_setting: true}
general_settings: {master_key: sk-1, mystery_general: 1}
top_level_typo: 3
"""
    settings = parse(text)
    warnings = unknown_key_warnings(settings)
    assert len(warnings) == 1, settings.warnings
    (warning,) = warnings
    for name in ("top_level_typo", "mystery_setting", "mystery_general", "weird_param", "odd_info"):
        assert name in warning
    assert warning.count("weird_param") == 1  # the same key in two deployments is named once
    assert len(settings.warnings) == 1
    # and the config is still served
    assert settings.callbacks == ("prometheus",)
    assert len(settings.deployments) == 2


def test_a_single_unknown_key_gives_one_warning() -> None:
    settings = parse_settings(minimal(router_settings={"redis_host": "r"}, surprise=1), {})
    [unknown] = unknown_key_warnings(settings)
    assert "surprise" in unknown and "router_settings.redis_host" in unknown
    assert settings.warnings == (unknown,)


def test_known_keys_give_no_warning() -> None:
    assert unknown_key_warnings(parse(CONTRACT_CONFIG, ENV)) == []


# --- refusals ---------------------------------------------------------------------------------------


def refuse(raw: Any, *fragments: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_settings(raw, {})
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("raw", [["model_list"], "model_list: []", 42])
def test_top_level_not_a_mapping(raw: Any) -> None:
    refuse(raw, "top level", "mapping")


def test_missing_model_list() -> None:
    refuse({"general_settings": {"master_key": "sk-1"}}, "model_list", "missing")


@pytest.mark.parametrize("value", [[], {}, "gpt-4o"])
def test_empty_or_non_list_model_list(value: Any) -> None:
    refuse({"model_list": value}, "model_list", "non-empty list")


def test_entry_not_a_mapping() -> None:
    refuse({"model_list": ["gpt-4o"]}, "model_list[0]")


@pytest.mark.parametrize("entry", [{"litellm_params": {"model": "openai/x"}}, {"model_name": "  "}])
def test_entry_without_model_name(entry: dict[str, Any]) -> None:
    ok = {"model_name": "ok", "litellm_params": {"model": "openai/x"}}
    refuse({"model_list": [ok, entry]}, "model_list[1]", "model_name")


def test_entry_without_litellm_params() -> None:
    refuse({"model_list": [{"model_name": "m"}]}, "model_list[0]", "(m)", "litellm_params")


@pytest.mark.parametrize("params", [{}, {"api_base": "https://u/v1"}, {"model": ""}, {"model": 3}])
def test_entry_without_litellm_params_model(params: dict[str, Any]) -> None:
    refuse(
        {"model_list": [{"model_name": "m", "litellm_params": params}]},
        "model_list[0]",
        "litellm_params.model",
    )


def test_unsupported_provider() -> None:
    raw = {"model_list": [{"model_name": "claude", "litellm_params": {"model": "bedrock/anthropic.claude-3"}}]}
    message = refuse(raw, "model_list[0]", "(claude)", "bedrock", "not supported")
    assert "openai" in message  # says what would work


@pytest.mark.parametrize("field", ["input_cost_per_token", "output_cost_per_token"])
def test_negative_price(field: str) -> None:
    raw = minimal()
    raw["model_list"][0]["model_info"] = {field: Decimal("-0.000001")}
    refuse(raw, "model_list[0]", field, "negative")


@pytest.mark.parametrize("value", ["cheap", "", True, [1], 0.5])
def test_non_numeric_price(value: Any) -> None:
    raw = minimal()
    raw["model_list"][0]["model_info"] = {"input_cost_per_token": value}
    refuse(raw, "model_list[0]", "input_cost_per_token")


def test_non_finite_price_from_environment() -> None:
    raw = minimal()
    raw["model_list"][0]["model_info"] = {"input_cost_per_token": "os.environ/P"}
    with pytest.raises(ConfigError, match="input_cost_per_token"):
        parse_settings(raw, {"P": "NaN"})


@pytest.mark.parametrize("duration", ["30 days", "1y", "0d", "-1d", "d", ""])
def test_bad_budget_duration(duration: str) -> None:
    refuse(minimal(litellm_settings={"budget_duration": duration}), "litellm_settings.budget_duration")


@pytest.mark.parametrize("zone", ["Mars/Olympus", "", "../../etc/passwd", 5, "UTC+3"])
def test_bad_timezone(zone: Any) -> None:
    refuse(minimal(litellm_settings={"timezone": zone}), "litellm_settings.timezone")


def test_timezone_is_utc_unless_set() -> None:
    assert parse_settings(minimal(), {}).timezone == "UTC"
    assert parse_settings(minimal(litellm_settings={"timezone": "Asia/Kolkata"}), {}).timezone == "Asia/Kolkata"


def test_cors_is_litellm_s_any_origin_without_credentials_unless_named() -> None:
    plain = parse_settings(minimal(), {})
    assert (plain.cors_origins, plain.cors_allow_credentials) == (("*",), False)
    named = parse_settings(minimal(general_settings={"cors_origins": ["https://app.example"]}), {})
    assert (named.cors_origins, named.cors_allow_credentials) == (("https://app.example",), True)
    env = {"LITELLM_CORS_ORIGINS": "https://a.example, https://b.example", "LITELLM_CORS_ALLOW_CREDENTIALS": "false"}
    from_env = parse_settings(minimal(general_settings={"cors_origins": ["https://c.example"]}), env)
    assert (from_env.cors_origins, from_env.cors_allow_credentials) == (("https://a.example", "https://b.example"), False)


def test_environment_variables_are_set_before_the_rest_is_read() -> None:
    raw = minimal(
        environment_variables={"LAGO_API_BASE": "http://lago.test", "LAGO_API_KEY": "k", "LAGO_API_EVENT_CODE": "tokens",
                               "UPSTREAM_KEY": "from-the-file"},
        litellm_settings={"callbacks": ["lago"]},
    )  # fmt: skip
    raw["model_list"][0]["litellm_params"]["api_key"] = "os.environ/UPSTREAM_KEY"
    settings = parse_settings(raw, {})
    assert settings.lago is not None and settings.lago.api_base == "http://lago.test"
    assert settings.deployments[0].api_key == "from-the-file"
    refuse(minimal(environment_variables=["A=1"]), "environment_variables")


def test_load_settings_exports_environment_variables_as_litellm_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SL_TEST_EXPORTED", raising=False)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(minimal(environment_variables={"SL_TEST_EXPORTED": "yes"})))
    load_settings(path)
    assert os.environ.pop("SL_TEST_EXPORTED") == "yes"


def test_keys_accepted_but_not_implemented_are_named_in_one_warning() -> None:
    raw = minimal(
        router_settings={"routing_strategy": "simple-shuffle"},
        litellm_settings={"num_retries": 3, "drop_params": True},
        general_settings={"proxy_batch_write_at": 60},
    )
    raw["model_list"][0]["litellm_params"]["rpm"] = 100
    raw["model_list"][0]["model_info"] = {"mode": "chat"}
    warnings = [w for w in parse_settings(raw, {}).warnings if "not implemented" in w]
    assert warnings == [
        "config keys accepted but not implemented (no effect): litellm_settings.drop_params, "
        "general_settings.proxy_batch_write_at, m.model_info.mode"
    ]
    assert not [w for w in parse_settings(minimal(), {}).warnings if "not implemented" in w]


@pytest.mark.parametrize("limit", [0, 1, 1001, "many", True])
def test_bad_database_connection_pool_limit(limit: Any) -> None:
    refuse(minimal(general_settings={"database_connection_pool_limit": limit}), "database_connection_pool_limit")


def test_database_connection_pool_limit_sizes_the_pool() -> None:
    assert parse_settings(minimal(), {}).database_pool_limit == 10
    assert parse_settings(minimal(general_settings={"database_connection_pool_limit": 40}), {}).database_pool_limit == 40


def test_budget_gauges_are_marks_of_scopes() -> None:
    marks = ["team:core", "customer:acme", "key:" + "a" * 64, "global", "team:core"]
    assert parse_settings(minimal(general_settings={"budget_gauges": marks}), {}).budget_gauges == (
        ("team", "core"), ("customer", "acme"), ("key", "a" * 64), ("global", "global"),
    )  # fmt: skip
    for bad in (["org:x"], ["team:"], ["everything"]):
        refuse(minimal(general_settings={"budget_gauges": bad}), "budget_gauges")


def test_a_cors_origin_must_be_a_web_origin() -> None:
    refuse(minimal(general_settings={"cors_origins": ["javascript:alert(1)"]}), "CORS origin")


@pytest.mark.parametrize("size", [0, -1, "big"])
def test_bad_max_request_size(size: Any) -> None:
    refuse(minimal(general_settings={"max_request_size_mb": size}), "general_settings.max_request_size_mb")


def test_section_not_a_mapping() -> None:
    refuse(minimal(litellm_settings=["callbacks"]), "litellm_settings", "mapping")


def test_callbacks_not_strings() -> None:
    refuse(minimal(litellm_settings={"callbacks": [1, 2]}), "litellm_settings.callbacks")


def test_negative_rpm() -> None:
    raw = minimal()
    raw["model_list"][0]["litellm_params"]["rpm"] = -5
    refuse(raw, "model_list[0]", "rpm")


def test_invalid_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("model_list:\n  - model_name: [unclosed\n    litellm_params: {model: openai/x\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert str(path) in str(caught.value)
    assert "YAML" in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "config.yaml"
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert str(path) in str(caught.value)


def test_empty_file_says_model_list_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ConfigError, match="model_list"):
        load_settings(path, environ={})


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad-provider.yaml"
    path.write_text("model_list:\n  - model_name: m\n    litellm_params: {model: bedrock/x}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert str(path) in str(caught.value)
    assert "model_list[0]" in str(caught.value)


def test_lago_callback_needs_its_environment_and_names_what_is_missing() -> None:
    raw = minimal(litellm_settings={"callbacks": ["lago"]})
    with pytest.raises(ConfigError, match="LAGO_API_KEY, LAGO_API_EVENT_CODE are not set"):
        parse_settings(raw, {"LAGO_API_BASE": "http://lago"})
    with pytest.raises(ConfigError, match="LAGO_API_CHARGE_BY must be one of"):
        parse_settings(raw, {**LAGO_ENV, "LAGO_API_CHARGE_BY": "org_id"})
    settings = parse_settings(raw, {**LAGO_ENV, "LAGO_API_CHARGE_BY": "team_id"})
    assert settings.lago is not None and settings.lago.charge_by == "team_id"
    assert parse_settings(raw, LAGO_ENV).lago.charge_by == "end_user_id"  # type: ignore[union-attr]
    assert "lago-key" not in repr(settings.lago)


def test_webhook_alerting_needs_a_url_and_a_valid_secret() -> None:
    raw = minimal(general_settings={"alerting": ["webhook"]})
    with pytest.raises(ConfigError, match="WEBHOOK_URL is not set"):
        parse_settings(raw, {})
    with pytest.raises(ConfigError, match="WEBHOOK_SECRET is not a valid"):
        parse_settings(raw, {"WEBHOOK_URL": "http://hook", "WEBHOOK_SECRET": "not base64 !"})
    settings = parse_settings(raw, {"WEBHOOK_URL": "http://hook"})
    assert settings.webhook is not None and settings.webhook.secret is None


def test_secrets_never_show_in_a_repr() -> None:
    """Settings and deployments may end up in a log line or a traceback: their keys must not."""
    from spendledger.ledger.config import Deployment, Settings

    deployment = Deployment(
        model_name="m", deployment_id="d", provider="openai", upstream_model="x", api_base="b", api_key="sk-upstream"
    )
    settings = Settings(deployments=(deployment,), master_key="sk-master-key", database_url="postgresql://u:pw@h/db")
    shown = repr(settings)
    assert "sk-upstream" not in shown and "sk-master-key" not in shown and "pw@" not in shown
    assert "api_key=***" in shown and "master_key=***" in shown
