"""`ledger.money` against PostgreSQL NUMERIC: the same sums, to the last digit."""

from __future__ import annotations

from decimal import Decimal

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spendledger.ledger.money import add, cost_of, format_money

prices = st.decimals(
    min_value=Decimal("0"), max_value=Decimal("1"), places=15, allow_nan=False, allow_infinity=False
)


@settings(
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    tokens=st.integers(min_value=0, max_value=5_000_000),
    price=prices,
    n=st.integers(min_value=0, max_value=400),
)
async def test_sum_of_n_costs_equals_n_times_unit_in_python_and_numeric(
    pool: asyncpg.Pool, tokens: int, price: Decimal, n: int
) -> None:
    unit = cost_of(tokens, price)
    python_sum = add(*[cost_of(tokens, price) for _ in range(n)])
    assert python_sum == unit * n

    row = await pool.fetchrow(
        "select coalesce(sum(c), 0) as total, $2::numeric * $3::bigint as product, "
        "$4::bigint * $5::numeric as unit "
        "from unnest($1::numeric[]) as c",
        [unit] * n,
        unit,
        n,
        tokens,
        price,
    )
    assert row["unit"] == unit
    assert row["total"] == python_sum
    assert row["product"] == python_sum
    # the text PostgreSQL prints is the same amount as our format
    text = await pool.fetchval("select trim_scale($1::numeric)::text", python_sum)
    assert Decimal(text) == python_sum
    assert format_money(Decimal(text)) == format_money(python_sum)


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    usages=st.lists(
        st.tuples(st.integers(0, 10**7), st.integers(0, 10**6), prices, prices), min_size=1, max_size=40
    )
)
async def test_mixed_costs_sum_identically_in_numeric(
    pool: asyncpg.Pool, usages: list[tuple[int, int, Decimal, Decimal]]
) -> None:
    costs = [add(cost_of(i, pin), cost_of(o, pout)) for i, o, pin, pout in usages]
    total = await pool.fetchval("select sum(c) from unnest($1::numeric[]) as c", costs)
    assert total == add(*costs)
    # and through jsonb, the way events carry money
    via_json = await pool.fetchval(
        "select sum((e->>'cost')::numeric) from jsonb_array_elements($1::jsonb) as e",
        "[" + ",".join('{"cost":' + format_money(c) + "}" for c in costs) + "]",
    )
    assert via_json == add(*costs)
