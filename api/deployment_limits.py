"""Per-deployment `rpm` / `tpm`, enforced across processes in PostgreSQL (ledger/sql/deployments.sql).

A call to a deployment that sets either takes a request slot in the minute's window first
(`sl_take_deployment`: the first of the router's candidates with room), and the tokens it used are
counted in the window once known (`sl_count_deployment_tokens`, off the request's path), as a
key's rpm and tpm are. A group whose deployments set neither never comes here, unless the
strategy is `usage-based-routing`, which orders every deployment by its tokens this minute: that
one round trip both picks and takes the slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import asyncpg
import msgspec
import structlog

from spendledger.ledger.config import Deployment
from spendledger.ledger.connections import DATABASE_ERRORS

log = structlog.get_logger(__name__)

_encoder: Final = msgspec.json.Encoder()


class _Taken(msgspec.Struct):
    deployment_id: str | None = None
    retry_after: int | None = None


_taken_decoder: Final = msgspec.json.Decoder(_Taken)


def limited(deployment: Deployment) -> bool:
    return deployment.rpm is not None or deployment.tpm is not None


class NoRoom(msgspec.Struct, frozen=True):
    """Every candidate is at its rpm or tpm for this minute."""

    retry_after: int


class DeploymentLimits:
    def __init__(self, pool: asyncpg.Pool, usage_based: bool) -> None:
        self._pool = pool
        self.usage_based = usage_based

    def needed(self, ordered: Sequence[Deployment]) -> Sequence[Deployment]:
        """The candidates PostgreSQL must decide between (empty: take the first, no round trip):
        all of them under usage-based routing, else those up to the first without limits."""
        if self.usage_based:
            return ordered
        for index, deployment in enumerate(ordered):
            if not limited(deployment):
                return ordered[: index + 1] if index else ()
        return ordered

    async def take(self, candidates: Sequence[Deployment]) -> Deployment | NoRoom:
        """A request slot on the first candidate with room (by tokens used, under usage-based
        routing), or how long until the window ends."""
        rows = [[d.deployment_id, d.rpm, d.tpm] for d in candidates]
        raw = await self._pool.fetchval(
            "select sl_take_deployment($1::jsonb, $2)::text", _encoder.encode(rows).decode(), self.usage_based
        )
        taken = _taken_decoder.decode(raw)
        if taken.deployment_id is None:
            return NoRoom(max(1, taken.retry_after or 1))
        return next(d for d in candidates if d.deployment_id == taken.deployment_id)

    def counts_tokens(self, deployment: Deployment) -> bool:
        return self.usage_based or deployment.tpm is not None

    async def count_tokens(self, counts: dict[str, int]) -> None:
        """Add the tokens used to the deployments' windows (a lost count only loosens a limit for
        the rest of the minute: logged, not raised)."""
        try:
            await self._pool.execute("select sl_count_deployment_tokens($1::jsonb)", _encoder.encode(counts).decode())
        except DATABASE_ERRORS as exc:
            log.warning("deployment_tokens_not_counted", error_type=type(exc).__name__)
