"""scripts/bench/compare.py reads proxy.py's run table and sets the two sides side by side."""

from __future__ import annotations

import pytest

from scripts.bench.compare import Result, parse, summary

OUTPUT = """
| # | target | conns | requests | req/s | p50 ms | p99 ms | errors | CPU proxy | CPU postgres | CPU others | ledger check |
|---|---|---|---|---|---|---|---|---|---|---|---|
| 1 | direct | 64 | 1,232,659 | 123,243 | 0.50 | 1.17 | 0 | – | 0.00 | 0.01 | – |
| 2 | spendledger | 64 | 20,070 | 2,000 | 30.65 | 85.66 | 0 | 0.58 | 0.69 | 0.00 | 20,134 recorded |
"""


def test_the_spendledger_run_is_read_not_the_direct_one() -> None:
    assert parse("base", OUTPUT) == Result("base", 64, 2000.0, 30.65, 85.66)


def test_an_output_without_a_spendledger_run_stops_with_its_tail() -> None:
    with pytest.raises(SystemExit, match="no spendledger run"):
        parse("this", OUTPUT.replace("spendledger", "litellm"))


def test_the_summary_has_each_side_per_connection_count_with_its_means() -> None:
    results = [Result("base", 1, 400, 2.0, 6.0), Result("this", 1, 500, 1.5, 5.0),
               Result("base", 1, 600, 1.8, 6.0), Result("this", 1, 520, 1.7, 5.0)]  # fmt: skip
    assert summary(results).splitlines()[2:] == [
        "| 1 | base | 400, 600 | 500 | 2.00, 1.80 | 1.90 |",
        "| 1 | this | 500, 520 | 510 | 1.50, 1.70 | 1.60 |",
    ]
