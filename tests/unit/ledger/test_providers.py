"""ledger/providers.py: the table (each prefix's base, key variables, header, catalogue), the URLs and
headers built from it, the config of each prefix starting and bad ones stopping with one line naming
the deployment, and README's provider list equal to the table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from spendledger.ledger.config import _DecimalLoader, parse_settings
from spendledger.ledger.config_values import ConfigError
from spendledger.ledger.pricing import catalogue_price
from spendledger.ledger.providers import (
    PROVIDERS,
    auth_headers,
    provider_list_markdown,
    provider_spec,
    request_url,
)

README = Path(__file__).resolve().parents[3] / "README.md"

# Each prefix the issue names, with the base URL it gets when the config gives none and the
# variable its key is read from (None: an api_base is required, or no key is read).
DEFAULTS: dict[str, tuple[str | None, str | None]] = {
    "openai": ("https://api.openai.com/v1", "OPENAI_API_KEY"),
    "text-completion-openai": ("https://api.openai.com/v1", "OPENAI_API_KEY"),
    "gemini": ("https://generativelanguage.googleapis.com/v1beta/openai", "GEMINI_API_KEY"),
    "groq": ("https://api.groq.com/openai/v1", "GROQ_API_KEY"),
    "mistral": ("https://api.mistral.ai/v1", "MISTRAL_API_KEY"),
    "deepseek": ("https://api.deepseek.com/beta", "DEEPSEEK_API_KEY"),
    "xai": ("https://api.x.ai/v1", "XAI_API_KEY"),
    "together_ai": ("https://api.together.xyz/v1", "TOGETHERAI_API_KEY"),
    "fireworks_ai": ("https://api.fireworks.ai/inference/v1", "FIREWORKS_AI_API_KEY"),
    "perplexity": ("https://api.perplexity.ai", "PERPLEXITYAI_API_KEY"),
    "openrouter": ("https://openrouter.ai/api/v1", "OPENROUTER_API_KEY"),
    "ollama": ("http://localhost:11434/v1", None),
    "ollama_chat": ("http://localhost:11434/v1", None),
    "lm_studio": ("http://localhost:1234/v1", None),
    "anthropic": ("https://api.anthropic.com", "ANTHROPIC_API_KEY"),
}
NEEDS_BASE = ("hosted_vllm", "vllm", "openai_like", "custom_openai", "azure")


def deployment_of(params: dict[str, Any], environ: dict[str, str] | None = None, **info: Any) -> Any:
    entry: dict[str, Any] = {"model_name": "group", "litellm_params": params}
    if info:
        entry["model_info"] = info
    (deployment,) = parse_settings({"model_list": [entry]}, environ or {}).deployments
    return deployment


def test_the_table_has_every_prefix_of_the_issue() -> None:
    assert set(DEFAULTS) | set(NEEDS_BASE) | {"mock"} == set(PROVIDERS)


@pytest.mark.parametrize("prefix", sorted(DEFAULTS))
def test_each_prefix_starts_with_its_default_base_and_its_key_variable(prefix: str) -> None:
    base, key_variable = DEFAULTS[prefix]
    environ = {key_variable: f"key-of-{prefix}"} if key_variable else {}
    deployment = deployment_of({"model": f"{prefix}/some-model"}, environ)
    assert (deployment.provider, deployment.api_base) == (prefix, base)
    assert deployment.api_key == (f"key-of-{prefix}" if key_variable else None)
    assert deployment.wire == ("anthropic" if prefix == "anthropic" else "openai")


@pytest.mark.parametrize("prefix", NEEDS_BASE)
def test_a_prefix_without_a_default_base_needs_one_named_by_deployment(prefix: str) -> None:
    params: dict[str, Any] = {"model": f"{prefix}/m"}
    if prefix == "azure":
        params["api_version"] = "2024-10-21"
    with pytest.raises(ConfigError) as caught:
        deployment_of(params)
    message = str(caught.value)
    assert "model_list[0] (group)" in message and "api_base" in message and "\n" not in message


def test_the_deployments_own_key_and_base_beat_the_environment() -> None:
    environ = {"GROQ_API_KEY": "from-env", "GROQ_API_BASE": "https://env.example/v1"}
    assert deployment_of({"model": "groq/llama"}, environ).api_base == "https://env.example/v1"
    own = deployment_of({"model": "groq/llama", "api_key": "own", "api_base": "https://own.example/v1/"}, environ)
    assert (own.api_key, own.api_base) == ("own", "https://own.example/v1")


def test_local_roots_get_their_openai_path_and_fireworks_its_namespace() -> None:
    assert deployment_of({"model": "ollama/llama3", "api_base": "http://gpu:11434"}).api_base == "http://gpu:11434/v1"
    assert deployment_of({"model": "mistral/m", "api_base": "https://eu.mistral/"}).api_base == "https://eu.mistral/v1"
    assert deployment_of({"model": "fireworks_ai/llama-v3p1-8b"}).upstream_model == "accounts/fireworks/models/llama-v3p1-8b"
    assert deployment_of({"model": "fireworks_ai/accounts/me/models/x"}).upstream_model == "accounts/me/models/x"


def test_existing_deployment_ids_are_unchanged_by_the_table() -> None:
    # sha256 over model_name, model and api_base as written: the ids events already carry.
    assert deployment_of({"model": "openai/x", "api_base": "https://u/v1/"}).deployment_id == "d1cc75eb8bc92ff3"
    assert deployment_of({"model": "openai/gpt-4o"}).deployment_id == "4ef3c98b7bb9c584"


# --- Azure ----------------------------------------------------------------------------------------


AZURE = {"model": "azure/gpt-35-turbo", "api_base": "https://res.openai.azure.com/", "api_version": "2024-10-21"}


def test_azure_reads_its_key_version_and_token() -> None:
    d = deployment_of({**AZURE, "api_key": "k"})
    assert (d.wire, d.api_base, d.api_version, d.api_key, d.azure_ad_token) == (
        "azure", "https://res.openai.azure.com", "2024-10-21", "k", None,
    )  # fmt: skip
    from_env = deployment_of({k: v for k, v in AZURE.items() if k != "api_base"} | {"api_version": None},
                             {"AZURE_API_BASE": "https://env.openai.azure.com", "AZURE_API_VERSION": "2024-06-01",
                              "AZURE_API_KEY": "env-key", "AZURE_OPENAI_API_KEY": ""})  # fmt: skip
    assert (from_env.api_base, from_env.api_version, from_env.api_key) == (
        "https://env.openai.azure.com", "2024-06-01", "env-key",
    )  # fmt: skip
    token = deployment_of({**AZURE, "azure_ad_token": "t"}, {"AZURE_API_KEY": "env-key"})
    assert (token.api_key, token.azure_ad_token) == (None, "t")  # its own token beats the variable's key
    assert "'t'" not in repr(token) and "azure_ad_token=***" in repr(token)


def test_an_unquoted_azure_api_version_is_read_as_written() -> None:
    text = "model_list:\n  - model_name: g\n    litellm_params: {model: azure/d, api_base: https://r, api_version: 2024-10-21}\n"
    (deployment,) = parse_settings(yaml.load(text, Loader=_DecimalLoader), {}).deployments
    assert deployment.api_version == "2024-10-21"


def test_azure_without_api_version_stops_naming_the_deployment() -> None:
    with pytest.raises(ConfigError) as caught:
        deployment_of({k: v for k, v in AZURE.items() if k != "api_version"})
    message = str(caught.value)
    assert message.startswith("config: model_list[0] (group)") and "api_version" in message and "\n" not in message


def test_an_unknown_prefix_stops_naming_the_deployment() -> None:
    with pytest.raises(ConfigError) as caught:
        deployment_of({"model": "bedrock/anthropic.claude-3"})
    assert str(caught.value).startswith("config: model_list[0] (group): provider 'bedrock' is not supported")


@pytest.mark.parametrize(
    ("base", "version", "path", "url"),
    [
        ("https://r.openai.azure.com", "2024-10-21", "/chat/completions",
         "https://r.openai.azure.com/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"),
        ("https://r.openai.azure.com/openai", "2024-10-21", "/embeddings",
         "https://r.openai.azure.com/openai/deployments/gpt-4o/embeddings?api-version=2024-10-21"),
        ("https://r.openai.azure.com", "v1", "/completions", "https://r.openai.azure.com/openai/v1/completions"),
        ("https://r.openai.azure.com", "latest", "/chat/completions", "https://r.openai.azure.com/openai/v1/chat/completions"),
        ("https://r.openai.azure.com/openai/v1", "2024-10-21", "/chat/completions",
         "https://r.openai.azure.com/openai/v1/chat/completions"),
        ("https://gw.example/openai/deployments/other", "2024-06-01", "/chat/completions",
         "https://gw.example/openai/deployments/other/chat/completions?api-version=2024-06-01"),
    ],
)  # fmt: skip
def test_azure_urls_as_litellm_builds_them(base: str, version: str, path: str, url: str) -> None:
    assert request_url(provider_spec("azure"), base, "gpt-4o", version, path) == url


def test_headers_carry_the_key_as_each_provider_wants_it() -> None:
    assert auth_headers(provider_spec("groq"), "k") == {"authorization": "Bearer k"}
    assert auth_headers(provider_spec("azure"), "k", "t") == {"api-key": "k"}
    assert auth_headers(provider_spec("azure"), None, "t") == {"authorization": "Bearer t"}
    assert auth_headers(provider_spec("anthropic"), "k") == {"anthropic-version": "2023-06-01", "x-api-key": "k"}
    assert auth_headers(provider_spec("ollama"), None) == {}
    assert auth_headers(provider_spec("mock"), "k") == {}
    assert request_url(provider_spec("gemini"), "https://g/v1beta/openai", "m", None, "/embeddings") == (
        "https://g/v1beta/openai/embeddings"
    )


# --- prices ---------------------------------------------------------------------------------------


def test_each_cloud_prefix_is_priced_from_its_catalogue_provider() -> None:
    for model, provider in [
        ("azure/gpt-35-turbo", "azure"), ("gemini/gemini-2.0-flash", "google"), ("groq/llama-3.3-70b-versatile", "groq"),
        ("mistral/mistral-large-latest", "mistral"), ("deepseek/deepseek-chat", "deepseek"), ("xai/grok-3", "x-ai"),
    ]:  # fmt: skip
        params = {"model": model, "api_base": "http://127.0.0.1:9"}  # a base the catalogue cannot recognise
        if provider == "azure":
            params["api_version"] = "2024-10-21"
        assert provider_spec(model.partition("/")[0]).catalogue == provider
        assert catalogue_price(deployment_of(params)) is not None, model


def test_base_model_prices_an_azure_deployment_whose_name_is_not_a_model() -> None:
    named = {**AZURE, "model": "azure/team-prod-2"}
    assert catalogue_price(deployment_of(named)) is None
    priced = catalogue_price(deployment_of(named, base_model="azure/gpt-4o-mini"))
    assert priced == catalogue_price(deployment_of({**AZURE, "model": "azure/gpt-4o-mini"}))
    assert priced is not None
    assert catalogue_price(deployment_of({"model": "ollama/llama3"})) is None  # local: model_info or nothing


# --- README ---------------------------------------------------------------------------------------


def test_readme_lists_the_providers_of_the_table() -> None:
    """README's list is the table's, row for row (regenerate: `python -m spendledger.ledger.providers`)."""
    generated = provider_list_markdown().splitlines()
    lines = [line.strip() for line in README.read_text(encoding="utf-8").splitlines()]
    start = lines.index(generated[0])
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    assert lines[start:end] == generated
