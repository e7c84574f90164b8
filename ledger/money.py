"""Exact money.

Money is a `decimal.Decimal` in Python and `NUMERIC` (no scale limit) in PostgreSQL. A float never
touches money: prices from YAML are read as Decimal (see `ledger.config`), costs are
`tokens × price` computed with a context wide enough that no digit is ever rounded away.
"""

from __future__ import annotations

import decimal
from decimal import Decimal
from typing import Final

# 60 significant digits: a token count (≤ 10^12) times a price with ≤ 30 significant digits fits
# without rounding, and so does the sum of a billion such costs.
MONEY_CONTEXT: Final = decimal.Context(
    prec=60,
    rounding=decimal.ROUND_HALF_EVEN,
    traps=[
        decimal.InvalidOperation,
        decimal.Inexact,
        decimal.Overflow,
        decimal.DivisionByZero,
    ],
)

ZERO: Final = Decimal(0)


class MoneyError(ValueError):
    """A value that cannot be an amount of money (float noise aside, e.g. NaN or Infinity)."""


def to_money(value: object) -> Decimal:
    """Exact Decimal from an int, a Decimal or a decimal string; floats are refused.

    A float's binary value is not what a person typed, so it has no place in money: the config
    loader and the JSON decoders hand us Decimal or str instead.
    """
    if isinstance(value, bool):
        raise MoneyError(f"not an amount of money: {value!r}")
    if isinstance(value, Decimal):
        amount = value
    elif isinstance(value, int):
        amount = Decimal(value)
    elif isinstance(value, str):
        try:
            amount = Decimal(value.strip())
        except decimal.InvalidOperation:
            raise MoneyError(f"not an amount of money: {value!r}") from None
    else:
        raise MoneyError(f"not an amount of money: {value!r} ({type(value).__name__})")
    if not amount.is_finite():
        raise MoneyError(f"not a finite amount of money: {value!r}")
    return amount


def cost_of(tokens: int, price_per_token: Decimal) -> Decimal:
    """tokens × price, exactly (the context traps any rounding)."""
    return MONEY_CONTEXT.multiply(Decimal(tokens), price_per_token)


def add(*amounts: Decimal) -> Decimal:
    total = ZERO
    for amount in amounts:
        total = MONEY_CONTEXT.add(total, amount)
    return total


def format_money(amount: Decimal) -> str:
    """Plain decimal digits, no exponent, no trailing zeros: `0.000032`, `12`, `0`."""
    text = format(amount, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text
