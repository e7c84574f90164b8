"""LiteLLM proxy config.yaml → typed, frozen settings.

The file is read unchanged: `model_list` (with `litellm_params` and `model_info`), `litellm_settings`,
`general_settings`, and `os.environ/NAME` values. Numbers with a fraction are read as Decimal, never
float, so a price typed as `0.0000015` is exactly that. Unknown keys are reported once, not fatal.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
import yaml

from spendledger.ledger.config_values import (
    ConfigError,
    check_duration,
    flag,
    optional_int,
    optional_money,
    optional_positive_int,
    optional_str,
    positive_float,
    positive_money,
    string_list,
)
from spendledger.ledger.providers import PROVIDERS, WireFormat, resolve_endpoint, upstream_model_name
from spendledger.ledger.router_settings import (
    DEFAULT_ROUTER_SETTINGS,
    LITELLM_KEYS,
    ROUTER_KEYS,
    RouterSettings,
    parse_router_settings,
)
from spendledger.ledger.scopes import BudgetSettings
from spendledger.ledger.tokens import TokenKind

_TOP_LEVEL: Final = {
    "model_list",
    "litellm_settings",
    "general_settings",
    "router_settings",
    "environment_variables",
}
_LITELLM_SETTINGS: Final = {
    "callbacks",
    "success_callback",
    "failure_callback",
    "max_end_user_budget_id",
    "max_budget",
    "budget_duration",
    "request_timeout",
    "drop_params",
    "set_verbose",
    "json_logs",
    "timezone",
    *LITELLM_KEYS,
}
_GENERAL_SETTINGS: Final = {
    "master_key",
    "database_url",
    "alerting",
    "max_request_size_mb",
    "reject_unpriced_models",
    "reject_unbounded_requests",
    "budget_leases",
    "alerting_threshold",
    "proxy_batch_write_at",
    "database_connection_pool_limit",
    "store_model_in_db",
    "dangerously_permit_weak_or_unset_master_key",
    "cors_origins",
    "cors_allow_credentials",
    "budget_gauges",
}
_LITELLM_PARAMS: Final = {
    "model",
    "api_key",
    "api_base",
    "rpm",
    "tpm",
    "timeout",
    "stream_timeout",
    "max_retries",
    "weight",
    "input_cost_per_token",
    "output_cost_per_token",
    "organization",
    "api_version",
    "azure_ad_token",
    "mock_response",
}
# LiteLLM's per-token price keys (model_info, or litellm_params), each with the kind of token it
# prices (ledger/tokens.py); each may also be given for requests past a threshold of input tokens,
# as `<key>_above_<N>[k]_tokens` (LiteLLM's tiered keys: `input_cost_per_token_above_200k_tokens`).
PRICE_KEYS: Final[dict[str, TokenKind]] = {
    "input_cost_per_token": "input",
    "output_cost_per_token": "output",
    "cache_read_input_token_cost": "cache_read",
    "cache_creation_input_token_cost": "cache_write",
    "input_cost_per_audio_token": "input_audio",
    "output_cost_per_audio_token": "output_audio",
    "input_cost_per_image_token": "input_image",
    "output_cost_per_image_token": "output_image",
    "output_cost_per_reasoning_token": "reasoning",
}
_TIERED_PRICE_KEY: Final = re.compile(rf"({'|'.join(PRICE_KEYS)})_above_([0-9]{{1,9}})(k?)_tokens")


def tier_of_price_key(key: str) -> tuple[str, int] | None:
    """A tiered price key's base key and threshold (`…_above_128k_tokens` → 128,000), else None."""
    found = _TIERED_PRICE_KEY.fullmatch(key)
    if found is None:
        return None
    return found[1], int(found[2]) * (1000 if found[3] else 1)


_MODEL_INFO: Final = {
    "id",
    *PRICE_KEYS,
    "max_tokens",
    "max_output_tokens",
    "max_input_tokens",
    "mode",
    "base_model",
    "description",
}


# Keys a LiteLLM config may hold that are read without error and have no effect here yet: named
# in one start-up warning when a config sets them.
NOT_IMPLEMENTED: Final = {
    "litellm_settings.": ("failure_callback", "drop_params", "set_verbose"),
    "general_settings.": ("alerting_threshold", "proxy_batch_write_at", "store_model_in_db"),
    "litellm_params.": ("organization", "mock_response"),
    "model_info.": ("mode", "description"),
}


