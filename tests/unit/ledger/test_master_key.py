"""The master key's verdict (ledger/master_key.py): where the key comes from, LiteLLM's rule for
which keys refuse to start, and who may permit them."""

from __future__ import annotations

from typing import Any

import pytest

from spendledger.ledger.config import ConfigError, Settings, parse_settings
from spendledger.ledger.master_key import MasterKeyVerdict, Weakness, master_key_verdict, serving_master_key

STRONG = "sk-9f2c7e4b1a0d83f6c5e2b9a7d4f1c8e3"
PERMIT_ENV = "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY"


def settings(general: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> Settings:
    raw: dict[str, Any] = {
        "model_list": [{"model_name": "m", "litellm_params": {"model": "mock/m"}}],
    }
    if general is not None:
        raw["general_settings"] = general
    return parse_settings(raw, env or {})


def verdict(general: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> MasterKeyVerdict:
    return master_key_verdict(settings(general, env))


def test_a_key_of_ones_own_is_safe_from_the_config_or_the_environment() -> None:
    for chosen in (
        settings({"master_key": STRONG}),
        settings({}, {"LITELLM_MASTER_KEY": STRONG}),
        settings({"master_key": "os.environ/MY_KEY"}, {"MY_KEY": STRONG}),
        settings({"master_key": "sk-1"}),  # short, but not a publicly known one: LiteLLM's rule
    ):
        result = master_key_verdict(chosen)
        assert result.weakness is None and not result.refused and not result.open
        assert result.warning() is None and result.auth_state() == "master_key"
    assert settings({}, {"LITELLM_MASTER_KEY": STRONG}).master_key == STRONG


def test_the_config_wins_over_the_environment_as_in_litellm() -> None:
    chosen = settings({"master_key": STRONG}, {"LITELLM_MASTER_KEY": "sk-from-the-environment"})
    assert chosen.master_key == STRONG
    # Present but pointing at an unset variable: unset, even though LITELLM_MASTER_KEY is set.
    pointed = settings({"master_key": "os.environ/UNSET_NAME"}, {"LITELLM_MASTER_KEY": STRONG})
    assert pointed.master_key is None
    assert master_key_verdict(pointed).weakness is Weakness.NOT_SET
    assert "os.environ/UNSET_NAME" in master_key_verdict(pointed).refusal()


@pytest.mark.parametrize(
    ("general", "env", "weakness"),
    [
        (None, {}, Weakness.NOT_SET),
        ({"master_key": None}, {}, Weakness.NOT_SET),
        ({"master_key": "os.environ/LITELLM_MASTER_KEY"}, {}, Weakness.NOT_SET),
        ({"master_key": ""}, {}, Weakness.EMPTY),
        ({"master_key": "   "}, {}, Weakness.EMPTY),
        ({}, {"LITELLM_MASTER_KEY": ""}, Weakness.EMPTY),
        ({"master_key": "sk-1234"}, {}, Weakness.PUBLICLY_KNOWN),
        ({"master_key": " sk-1234 "}, {}, Weakness.PUBLICLY_KNOWN),
        ({}, {"LITELLM_MASTER_KEY": "sk-1234"}, Weakness.PUBLICLY_KNOWN),
    ],
)
def test_unset_empty_and_publicly_known_keys_are_refused_with_one_line_naming_the_fix(
    general: dict[str, Any] | None, env: dict[str, str], weakness: Weakness
) -> None:
    result = verdict(general, env)
    assert result.weakness is weakness and result.refused
    line = result.refusal()
    assert "\n" not in line
    assert "LITELLM_MASTER_KEY" in line and "openssl rand -hex 32" in line
    assert PERMIT_ENV in line and "dangerously_permit_weak_or_unset_master_key" in line
    assert "sk-1234" not in line  # the key itself is never repeated, not even a public one
    assert result.open is (weakness is not Weakness.PUBLICLY_KNOWN)


@pytest.mark.parametrize(
    ("general", "env", "by"),
    [
        ({"dangerously_permit_weak_or_unset_master_key": True}, {}, "general_settings."),
        ({"dangerously_permit_weak_or_unset_master_key": "true"}, {}, "general_settings."),
        ({}, {PERMIT_ENV: "true"}, "env "),
        ({}, {PERMIT_ENV: " TRUE "}, "env "),
        ({}, {PERMIT_ENV: "True"}, "env "),
    ],
)
def test_the_operator_may_permit_an_unset_key(general: dict[str, Any], env: dict[str, str], by: str) -> None:
    result = verdict(general, env)
    assert result.weakness is Weakness.NOT_SET and not result.refused and result.open
    assert result.permitted_by is not None and result.permitted_by.startswith(by)
    warning = result.warning()
    assert warning is not None and "every caller is the admin" in warning
    assert result.auth_state().startswith("open: no master key (permitted by ")


def test_a_permitted_publicly_known_key_serves_with_a_warning_and_stays_a_key() -> None:
    result = verdict({"master_key": "sk-1234", "dangerously_permit_weak_or_unset_master_key": True})
    assert result.weakness is Weakness.PUBLICLY_KNOWN and not result.refused and not result.open
    warning = result.warning()
    assert warning is not None and "sk-1234" not in warning and "publicly known" in warning
    assert result.auth_state().startswith("weak: publicly known master key (permitted by ")


@pytest.mark.parametrize("value", ["1", "yes", "on", "y", "enabled", "false", "", "truee"])
def test_only_true_in_the_environment_permits_as_litellms_str_to_bool(value: str) -> None:
    assert verdict({}, {PERMIT_ENV: value}).refused


@pytest.mark.parametrize("value", ["yes", 1, [True]])
def test_a_setting_that_is_not_a_boolean_is_a_config_error(value: Any) -> None:
    with pytest.raises(ConfigError, match="dangerously_permit_weak_or_unset_master_key"):
        settings({"dangerously_permit_weak_or_unset_master_key": value})


def test_the_setting_is_known_to_the_config_reader() -> None:
    chosen = settings({"master_key": STRONG, "dangerously_permit_weak_or_unset_master_key": False})
    assert not [w for w in chosen.warnings if "unknown" in w]
    assert chosen.weak_master_key_permitted_by is None


def test_the_key_callers_present() -> None:
    assert serving_master_key(settings({"master_key": STRONG})) == STRONG
    assert serving_master_key(settings({"master_key": "  "})) is None  # empty counts as none
    assert serving_master_key(settings()) is None
