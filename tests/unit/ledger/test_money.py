"""`ledger.money`: exact Decimal money, floats refused, sums that never lose a digit."""

from __future__ import annotations

import decimal
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spendledger.ledger.money import ZERO, MoneyError, add, cost_of, format_money, to_money


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, Decimal(0)),
        (12, Decimal(12)),
        (-3, Decimal(-3)),
        ("0.0000015", Decimal("0.0000015")),
        ("  0.5 ", Decimal("0.5")),
        ("1e-7", Decimal("0.0000001")),
        (Decimal("0.30000000000000004"), Decimal("0.30000000000000004")),
    ],
)
def test_to_money_accepts_exact_values(value: object, expected: Decimal) -> None:
    amount = to_money(value)
    assert type(amount) is Decimal
    assert amount == expected


def test_to_money_keeps_the_digits_of_a_string() -> None:
    assert str(to_money("0.0000015")) == "0.0000015"
    assert to_money("0.1") != Decimal.from_float(0.1)


@pytest.mark.parametrize("value", [0.1, 1.0, 0.0, float("nan"), float("inf")])
def test_to_money_refuses_floats(value: float) -> None:
    with pytest.raises(MoneyError):
        to_money(value)


@pytest.mark.parametrize("value", [True, False])
def test_to_money_refuses_bools(value: bool) -> None:
    with pytest.raises(MoneyError):
        to_money(value)


@pytest.mark.parametrize(
    "value",
    [
        "NaN",
        "nan",
        "sNaN",
        "Infinity",
        "-Infinity",
        "inf",
        Decimal("NaN"),
        Decimal("Infinity"),
        Decimal("-Inf"),
    ],
)
def test_to_money_refuses_non_finite(value: object) -> None:
    with pytest.raises(MoneyError, match=r"finite|not an amount"):
        to_money(value)


@pytest.mark.parametrize("value", ["", "abc", "1,5", "0.1.2", None, [1], b"1", object()])
def test_to_money_refuses_garbage(value: object) -> None:
    with pytest.raises(MoneyError):
        to_money(value)


def test_money_error_is_a_value_error() -> None:
    assert issubclass(MoneyError, ValueError)


@pytest.mark.parametrize(
    ("amount", "text"),
    [
        (Decimal("0.000032"), "0.000032"),
        (Decimal("12"), "12"),
        (Decimal("12.000"), "12"),
        (Decimal("1.50"), "1.5"),
        (Decimal("0"), "0"),
        (Decimal("0E-10"), "0"),
        (Decimal("-0"), "0"),
        (Decimal("-0.000"), "0"),
        (Decimal("1E-7"), "0.0000001"),
        (Decimal("1.5E-7"), "0.00000015"),
        (Decimal("1E+3"), "1000"),
        (Decimal("100"), "100"),
        (Decimal("-2.50"), "-2.5"),
        (Decimal("0.0011120000000000001"), "0.0011120000000000001"),
    ],
)
def test_format_money(amount: Decimal, text: str) -> None:
    assert format_money(amount) == text
    assert "e" not in format_money(amount).lower()


def test_cost_of_is_exact() -> None:
    assert cost_of(1000, Decimal("0.0000015")) == Decimal("0.0015")
    assert cost_of(3, Decimal("0.1")) == Decimal("0.3")  # not 0.30000000000000004
    assert cost_of(0, Decimal("0.0000015")) == ZERO
    assert cost_of(10**12, Decimal("0.000000123456789012345678901234567")) == Decimal(
        "123456.789012345678901234567"
    )
    assert cost_of(7, Decimal("0.0011120000000000001")) == Decimal("0.0077840000000000007")


def test_cost_of_traps_rounding_rather_than_losing_digits() -> None:
    with pytest.raises(decimal.Inexact):
        cost_of(3, Decimal("0." + "1" * 70))


def test_add_is_exact() -> None:
    assert add() == ZERO
    assert add(Decimal("0.1"), Decimal("0.2")) == Decimal("0.3")
    assert add(Decimal("0.0000015"), Decimal("0.000002"), Decimal("1")) == Decimal("1.0000035")


prices = st.decimals(
    min_value=Decimal("0"), max_value=Decimal("1"), places=12, allow_nan=False, allow_infinity=False
)


@settings(max_examples=300, deadline=None, database=None)
@given(
    unit_tokens=st.integers(min_value=0, max_value=2_000_000),
    price=prices,
    n=st.integers(min_value=0, max_value=300),
)
def test_sum_of_n_costs_is_n_times_the_unit_cost(unit_tokens: int, price: Decimal, n: int) -> None:
    unit = cost_of(unit_tokens, price)
    total = add(*[cost_of(unit_tokens, price) for _ in range(n)])
    assert total == cost_of(n * unit_tokens, price)
    assert total == unit * n
    assert total == to_money(format_money(total))  # the printed form is the same amount


@settings(max_examples=200, deadline=None, database=None)
@given(tokens=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 10**9)), max_size=50), price=prices)
def test_cost_is_linear_in_tokens(tokens: list[tuple[int, int]], price: Decimal) -> None:
    summed = add(*[add(cost_of(a, price), cost_of(b, price)) for a, b in tokens])
    assert summed == cost_of(sum(a + b for a, b in tokens), price)