def _note_not_implemented(section: Mapping[str, Any], prefix: str, warnings: list[str], label: str = "") -> None:
    """Add the keys of `section` that are accepted but not implemented to the one warning."""
    keys = [k for k in NOT_IMPLEMENTED.get(prefix, ()) if k in section]
    _into_one_warning("config keys accepted but not implemented (no effect): ", [f"{label}{prefix}{k}" for k in keys], warnings)


def _into_one_warning(head: str, names: list[str], warnings: list[str]) -> None:
    """Names go into the one warning that starts with `head` (each name once), not one per section."""
    if not names:
        return
    for index, warning in enumerate(warnings):
        if warning.startswith(head):
            warnings[index] = head + ", ".join(dict.fromkeys(warning.removeprefix(head).split(", ") + names))
            return
    warnings.append(head + ", ".join(dict.fromkeys(names)))


def _repr_hiding(struct: msgspec.Struct, *secrets: str) -> str:
    """A Struct's repr with its secrets (keys, a URL that may hold a password) shown as `***`."""
    shown = (
        f"{name}={'***' if name in secrets and getattr(struct, name) is not None else repr(getattr(struct, name))}"
        for name in struct.__struct_fields__
    )
    return f"{type(struct).__name__}({', '.join(shown)})"


class Deployment(msgspec.Struct, frozen=True, kw_only=True):
    """One `model_list` entry: a concrete upstream behind a model group name."""

    model_name: str
    deployment_id: str
    provider: str  # the model's prefix: its row in ledger/providers.py
    upstream_model: str
    api_base: str | None
    api_key: str | None = None
    wire: WireFormat = "openai"  # the API the provider speaks (ledger/providers.py)
    api_version: str | None = None  # Azure's api-version
    azure_ad_token: str | None = None  # Azure: an Entra ID token, sent as a bearer token without api_key
    base_model: str | None = None  # model_info.base_model: the model the catalogue prices it as
    # Enforced across processes in PostgreSQL (api/deployment_limits.py); they also weigh
    # simple-shuffle when no deployment of the group sets a `weight`.
    rpm: int | None = None
    tpm: int | None = None
    weight: int | None = None  # simple-shuffle's share of the group's requests
    timeout_s: float = 600.0  # its own `timeout`, else router_settings.timeout / request_timeout
    stream_timeout_s: float | None = None  # a streaming request's, if set (else timeout_s)
    max_retries: int = 0  # retries on this same deployment before the router moves on
    input_cost_per_token: Decimal | None = None
    output_cost_per_token: Decimal | None = None
    # The other LiteLLM price keys given (PRICE_KEYS, and their tiered forms), by key.
    prices: dict[str, Decimal] = {}
    max_output_tokens: int | None = None
    max_input_tokens: int | None = None

    def __repr__(self) -> str:  # the provider's key never reaches a log line
        return _repr_hiding(self, "api_key", "azure_ad_token")


class LagoSettings(msgspec.Struct, frozen=True, kw_only=True):
    api_base: str
    api_key: str
    event_code: str
    charge_by: str  # end_user_id | user_id | team_id
    # Lago's HMAC signature token (Developers > Webhooks), for its webhooks signed with `hmac`;
    # those signed with `jwt` are checked with the public key Lago serves.
    webhook_hmac_key: str | None = None

    def __repr__(self) -> str:  # the API key and the HMAC key never reach a log line
        return f"LagoSettings(api_base={self.api_base!r}, event_code={self.event_code!r}, charge_by={self.charge_by!r})"


class WebhookSettings(msgspec.Struct, frozen=True, kw_only=True):
    url: str
    secret: str | None = None

    def __repr__(self) -> str:
        return f"WebhookSettings(url={self.url!r}, signed={self.secret is not None})"


CHARGE_BY: Final = ("end_user_id", "user_id", "team_id")

