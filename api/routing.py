"""Model groups: a `model_name` can have several deployments; the routing strategy orders them.

`simple-shuffle` spreads a group's requests in proportion to each deployment's `weight` (else its
`rpm`, else its `tpm`, else evenly) — a smooth weighted round robin, so that the spread is exact
over any run of requests rather than LiteLLM's random draw. `least-busy` prefers the deployment
with the fewest requests in flight in this process (as LiteLLM's, without a shared cache).
`usage-based-routing` leaves the order to PostgreSQL, which picks the deployment with the fewest
tokens this minute among those with room (api/deployment_limits.py). Deployments cooling down
(api/cooldowns.py) come last, and only when nothing else is left.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from spendledger.api.cooldowns import Cooldowns
from spendledger.api.upstream import MAX_RETRY_AFTER_S
from spendledger.ledger.config import Deployment
from spendledger.ledger.router_settings import DEFAULT_ROUTER_SETTINGS, RouterSettings


class _Shuffle:
    """Smooth weighted round robin over one group (nginx's): each pick adds every deployment's
    weight to its credit, takes the one with the most, and charges it the total."""

    __slots__ = ("credit", "members", "total", "weights")

    def __init__(self, members: tuple[Deployment, ...]) -> None:
        self.members = members
        self.weights = _weights(members)
        self.total = sum(self.weights)
        self.credit = [0] * len(members)

    def order(self) -> list[Deployment]:
        """The group, the next pick first, the rest by their credit."""
        if len(self.members) == 1:
            return [self.members[0]]
        credit = self.credit
        for i, weight in enumerate(self.weights):
            credit[i] += weight
        ranked = sorted(range(len(credit)), key=lambda i: -credit[i])
        credit[ranked[0]] -= self.total
        return [self.members[i] for i in ranked]


def _weights(members: tuple[Deployment, ...]) -> list[int]:
    """LiteLLM's simple-shuffle weights: `weight` where any member sets it, else `rpm`, else
    `tpm`; a member that lacks the one used weighs 0 (picked only when the others cannot be)."""
    for field in ("weight", "rpm", "tpm"):
        values = [getattr(m, field) for m in members]
        if any(v for v in values):
            return [v or 0 for v in values]
    return [1] * len(members)


class ModelRouter:
    def __init__(
        self,
        deployments: tuple[Deployment, ...],
        settings: RouterSettings = DEFAULT_ROUTER_SETTINGS,
        eligible: Callable[[Deployment], bool] = lambda d: True,
    ) -> None:
        groups: dict[str, list[Deployment]] = {}
        for deployment in deployments:
            members = groups.setdefault(deployment.model_name, [])
            if eligible(deployment):
                members.append(deployment)
        self._groups = {name: tuple(members) for name, members in groups.items()}
        self.settings = settings
        self.strategy = settings.routing_strategy
        self.cooldowns = Cooldowns(settings, {name: len(m) for name, m in self._groups.items()})
        self._shuffles = {name: _Shuffle(members) for name, members in self._groups.items() if members}
        self._turns = {name: itertools.count() for name in self._groups}
        self._busy: dict[str, int] = {}  # requests in flight per deployment (least-busy only)
        self._chains: dict[str, tuple[Deployment, ...]] = {}
        self._bounds: dict[tuple[str, bool], float] = {}

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(self._groups)

    def has(self, model: str) -> bool:
        return model in self._groups

    def deployments(self, model: str) -> tuple[Deployment, ...]:
        return self._groups.get(model, ())

    def pick(self, model: str) -> Deployment | None:
        """The deployment the strategy would call first (None for an unknown or empty group)."""
        ordered = self.order(model, frozenset())
        return ordered[0] if ordered else None

    def order(self, model: str, tried: frozenset[str] | set[str]) -> list[Deployment]:
        """The group's deployments in the order to try them: those not tried yet for this request
        and not cooling down first (in the strategy's order), then the tried ones, then those
        cooling down; empty only for an unknown or empty group."""
        members = self._groups.get(model, ())
        if not members:
            return []
        if self.strategy == "least-busy":
            start = next(self._turns[model]) % len(members)
            rotated = members[start:] + members[:start]
            ordered = sorted(rotated, key=lambda d: self._busy.get(d.deployment_id, 0))
        elif self.strategy == "simple-shuffle":
            ordered = self._shuffles[model].order()
        else:  # usage-based-routing: PostgreSQL orders them by their tokens this minute
            ordered = list(members)
        if len(ordered) == 1 and not tried:
            return ordered
        cooling = self.cooldowns.cooling
        return sorted(
            ordered,
            key=lambda d: (cooling(d.deployment_id), d.deployment_id in tried),
        )

    def chain(self, model: str) -> tuple[Deployment, ...]:
        """Every deployment a request for `model` may end up calling: its group's, then its
        fallback groups' (plain and for a context-window error), each once."""
        found = self._chains.get(model)
        if found is None:
            groups = (model, *self.settings.fallbacks_for(model), *self.settings.fallbacks_for(model, True))
            by_id = {d.deployment_id: d for g in dict.fromkeys(groups) for d in self._groups.get(g, ())}
            found = tuple(by_id.values())
            self._chains[model] = found
        return found

    def time_bound_s(self, model: str, stream: bool) -> float:
        """How long a request for `model` may take at most, every retry and fallback called and
        waited for (its hold must outlive it); its timeout alone for a single call."""
        found = self._bounds.get((model, stream))
        if found is not None:
            return found
        chain = self.chain(model)
        longest = max(
            (d.stream_timeout_s or d.timeout_s) if stream else d.timeout_s for d in chain
        ) if chain else self.settings.timeout_s
        settings = self.settings
        groups = 1 + len(settings.fallbacks_for(model)) + len(settings.fallbacks_for(model, True))
        calls = groups * (settings.num_retries + 1) * (1 + max((d.max_retries for d in chain), default=0))
        bound = longest if calls == 1 else calls * (longest + MAX_RETRY_AFTER_S + 1)
        self._bounds[(model, stream)] = bound
        return bound

    def began(self, deployment: Deployment) -> None:
        if self.strategy == "least-busy":
            self._busy[deployment.deployment_id] = self._busy.get(deployment.deployment_id, 0) + 1

    def ended(self, deployment: Deployment) -> None:
        if self.strategy == "least-busy":
            self._busy[deployment.deployment_id] = max(0, self._busy.get(deployment.deployment_id, 0) - 1)
