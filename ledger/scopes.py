"""Who pays for a request: the scopes that govern it, and the budget settings every request shares.

A request is governed by up to five scopes (docs/budgets.md): its key, the key's internal user and
team, the customer it names, and the global budget. The first four differ per request (`Scopes`);
the global budget and the customers' default tier are the config's (`BudgetSettings`), the same
for every request a process serves. Admission, leases, settles and the webhook follower read both;
the events carry the four scopes as their own fields (`UsageRecorded.scopes` reads them back).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Final

import msgspec


class Scopes(msgspec.Struct, frozen=True, gc=False):
    """The per-request scopes, in the order admissions lock their rows. Hashable: admissions with
    the same scopes are batched together (ledger/admission.py), and leases are granted per scope
    set (ledger/leases.py)."""

    key_hash: str
    user_id: str | None = None
    team_id: str | None = None
    customer_id: str | None = None


class BudgetSettings(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The config's budget settings: the tier a customer seen for the first time is given
    (`litellm_settings.max_end_user_budget_id`) and the global budget (`max_budget`,
    `budget_duration`). Its fields are named as `sl_admit`, `sl_lease` and the settles read them."""

    default_budget_id: str | None = None
    global_max_budget: Decimal | None = None
    global_budget_duration: str | None = None


NO_BUDGETS: Final = BudgetSettings()