# LiteLLM's names (master_key_boot_check.py); ledger.master_key says what a weak or unset key does.
MASTER_KEY_ENV: Final = "LITELLM_MASTER_KEY"
PERMIT_WEAK_MASTER_KEY_SETTING: Final = "dangerously_permit_weak_or_unset_master_key"
PERMIT_WEAK_MASTER_KEY_ENV: Final = "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY"


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    deployments: tuple[Deployment, ...]
    master_key: str | None = None
    master_key_source: str = "general_settings.master_key"  # where it was looked for (never the key)
    weak_master_key_permitted_by: str | None = None  # the setting that permits a weak or unset key
    database_url: str | None = None
    callbacks: tuple[str, ...] = ()
    alerting: tuple[str, ...] = ()
    max_end_user_budget_id: str | None = None
    max_budget: Decimal | None = None
    budget_duration: str | None = None
    timezone: str = "UTC"  # budget periods begin at midnight here (ledger/budget_calendar.py)
    json_logs: bool | None = None  # LiteLLM's: JSON log lines (True), readable ones, or by terminal (None)
    max_request_size_mb: Decimal = Decimal(32)
    reject_unpriced_models: bool = False
    # Refuse a request whose hold had to assume a default bound (ledger/holds.py) rather than
    # admit it on an assumption: no max_tokens and no known output limit, or a media part and no
    # known input limit.
    reject_unbounded_requests: bool = False
    budget_leases: bool = True  # admit from budget leased to the process (ledger/leases.py)
    # Browsers' cross-origin access, as LiteLLM sets it (_cors below): any origin, no credentials.
    # Budgets an operator marks for gauges (`team:<id>`, `key:<sha256>`, `user:<id>`, `customer:<id>`, `global`).
    budget_gauges: tuple[tuple[str, str], ...] = ()
    database_pool_limit: int = 10  # general_settings.database_connection_pool_limit: connections per process
    cors_origins: tuple[str, ...] = ("*",)
    cors_allow_credentials: bool = False
    request_timeout_s: float = 600.0
    router: RouterSettings = DEFAULT_ROUTER_SETTINGS
    lago: LagoSettings | None = None
    webhook: WebhookSettings | None = None
    warnings: tuple[str, ...] = ()

    def __repr__(self) -> str:  # nor the master key, nor a database password
        return _repr_hiding(self, "master_key", "database_url")

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(d.model_name for d in self.deployments))

    @property
    def has_sinks(self) -> bool:
        """Whether anything is delivered from the outbox (Lago, webhooks): else no publisher runs."""
        return self.lago is not None or self.webhook is not None

    @property
    def max_request_size_bytes(self) -> int:
        return int(self.max_request_size_mb * 1024 * 1024)

    def budget_settings(self) -> BudgetSettings:
        """The budget settings every request shares (built once, at start)."""
        return BudgetSettings(
            default_budget_id=self.max_end_user_budget_id,
            global_max_budget=self.max_budget,
            global_budget_duration=self.budget_duration,
        )


class _DecimalLoader(yaml.SafeLoader):
    """YAML loader that reads `0.0000015` as Decimal('0.0000015'), not as a float."""


def _construct_decimal(loader: yaml.SafeLoader, node: yaml.Node) -> Decimal:
    text = str(loader.construct_scalar(node)).replace("_", "")  # type: ignore[arg-type]
    if text.lower().lstrip("+-") in (".inf", ".nan"):
        raise ConfigError(f"non-finite number {text!r} in config")
    return Decimal(text)


_DecimalLoader.add_constructor("tag:yaml.org,2002:float", _construct_decimal)


