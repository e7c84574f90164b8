"""Reading one config value: the checks, and the messages that name where a value is wrong."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from spendledger.ledger.durations import DurationError, parse_duration
from spendledger.ledger.money import MoneyError, to_money


class ConfigError(ValueError):
    """The config file cannot be served; the message says where and why."""


def string_list(value: Any, name: str, source: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{source}: '{name}' must be a list of strings")
    return list(value)


def optional_str(value: Any, name: str, source: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise ConfigError(f"{source}: '{name}' must be a string".lstrip(": "))
    return str(value)


def flag(value: Any, name: str, source: str) -> bool:
    """A YAML bool, or the text of one (values read from the environment are strings)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", ""):
        return False
    raise ConfigError(f"{source}: {name} must be true or false, got {value!r}")


def number_text(value: Any) -> Any:
    """Numbers read from the environment arrive as text: read them as numbers."""
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return int(text)
        try:
            return Decimal(text)
        except ArithmeticError:
            return value
    return value


def optional_int(value: Any, name: str) -> int | None:
    value = number_text(value)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def optional_positive_int(value: Any, name: str) -> int | None:
    """A limit in tokens: a model that takes or writes 0 tokens would hold nothing."""
    number = optional_int(value, name)
    if number == 0:
        raise ConfigError(f"{name} must be a positive integer, got 0")
    return number


def optional_money(value: Any, name: str, source: str) -> Decimal | None:
    if value is None:
        return None
    try:
        amount = to_money(value)
    except MoneyError as exc:
        raise ConfigError(f"{source}: {name}: {exc}".lstrip(": ")) from None
    if amount < 0:
        raise ConfigError(f"{source}: {name} must not be negative, got {value}".lstrip(": "))
    return amount


def positive_money(value: Any, name: str, source: str) -> Decimal:
    amount = optional_money(value, name, source)
    if amount is None or amount <= 0:
        raise ConfigError(f"{source}: {name} must be a positive number, got {value!r}")
    return amount


def positive_float(value: Any, name: str, source: str) -> float:
    # A timeout is a duration, not money: float is right here.
    value = number_text(value)
    if isinstance(value, bool) or not isinstance(value, int | Decimal) or value <= 0:
        raise ConfigError(
            f"{source}: {name} must be a positive number of seconds, got {value!r}".lstrip(": ")
        )
    return float(value)


def check_duration(value: Any, name: str, source: str) -> None:
    try:
        parse_duration(value)
    except DurationError as exc:
        raise ConfigError(f"{source}: {name}: {exc}") from None
