"""Model groups: a `model_name` can have several deployments; requests take turns between them."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from spendledger.ledger.config import Deployment


class ModelRouter:
    def __init__(self, deployments: tuple[Deployment, ...]) -> None:
        groups: dict[str, list[Deployment]] = {}
        for deployment in deployments:
            groups.setdefault(deployment.model_name, []).append(deployment)
        self._groups = {name: tuple(members) for name, members in groups.items()}
        self._turns: dict[str, Iterator[Deployment]] = {
            name: itertools.cycle(members) for name, members in self._groups.items()
        }

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(self._groups)

    def has(self, model: str) -> bool:
        return model in self._groups

    def pick(self, model: str) -> Deployment | None:
        """The next deployment of the group, round robin (None for an unknown model)."""
        turns = self._turns.get(model)
        return next(turns) if turns is not None else None

    def deployments(self, model: str) -> tuple[Deployment, ...]:
        return self._groups.get(model, ())