def load_settings(path: str | Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate a config file; raise ConfigError with a message a person can act on."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        raw = yaml.load(text, Loader=_DecimalLoader)
    except yaml.YAMLError as exc:
        # One line: PyYAML's own message spans several, with a snippet of the file.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if environ is None and isinstance(raw, dict):  # LiteLLM exports them: DATABASE_URL too
        os.environ.update(_environment_variables(raw.get("environment_variables"), str(path)))
    return parse_settings(raw or {}, os.environ if environ is None else environ, source=str(path))


def parse_settings(raw: Any, environ: Mapping[str, str], source: str = "config") -> Settings:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with 'model_list'")
    warnings: list[str] = []
    unknown = sorted(set(raw) - _TOP_LEVEL, key=str)
    environ = {**environ, **_environment_variables(raw.get("environment_variables"), source)}
    resolved = _resolve_env(raw, environ, warnings, source)
    litellm = _section(resolved, "litellm_settings", source)
    general = _section(resolved, "general_settings", source)
    router_section = _section(resolved, "router_settings", source)
    _note_not_implemented(litellm, "litellm_settings.", warnings)
    _note_not_implemented(general, "general_settings.", warnings)
    _note_unknown(unknown, "", warnings)
    _note_unknown(sorted(set(litellm) - _LITELLM_SETTINGS, key=str), "litellm_settings.", warnings)
    _note_unknown(sorted(set(general) - _GENERAL_SETTINGS, key=str), "general_settings.", warnings)
    _note_unknown(sorted(set(router_section) - ROUTER_KEYS, key=str), "router_settings.", warnings)
    router = parse_router_settings(router_section, litellm, _model_names(resolved.get("model_list")), source)
    deployments = _parse_model_list(resolved.get("model_list"), environ, warnings, source, router)
    callbacks = string_list(litellm.get("callbacks"), "litellm_settings.callbacks", source)
    callbacks += string_list(litellm.get("success_callback"), "litellm_settings.success_callback", source)
    alerting = string_list(general.get("alerting"), "general_settings.alerting", source)
    budget_duration = litellm.get("budget_duration")
    if budget_duration is not None:
        check_duration(budget_duration, "litellm_settings.budget_duration", source)
    return Settings(
        deployments=deployments,
        **_master_key(raw, general, environ, source),
        database_url=optional_str(general.get("database_url"), "general_settings.database_url", source),
        callbacks=tuple(dict.fromkeys(callbacks)),
        alerting=tuple(alerting),
        max_end_user_budget_id=optional_str(
            litellm.get("max_end_user_budget_id"), "litellm_settings.max_end_user_budget_id", source
        ),
        max_budget=optional_money(litellm.get("max_budget"), "litellm_settings.max_budget", source),
        budget_duration=budget_duration,
        timezone=_timezone(litellm.get("timezone", "UTC"), source),
        json_logs=None if litellm.get("json_logs") is None else flag(litellm["json_logs"], "litellm_settings.json_logs", source),
        max_request_size_mb=positive_money(
            general.get("max_request_size_mb", 32), "general_settings.max_request_size_mb", source
        ),
        reject_unpriced_models=flag(
            general.get("reject_unpriced_models", False), "general_settings.reject_unpriced_models", source
        ),
        reject_unbounded_requests=flag(
            general.get("reject_unbounded_requests", False),
            "general_settings.reject_unbounded_requests",
            source,
        ),
        budget_leases=flag(general.get("budget_leases", True), "general_settings.budget_leases", source),
        **_cors(general, environ, source),
        database_pool_limit=_pool_limit(general.get("database_connection_pool_limit", 10), source),
        budget_gauges=_budget_gauges(general.get("budget_gauges"), source),
        request_timeout_s=positive_float(
            litellm.get("request_timeout", 600), "litellm_settings.request_timeout", source
        ),
        router=router,
        lago=_lago_settings(callbacks, environ, source),
        webhook=_webhook_settings(alerting, environ, source),
        warnings=tuple(warnings),
    )


def _budget_gauges(value: Any, source: str) -> tuple[tuple[str, str], ...]:
    """`general_settings.budget_gauges`: `scope:id` marks (`global` alone for the global budget)."""
    marks: list[tuple[str, str]] = []
    for item in string_list(value, "general_settings.budget_gauges", source):
        scope, _, scope_id = item.partition(":")
        if item == "global":
            marks.append(("global", "global"))
        elif scope in ("key", "user", "team", "customer") and scope_id.strip():
            marks.append((scope, scope_id))
        else:
            raise ConfigError(
                f"{source}: general_settings.budget_gauges entry {item[:60]!r} must be key:<sha256>, user:<id>, "
                "team:<id>, customer:<id> or global"
            )
    return tuple(dict.fromkeys(marks))


def _pool_limit(value: Any, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).strip().isdigit():
        raise ConfigError(f"{source}: general_settings.database_connection_pool_limit must be a whole number from 2 to 1000")
    limit = int(str(value).strip())
    if not 2 <= limit <= 1000:
        raise ConfigError(f"{source}: general_settings.database_connection_pool_limit must be a whole number from 2 to 1000")
    return limit


def _environment_variables(value: Any, source: str) -> dict[str, str]:
    """`environment_variables`: set before anything else is read, as LiteLLM exports them (they may
    name the LAGO_*, WEBHOOK_* or a key an `os.environ/` reference reads)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str | int | Decimal | bool) for k, v in value.items()
    ):
        raise ConfigError(f"{source}: 'environment_variables' must map names to strings")
    return {k: str(v) for k, v in value.items()}


def _cors(general: Mapping[str, Any], environ: Mapping[str, str], source: str) -> dict[str, Any]:
    """LiteLLM's CORS: LITELLM_CORS_ORIGINS (comma-separated; else general_settings.cors_origins;
    else any origin) and LITELLM_CORS_ALLOW_CREDENTIALS (else general_settings.cors_allow_credentials;
    else credentials only when the origins are named: with any origin they would let every site
    make credentialed requests)."""
    raw = environ.get("LITELLM_CORS_ORIGINS", "").strip()
    if raw:
        origins = [o.strip() for o in raw.split(",") if o.strip()]
    else:
        origins = string_list(general.get("cors_origins"), "general_settings.cors_origins", source) or ["*"]
    for origin in origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ConfigError(f"{source}: CORS origin {origin[:60]!r} must be '*' or start with http:// or https://")
    credentials = environ.get("LITELLM_CORS_ALLOW_CREDENTIALS", "").strip() or general.get("cors_allow_credentials")
    allow = "*" not in origins if credentials is None else flag(credentials, "cors_allow_credentials", source)
    return {"cors_origins": tuple(origins), "cors_allow_credentials": allow}


def _timezone(value: Any, source: str) -> str:
    """An IANA zone name (`Europe/Berlin`, `UTC`), as LiteLLM's `timezone` takes it."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{source}: litellm_settings.timezone must be a time zone name such as 'Europe/Berlin'")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"{source}: litellm_settings.timezone {value[:60]!r} is not a time zone name (e.g. 'Europe/Berlin', 'UTC')"
        ) from None
    return value


