"""Cooldowns: a deployment that failed more than `allowed_fails` times within a minute is passed
over for `cooldown_time` seconds (LiteLLM's allowed-fails rule; its defaults, 3 and 5 s).

Kept in this process's memory, as LiteLLM keeps them without Redis. What counts as a failure is
what LiteLLM cools down for — 429, 401, 404, 408 and 5xx — and, unlike LiteLLM, a deployment that
cannot be reached or timed out: those are the failures a cooldown spares the next requests. A
group's only deployment is never cooled down (there is nothing to route to instead: a cooldown
would only turn a failure that may pass into certain ones), and a deployment cooling down is
still tried when every other one of its group has failed the request.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Final

import structlog

from spendledger.ledger.router_settings import RouterSettings

log = structlog.get_logger(__name__)

_WINDOW_S: Final = 60.0
COOLDOWN_STATUSES: Final = frozenset({401, 404, 408, 429})


def cools_down(status: int) -> bool:
    """Whether a failure with this HTTP status counts towards a cooldown (502 and 504 include a
    provider that could not be reached or timed out)."""
    return status >= 500 or status in COOLDOWN_STATUSES


class Cooldowns:
    def __init__(self, settings: RouterSettings, group_sizes: dict[str, int]) -> None:
        self._allowed = settings.allowed_fails
        self._cooldown_s = settings.cooldown_time_s
        self._disabled = settings.disable_cooldowns or settings.cooldown_time_s <= 0
        self._group_sizes = group_sizes
        self._failures: dict[str, deque[float]] = {}
        self._until: dict[str, float] = {}

    def cooling(self, deployment_id: str) -> bool:
        until = self._until.get(deployment_id)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        del self._until[deployment_id]
        return False

    def failed(self, deployment_id: str, model_group: str, status: int) -> bool:
        """Count a failed call; whether the deployment now cools down."""
        if self._disabled or not cools_down(status) or self._group_sizes.get(model_group, 0) < 2:
            return False
        now = time.monotonic()
        failures = self._failures.setdefault(deployment_id, deque())
        failures.append(now)
        while failures and failures[0] <= now - _WINDOW_S:
            failures.popleft()
        if len(failures) <= self._allowed:
            return False
        failures.clear()
        self._until[deployment_id] = now + self._cooldown_s
        log.warning(
            "deployment_cooling_down", deployment_id=deployment_id, model=model_group, status=status,
            cooldown_s=self._cooldown_s,
        )  # fmt: skip
        return True
