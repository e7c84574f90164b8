"""The providers a deployment may name, one row each: where it is, how it is called, how it is priced.

A `model_list` entry's `litellm_params.model` is `<prefix>/<model>` as LiteLLM spells it; the row of
its prefix says the default base URL (and LiteLLM's environment variables for another base and for
the key), how the key is sent, which wire format the API speaks, and which provider of the
genai-prices catalogue prices its models. Adding a provider that speaks one of the wire formats is
adding a row to `PROVIDERS`; README's provider list is generated from it (`python -m
spendledger.ledger.providers`) and a test keeps the two equal.

The deployment's own `api_key` (or `api_base`) wins over the environment, as in LiteLLM. Azure also
takes `api_version` (required) and `azure_ad_token`, and has its own URL shapes (`request_url`).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any, Final, Literal
from urllib.parse import quote

import msgspec

from spendledger.ledger.config_values import ConfigError, optional_str

WireFormat = Literal["openai", "azure", "anthropic"]
# How the key travels: `Authorization: Bearer`, Azure's `api-key`, Anthropic's `x-api-key`; none
# at all for the offline mock. A provider with no key configured gets no key header.
AuthStyle = Literal["bearer", "api-key", "x-api-key", "none"]


class ProviderSpec(msgspec.Struct, frozen=True, kw_only=True):
    prefix: str
    wire: WireFormat = "openai"
    default_base: str | None = None  # None: `api_base` (or a `base_env` variable) is required
    base_env: tuple[str, ...] = ()  # LiteLLM's variables for the base URL, the first set wins
    # Appended to a base that does not end with it: LiteLLM configs give Ollama's root
    # (`http://localhost:11434`), whose OpenAI-compatible API is under /v1.
    base_suffix: str = ""
    auth: AuthStyle = "bearer"
    key_env: tuple[str, ...] = ()  # LiteLLM's variables for the key, the first set wins
    catalogue: str | None = None  # the genai-prices provider id; None: only model_info prices it
    # Prepended to a model name with no `/` (Fireworks names models `accounts/fireworks/models/…`).
    model_namespace: str = ""
    headers: tuple[tuple[str, str], ...] = ()  # sent on every request besides the key
    local: bool = False  # runs on the operator's machine: no key needed


_OPENAI_KEY: Final = ("OPENAI_API_KEY",)
_OPENAI_BASE: Final = ("OPENAI_BASE_URL", "OPENAI_API_BASE")


def _ollama(prefix: str) -> ProviderSpec:
    """LiteLLM's `ollama/` and `ollama_chat/` (its native API), reached here at Ollama's own
    OpenAI-compatible API on the same server."""
    return ProviderSpec(
        prefix=prefix, default_base="http://localhost:11434", base_env=("OLLAMA_API_BASE",), base_suffix="/v1",
        key_env=("OLLAMA_API_KEY",), local=True,
    )  # fmt: skip


def _vllm(prefix: str) -> ProviderSpec:
    """A vLLM server's OpenAI-compatible API (`vllm/`, which LiteLLM runs in-process, is served as
    `hosted_vllm/`); priced as OpenAI's models of the same name, as before this table."""
    return ProviderSpec(
        prefix=prefix, base_env=("HOSTED_VLLM_API_BASE",), key_env=("HOSTED_VLLM_API_KEY",), catalogue="openai",
        local=True,
    )  # fmt: skip