def _model_names(value: Any) -> tuple[str, ...]:
    """The model groups a model_list names (checked in full by _parse_model_list)."""
    entries = value if isinstance(value, list) else []
    names = (e.get("model_name") for e in entries if isinstance(e, dict))
    return tuple(dict.fromkeys(n for n in names if isinstance(n, str)))


def _parse_model_list(
    value: Any,
    environ: Mapping[str, str],
    warnings: list[str],
    source: str,
    router: RouterSettings = DEFAULT_ROUTER_SETTINGS,
) -> tuple[Deployment, ...]:
    if value is None:
        raise ConfigError(f"{source}: 'model_list' is missing: list at least one model")
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{source}: 'model_list' must be a non-empty list of models")
    deployments = []
    for index, entry in enumerate(value):
        where = f"{source}: model_list[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a mapping with model_name and litellm_params")
        deployments.append(_parse_deployment(entry, where, environ, warnings, router))
    return tuple(deployments)


def _parse_deployment(
    entry: dict[str, Any],
    where: str,
    environ: Mapping[str, str],
    warnings: list[str],
    router: RouterSettings = DEFAULT_ROUTER_SETTINGS,
) -> Deployment:
    model_name = entry.get("model_name")
    if not isinstance(model_name, str) or not model_name.strip():
        raise ConfigError(f"{where}: 'model_name' must be a non-empty string")
    params = entry.get("litellm_params")
    if not isinstance(params, dict):
        raise ConfigError(f"{where} ({model_name}): 'litellm_params' must be a mapping with 'model'")
    info = entry.get("model_info") or {}
    if not isinstance(info, dict):
        raise ConfigError(f"{where} ({model_name}): 'model_info' must be a mapping")
    _note_not_implemented(params, "litellm_params.", warnings, f"{model_name}.")
    _note_not_implemented(info, "model_info.", warnings, f"{model_name}.")
    _note_unknown(
        sorted((k for k in set(params) - _LITELLM_PARAMS if not _is_price_key(k)), key=str),
        f"{model_name}.litellm_params.",
        warnings,
    )
    _note_unknown(
        sorted((k for k in set(info) - _MODEL_INFO if not _is_price_key(k)), key=str),
        f"{model_name}.model_info.",
        warnings,
    )
    model = params.get("model")
    if not isinstance(model, str) or not model.strip():
        raise ConfigError(
            f"{where} ({model_name}): 'litellm_params.model' must be a string like 'openai/gpt-4o'"
        )
    provider, _, upstream_model = model.partition("/")
    if not upstream_model:
        provider, upstream_model = "openai", model
    spec = PROVIDERS.get(provider)
    if spec is None:
        raise ConfigError(
            f"{where} ({model_name}): provider '{provider}' is not supported; "
            f"use one of {', '.join(sorted(PROVIDERS))} (any OpenAI-compatible API works as 'openai/')"
        )
    ctx = f"{where} ({model_name})"
    endpoint = resolve_endpoint(spec, params, environ, ctx)
    explicit_id = info.get("id")
    deployment_id = str(explicit_id) if explicit_id is not None else _stable_id(model_name, model, endpoint.written_base)
    return Deployment(
        model_name=model_name,
        deployment_id=deployment_id,
        provider=provider,
        upstream_model=upstream_model_name(spec, upstream_model),
        api_base=endpoint.api_base,
        api_key=endpoint.api_key,
        wire=spec.wire,
        api_version=endpoint.api_version,
        azure_ad_token=endpoint.azure_ad_token,
        base_model=optional_str(info.get("base_model"), f"{ctx}.model_info.base_model", ""),
        rpm=optional_int(params.get("rpm"), f"{ctx}.rpm"),
        tpm=optional_int(params.get("tpm"), f"{ctx}.tpm"),
        weight=optional_positive_int(params.get("weight"), f"{ctx}.weight"),
        timeout_s=router.timeout_s
        if params.get("timeout") is None
        else positive_float(params["timeout"], f"{ctx}.timeout", ""),
        stream_timeout_s=_stream_timeout(params.get("stream_timeout"), router, f"{ctx}.stream_timeout"),
        max_retries=optional_int(params.get("max_retries"), f"{ctx}.max_retries") or 0,
        input_cost_per_token=optional_money(
            info.get("input_cost_per_token", params.get("input_cost_per_token")),
            f"{ctx}.input_cost_per_token",
            "",
        ),
        output_cost_per_token=optional_money(
            info.get("output_cost_per_token", params.get("output_cost_per_token")),
            f"{ctx}.output_cost_per_token",
            "",
        ),
        prices=_other_prices(params, info, ctx),
        max_output_tokens=optional_positive_int(
            info.get("max_output_tokens", info.get("max_tokens")), f"{ctx}.max_output_tokens"
        ),
        max_input_tokens=optional_positive_int(info.get("max_input_tokens"), f"{ctx}.max_input_tokens"),
    )


