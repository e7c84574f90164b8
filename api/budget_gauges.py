"""Gauges of what is left of the budgets an operator marks (`general_settings.budget_gauges`),
refreshed by every serving process (the same value from each: multiprocess mode shows the latest).

`spendledger_budget_remaining{scope,scope_id}` and `spendledger_budget_max{scope,scope_id}`, and
LiteLLM's names for teams and keys: `litellm_remaining_team_budget_metric{team}`,
`litellm_remaining_api_key_budget_metric{hashed_api_key}`. Marks are few by design: a gauge per
scope would grow with every customer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Final

import asyncpg
from prometheus_client import Gauge

from spendledger.api.metrics import sample
from spendledger.ledger.connections import DATABASE_ERRORS
from spendledger.ledger.scopes import BudgetSettings
from spendledger.projections.budgets_remaining import Mark, Remaining, budgets_remaining

EVERY_S: Final = 5.0

REMAINING: Final = Gauge(
    "spendledger_budget_remaining", "What is left of a marked budget in its current period, USD",
    ["scope", "scope_id"], multiprocess_mode="mostrecent",
)  # fmt: skip
LIMIT: Final = Gauge(
    "spendledger_budget_max", "A marked budget's limit, USD", ["scope", "scope_id"], multiprocess_mode="mostrecent"
)
TEAM_REMAINING: Final = Gauge(
    "litellm_remaining_team_budget_metric", "What is left of a marked team's budget, USD", ["team"],
    multiprocess_mode="mostrecent",
)  # fmt: skip
KEY_REMAINING: Final = Gauge(
    "litellm_remaining_api_key_budget_metric", "What is left of a marked key's budget, USD", ["hashed_api_key"],
    multiprocess_mode="mostrecent",
)  # fmt: skip


def observe(found: Sequence[Remaining]) -> None:
    for budget in found:
        REMAINING.labels(budget.scope, budget.scope_id).set(sample(budget.remaining))
        LIMIT.labels(budget.scope, budget.scope_id).set(sample(budget.max_budget))
        if budget.scope == "team":
            TEAM_REMAINING.labels(budget.scope_id).set(sample(budget.remaining))
        elif budget.scope == "key":
            KEY_REMAINING.labels(budget.scope_id).set(sample(budget.remaining))


class BudgetGauges:
    def __init__(self, pool: asyncpg.Pool, marks: Sequence[Mark], settings: BudgetSettings) -> None:
        self._pool = pool
        self._marks = list(marks)
        self._settings = settings
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._marks:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(*DATABASE_ERRORS):  # the database is away: the next beat tries again
                observe(await budgets_remaining(self._pool, self._marks, self._settings))
            await asyncio.sleep(EVERY_S)