PROVIDERS: Final[dict[str, ProviderSpec]] = {
    spec.prefix: spec
    for spec in (
        ProviderSpec(prefix="openai", default_base="https://api.openai.com/v1", base_env=_OPENAI_BASE,
                     key_env=_OPENAI_KEY, catalogue="openai"),
        ProviderSpec(prefix="text-completion-openai", default_base="https://api.openai.com/v1",
                     base_env=_OPENAI_BASE, key_env=_OPENAI_KEY, catalogue="openai"),
        ProviderSpec(prefix="custom_openai", catalogue="openai"),
        ProviderSpec(prefix="openai_like", catalogue="openai"),
        ProviderSpec(prefix="azure", wire="azure", base_env=("AZURE_API_BASE",), auth="api-key",
                     key_env=("AZURE_OPENAI_API_KEY", "AZURE_API_KEY"), catalogue="azure"),
        ProviderSpec(prefix="anthropic", wire="anthropic", default_base="https://api.anthropic.com",
                     base_env=("ANTHROPIC_API_BASE", "ANTHROPIC_BASE_URL"), auth="x-api-key",
                     key_env=("ANTHROPIC_API_KEY",), catalogue="anthropic",
                     headers=(("anthropic-version", "2023-06-01"),)),
        ProviderSpec(prefix="gemini", default_base="https://generativelanguage.googleapis.com/v1beta/openai",
                     base_suffix="/v1beta/openai", key_env=("GEMINI_API_KEY", "GOOGLE_API_KEY"), catalogue="google"),
        ProviderSpec(prefix="groq", default_base="https://api.groq.com/openai/v1", base_env=("GROQ_API_BASE",),
                     key_env=("GROQ_API_KEY",), catalogue="groq"),
        ProviderSpec(prefix="mistral", default_base="https://api.mistral.ai/v1", base_env=("MISTRAL_AZURE_API_BASE",),
                     base_suffix="/v1", key_env=("MISTRAL_AZURE_API_KEY", "MISTRAL_API_KEY"), catalogue="mistral"),
        ProviderSpec(prefix="deepseek", default_base="https://api.deepseek.com/beta", base_env=("DEEPSEEK_API_BASE",),
                     key_env=("DEEPSEEK_API_KEY",), catalogue="deepseek"),
        ProviderSpec(prefix="xai", default_base="https://api.x.ai/v1", base_env=("XAI_API_BASE",),
                     key_env=("XAI_API_KEY",), catalogue="x-ai"),
        ProviderSpec(prefix="together_ai", default_base="https://api.together.xyz/v1",
                     base_env=("TOGETHER_AI_API_BASE",),
                     key_env=("TOGETHER_API_KEY", "TOGETHER_AI_API_KEY", "TOGETHERAI_API_KEY", "TOGETHER_AI_TOKEN"),
                     catalogue="together"),
        ProviderSpec(prefix="fireworks_ai", default_base="https://api.fireworks.ai/inference/v1",
                     base_env=("FIREWORKS_API_BASE",),
                     key_env=("FIREWORKS_API_KEY", "FIREWORKS_AI_API_KEY", "FIREWORKSAI_API_KEY", "FIREWORKS_AI_TOKEN"),
                     catalogue="fireworks", model_namespace="accounts/fireworks/models/"),
        ProviderSpec(prefix="perplexity", default_base="https://api.perplexity.ai", base_env=("PERPLEXITY_API_BASE",),
                     key_env=("PERPLEXITYAI_API_KEY", "PERPLEXITY_API_KEY"), catalogue="perplexity"),
        ProviderSpec(prefix="openrouter", default_base="https://openrouter.ai/api/v1", base_env=("OPENROUTER_API_BASE",),
                     key_env=("OPENROUTER_API_KEY", "OR_API_KEY"), catalogue="openrouter"),
        _ollama("ollama"),
        _ollama("ollama_chat"),
        ProviderSpec(prefix="lm_studio", default_base="http://localhost:1234/v1", base_env=("LM_STUDIO_API_BASE",),
                     base_suffix="/v1", key_env=("LM_STUDIO_API_KEY",), local=True),
        _vllm("hosted_vllm"),
        _vllm("vllm"),
        ProviderSpec(prefix="mock", auth="none", local=True),
    )
}  # fmt: skip

# Azure's "next generation" v1 API takes no dated api-version (LiteLLM's `_is_azure_v1_api_version`).
AZURE_V1_VERSIONS: Final = frozenset({"v1", "latest", "preview"})


def provider_spec(prefix: str) -> ProviderSpec:
    """The row of a prefix the config accepted (KeyError for any other: config checked it)."""
    return PROVIDERS[prefix]


class Endpoint(msgspec.Struct, frozen=True, kw_only=True):
    """Where one deployment is and what it authenticates with, resolved from its params and the
    environment once, at start."""

    api_base: str | None
    written_base: str | None  # as the config (or the default) gave it: part of the deployment's id
    api_key: str | None
    api_version: str | None = None
    azure_ad_token: str | None = None

    def __repr__(self) -> str:  # the key and the token never reach a log line
        return f"Endpoint(api_base={self.api_base!r}, api_version={self.api_version!r})"


def _first_set(names: tuple[str, ...], environ: Mapping[str, str]) -> str | None:
    return next((environ[name] for name in names if environ.get(name)), None)


def resolve_endpoint(spec: ProviderSpec, params: Mapping[str, Any], environ: Mapping[str, str], ctx: str) -> Endpoint:
    """A deployment's base URL, key and (Azure) version: its params, else LiteLLM's variables, else
    the row's defaults; a ConfigError naming the deployment (`ctx`) for what cannot be served."""
    if spec.prefix == "mock":
        return Endpoint(api_base=None, written_base=None, api_key=None)
    written = optional_str(params.get("api_base"), f"{ctx}.api_base", "") or _first_set(spec.base_env, environ)
    written = written or spec.default_base
    if not written:
        variables = " or ".join(spec.base_env)
        raise ConfigError(
            f"{ctx}: 'litellm_params.api_base' is required for '{spec.prefix}'" + (f" (or {variables})" if variables else "")
        )
    base = written.rstrip("/")
    if spec.base_suffix and not base.endswith(spec.base_suffix):
        base += spec.base_suffix
    own_key = optional_str(params.get("api_key"), f"{ctx}.api_key", "")
    if spec.wire != "azure":
        return Endpoint(api_base=base, written_base=written, api_key=own_key or _first_set(spec.key_env, environ))
    version = params.get("api_version")
    if isinstance(version, datetime.date):  # `api_version: 2024-10-21` unquoted: YAML reads a date
        version = version.isoformat()
    version = optional_str(version, f"{ctx}.api_version", "") or environ.get("AZURE_API_VERSION")
    if not version:
        raise ConfigError(
            f"{ctx}: 'litellm_params.api_version' is required for 'azure' (e.g. 2024-10-21, or v1 for Azure's v1 API)"
        )
    # What the deployment names beats the environment: its key, else its Entra ID token, else
    # AZURE_OPENAI_API_KEY / AZURE_API_KEY, else AZURE_AD_TOKEN.
    token = optional_str(params.get("azure_ad_token"), f"{ctx}.azure_ad_token", "") or None
    api_key = own_key or (None if token else _first_set(spec.key_env, environ))
    if not api_key and not token:
        token = environ.get("AZURE_AD_TOKEN") or None
    return Endpoint(api_base=base, written_base=written, api_key=api_key, api_version=version, azure_ad_token=token)