def _stream_timeout(value: Any, router: RouterSettings, name: str) -> float | None:
    if value is None:
        return router.stream_timeout_s
    return positive_float(value, name, "")


def _is_price_key(key: object) -> bool:
    return isinstance(key, str) and (key in PRICE_KEYS or tier_of_price_key(key) is not None)


def _other_prices(params: dict[str, Any], info: dict[str, Any], ctx: str) -> dict[str, Decimal]:
    """The price keys besides the flat input and output ones, `model_info` over `litellm_params`."""
    prices: dict[str, Decimal] = {}
    for key in sorted({*params, *info} - {"input_cost_per_token", "output_cost_per_token"}, key=str):
        if _is_price_key(key):
            amount = optional_money(info.get(key, params.get(key)), f"{ctx}.{key}", "")
            if amount is not None:
                prices[key] = amount
    return prices


def _stable_id(*parts: Any) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:16]


def _resolve_env(value: Any, environ: Mapping[str, str], warnings: list[str], source: str) -> Any:
    """Replace every `os.environ/NAME` string with the variable's value (None when unset)."""
    if isinstance(value, dict):
        return {k: _resolve_env(v, environ, warnings, source) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_env(v, environ, warnings, source) for v in value]
    if isinstance(value, str) and value.startswith("os.environ/"):
        name = value.removeprefix("os.environ/")
        if name not in environ:
            warnings.append(f"environment variable {name} is not set (referenced in {source})")
            return None
        return environ[name]
    return value


def _master_key(
    raw: dict[str, Any], general: dict[str, Any], environ: Mapping[str, str], source: str
) -> dict[str, Any]:
    """LiteLLM's rule: general_settings.master_key when the config has it (an `os.environ/` reference
    to an unset variable reads as unset), else env LITELLM_MASTER_KEY; and who permits a weak one."""
    if "master_key" in general:
        key = optional_str(general["master_key"], "general_settings.master_key", source)
        written = (raw.get("general_settings") or {}).get("master_key")
        where = "general_settings.master_key"
        if isinstance(written, str) and written.startswith("os.environ/"):
            where += f" = {written}"
    else:
        key, where = (
            environ.get(MASTER_KEY_ENV),
            f"env {MASTER_KEY_ENV}; general_settings.master_key is absent",
        )
    return {
        "master_key": key,
        "master_key_source": where,
        "weak_master_key_permitted_by": _weak_key_permission(general, environ, source),
    }


def _weak_key_permission(general: dict[str, Any], environ: Mapping[str, str], source: str) -> str | None:
    setting = general.get(PERMIT_WEAK_MASTER_KEY_SETTING, False)
    if not isinstance(setting, bool | str) or _litellm_bool(setting) is None:
        raise ConfigError(
            f"{source}: general_settings.{PERMIT_WEAK_MASTER_KEY_SETTING} must be true or false"
        )
    if _litellm_bool(setting):
        return f"general_settings.{PERMIT_WEAK_MASTER_KEY_SETTING}"
    # As LiteLLM's str_to_bool: only "true" (any case, spaces around) turns it on.
    if _litellm_bool(environ.get(PERMIT_WEAK_MASTER_KEY_ENV, "")):
        return f"env {PERMIT_WEAK_MASTER_KEY_ENV}"
    return None


def _litellm_bool(value: bool | str) -> bool | None:
    if isinstance(value, bool):
        return value
    text = value.strip().lower()
    return True if text == "true" else False if text in ("false", "") else None


def _section(raw: dict[str, Any], name: str, source: str) -> dict[str, Any]:
    value = raw.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: '{name}' must be a mapping")
    return value


def _note_unknown(keys: list[str], prefix: str, warnings: list[str]) -> None:
    """All unknown keys of the file go into one warning (each name once), not one per section."""
    _into_one_warning("ignored unknown config keys: ", [prefix + str(k) for k in keys], warnings)


def _lago_settings(callbacks: list[str], environ: Mapping[str, str], source: str) -> LagoSettings | None:
    """`callbacks: ["lago"]` needs LAGO_API_BASE, LAGO_API_KEY and LAGO_API_EVENT_CODE."""
    if "lago" not in callbacks:
        return None
    required = ("LAGO_API_BASE", "LAGO_API_KEY", "LAGO_API_EVENT_CODE")
    missing = [name for name in required if not environ.get(name)]
    if missing:
        raise ConfigError(
            f"{source}: callbacks include 'lago' but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set in the environment"
        )
    charge_by = environ.get("LAGO_API_CHARGE_BY") or "end_user_id"
    if charge_by not in CHARGE_BY:
        raise ConfigError(f"LAGO_API_CHARGE_BY must be one of {', '.join(CHARGE_BY)}, got {charge_by!r}")
    return LagoSettings(
        api_base=environ["LAGO_API_BASE"],
        api_key=environ["LAGO_API_KEY"],
        event_code=environ["LAGO_API_EVENT_CODE"],
        charge_by=charge_by,
        webhook_hmac_key=environ.get("LAGO_WEBHOOK_HMAC_KEY") or None,
    )


def _webhook_settings(alerting: list[str], environ: Mapping[str, str], source: str) -> WebhookSettings | None:
    """`alerting: ["webhook"]` needs WEBHOOK_URL; WEBHOOK_SECRET (`whsec_…`) turns on signatures."""
    if "webhook" not in alerting:
        return None
    url = environ.get("WEBHOOK_URL")
    if not url:
        raise ConfigError(
            f"{source}: alerting includes 'webhook' but WEBHOOK_URL is not set in the environment"
        )
    secret = environ.get("WEBHOOK_SECRET") or None
    if secret is not None:
        from standardwebhooks.webhooks import Webhook

        try:
            Webhook(secret)
        except Exception:
            raise ConfigError(
                "WEBHOOK_SECRET is not a valid Standard Webhooks secret (whsec_ + base64)"
            ) from None
    return WebhookSettings(url=url, secret=secret)