def upstream_model_name(spec: ProviderSpec, model: str) -> str:
    """The model name the provider is sent: the config's, in the provider's namespace if it has one."""
    if spec.model_namespace and "/" not in model:
        return spec.model_namespace + model
    return model


def request_url(spec: ProviderSpec, api_base: str, model: str, api_version: str | None, path: str) -> str:
    """The URL of an OpenAI route (`/chat/completions`, `/completions`, `/embeddings`) on a deployment.

    Azure, as LiteLLM (and the `openai` SDK's AzureOpenAI) builds it: `{base}/openai/deployments/
    {deployment}{path}?api-version=…`; a base that already names a deployment is used as it is; with
    api_version v1 / latest / preview, or a base ending in /openai/v1, Azure's v1 API
    `{base}/openai/v1{path}`, where the body's `model` names the deployment and no api-version is sent.
    """
    if spec.wire != "azure":
        return f"{api_base}{path}"
    v1 = api_version is not None and api_version.lower() in AZURE_V1_VERSIONS
    if v1 or api_base.endswith("/openai/v1"):
        root = api_base if api_base.endswith("/openai/v1") else f"{api_base.removesuffix('/openai')}/openai/v1"
        return f"{root}{path}"
    if "/openai/deployments/" in api_base:
        return f"{api_base}{path}?api-version={quote(api_version or '', safe='')}"
    deployment = quote(model, safe="")
    return f"{api_base.removesuffix('/openai')}/openai/deployments/{deployment}{path}?api-version={quote(api_version or '', safe='')}"


def auth_headers(spec: ProviderSpec, api_key: str | None, azure_ad_token: str | None = None) -> dict[str, str]:
    """The headers that carry the deployment's credentials (and the provider's fixed ones).
    Azure: the key as `api-key`, else an Entra ID (AD) token as a bearer token, as LiteLLM prefers."""
    headers = dict(spec.headers)
    if spec.auth == "none":
        return headers
    if api_key:
        name = {"bearer": "authorization", "api-key": "api-key", "x-api-key": "x-api-key"}[spec.auth]
        headers[name] = f"Bearer {api_key}" if spec.auth == "bearer" else api_key
    elif azure_ad_token:
        headers["authorization"] = f"Bearer {azure_ad_token}"
    return headers


def catalogue_model_ref(spec: ProviderSpec, upstream_model: str, base_model: str | None) -> str:
    """The model the catalogue is asked for: `model_info.base_model` when given (LiteLLM's key, for an
    Azure deployment whose name is not a model: `azure/gpt-4o` or `gpt-4o`), else the upstream model."""
    if not base_model:
        return upstream_model
    prefix, _, rest = base_model.partition("/")
    return rest if rest and prefix in PROVIDERS else base_model


def provider_list_markdown() -> str:
    """README's provider list, generated from the table (tests/unit/ledger/test_providers.py keeps
    README equal to it)."""
    lines = [
        "| prefix | wire format | default base URL | key (else this variable) | sent as | catalogue |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    sent = {"bearer": "`Authorization: Bearer`", "api-key": "`api-key`", "x-api-key": "`x-api-key`", "none": "—"}
    for spec in PROVIDERS.values():
        if spec.prefix == "mock":
            base = "built in, offline"
        elif spec.default_base:
            suffix = "" if spec.default_base.endswith(spec.base_suffix) else spec.base_suffix
            base = f"`{spec.default_base}{suffix}`"
        else:
            base = "`api_base` required"
        if spec.base_env:
            base += " (" + ", ".join(f"`{name}`" for name in spec.base_env) + ")"
        keys = ", ".join(f"`{name}`" for name in spec.key_env) or "`api_key`"
        if spec.local:
            keys += " (optional)" if spec.auth != "none" else ""
        if spec.auth == "none":
            keys = "none"
        lines.append(
            f"| `{spec.prefix}/` | {spec.wire} | {base} | {keys} | {sent[spec.auth]} | {spec.catalogue or '—'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(provider_list_markdown(), end="")
