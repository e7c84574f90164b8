"""Admission: before a request goes upstream, hold its worst-case cost on every budget that governs
it and take its rate-limit slots — or refuse it, all in one round trip (`sl_admit`).

Strictness comes from the hold: `spent + held + hold <= max_budget` is checked and the hold added in
one UPDATE per scope, under the row lock, so N concurrent requests against room for k admit at most
k. The hold is an upper bound of the request's cost (ledger/holds.py says how each token kind is
bounded), so the settled spend never passes the budget.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Final

import asyncpg
import msgspec

from spendledger.ledger.connections import Queryable
from spendledger.ledger.events import RefusalReason, Route
from spendledger.ledger.money import add
from spendledger.ledger.scopes import NO_BUDGETS, BudgetSettings, Scopes

# How long after its upstream timeout a hold outlives a request whose process died.
HOLD_GRACE: Final = timedelta(seconds=30)

_encoder: Final = msgspec.json.Encoder(decimal_format="number")
_decoder: Final = msgspec.json.Decoder(float_hook=Decimal)  # money in refusals stays exact


class Admission(msgspec.Struct, frozen=True, kw_only=True):
    """What `sl_admit` needs: who, what, how much to hold, until when."""

    call_id: str
    route: Route
    model: str
    scopes: Scopes
    key_alias: str | None = None
    hold: Decimal
    expires_at: datetime
    budgets: BudgetSettings = NO_BUDGETS
    refused_at: datetime
    actor: str | None = None  # who a RequestRefused names ("master_key", "key:<sha256>"); else the key hash

    def __post_init__(self) -> None:
        # A negative hold would lower the held total of every budget it touches (and grow a
        # lease's room), letting other requests overspend: no admission may carry one.
        if not self.hold >= 0:
            raise ValueError(f"a hold must be a non-negative amount, got {self.hold}")


class Admitted(msgspec.Struct, frozen=True, kw_only=True):
    budget_periods: tuple[tuple[str, str, str], ...]
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    lease: str | None = None  # admitted under this process's lease (ledger/leases.py), not a hold


class Refused(msgspec.Struct, frozen=True, kw_only=True):
    reason: RefusalReason
    scope: str
    scope_id: str
    detail: dict[str, Any]

    @property
    def retry_after(self) -> int:
        return max(1, int(self.detail.get("retry_after") or 1))

    def message(self) -> str:
        who = f"{self.scope.capitalize()}={self.scope_id}" if self.scope != "key" else "Key"
        d = self.detail
        if self.reason == "budget_exceeded":
            spend = add(Decimal(d.get("spend") or 0), Decimal(d.get("held") or 0))
            return (
                f"Budget has been exceeded! {who} Current spend (incl. requests in flight): {spend}, "
                f"Max budget: {d.get('max_budget')}, this request may cost up to {d.get('hold')}"
            )
        if self.reason == "rate_limit_exceeded":
            return f"Rate limit exceeded for {who}: {d.get('limit_type')} limit {d.get('limit')}"
        if self.reason == "customer_blocked":
            return f"Customer {self.scope_id} is blocked"
        if self.reason == "model_access_denied":
            return f"{who} may not use this model. Allowed models: {d.get('models')}"
        return f"{who} is blocked"


Outcome = Admitted | Refused


def params_of(admission: Admission) -> dict[str, Any]:
    """An admission as `sl_admit` (and `sl_lease`) read it: the scopes' and budget settings' fields
    by their own names (those of the events and of the SQL)."""
    scopes = msgspec.structs.asdict(admission.scopes)
    return {
        "call_id": admission.call_id,
        "model": admission.model,
        **scopes,
        "hold": admission.hold,
        "expires_at": admission.expires_at,
        **msgspec.structs.asdict(admission.budgets),
        "meta": {"actor": admission.actor or admission.scopes.key_hash},
        "refused": {
            "call_id": admission.call_id,
            "route": admission.route,
            "model_group": admission.model,
            **scopes,
            "key_alias": admission.key_alias,
            "refused_at": admission.refused_at,
        },
    }


def _outcome(result: dict[str, Any]) -> Admitted | Refused:
    if result.pop("admitted"):
        periods = tuple((str(s), str(i), str(p)) for s, i, p in result["budget_periods"])
        return Admitted(
            budget_periods=periods,
            remaining_requests=result.get("remaining_requests"),
            remaining_tokens=result.get("remaining_tokens"),
        )
    return Refused(reason=result["reason"], scope=result["scope"], scope_id=result["scope_id"], detail=result)


async def admit_request(conn: Queryable, admission: Admission) -> Admitted | Refused:
    params = _encoder.encode(params_of(admission)).decode()
    raw = await conn.fetchval("select sl_admit($1::jsonb)::text", params)
    return _outcome(_decoder.decode(raw))


async def admit_requests(conn: Queryable, admissions: Sequence[Admission]) -> list[Admitted | Refused]:
    """Admit a batch in one transaction, in order (each sees the holds of those before it).

    Only batch admissions with the same `scopes` (the global budget is common to all): their rows
    are then locked in the global order, as one admission's are."""
    raw = await conn.fetchval(
        "select sl_admit_many($1::jsonb)::text", _encoder.encode([params_of(a) for a in admissions]).decode()
    )
    return [_outcome(result) for result in _decoder.decode(raw)]


class GroupAdmitter:
    """Batches concurrent admissions that share their scopes: one transaction admits the batch.

    Admissions for one hot budget otherwise queue on its row lock one by one. Requests with the
    same scopes form a batch (one batch in flight per scope set; those that arrive meanwhile form
    the next); requests with other scopes go in other transactions, concurrently. A lone request
    is admitted by `sl_admit` directly. If a batch fails as a whole, each of its requests is
    admitted alone, so one bad request fails only its own caller. A caller cancelled while its
    batch runs leaves its hold to expire, as a request whose process dies does.
    """

    def __init__(self, pool: asyncpg.Pool, max_batch: int = 128) -> None:
        self._pool = pool
        self._max_batch = max_batch
        self._queues: dict[Scopes, list[tuple[Admission, asyncio.Future[Outcome]]]] = {}
        self._running: dict[Scopes, asyncio.Task[None]] = {}

    async def admit(self, admission: Admission) -> Outcome:
        scopes = admission.scopes
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(scopes, []).append((admission, future))
        if scopes not in self._running:
            self._running[scopes] = asyncio.create_task(self._drain(scopes))
        return await asyncio.shield(future)  # a cancelled caller must not cancel the batch

    async def stop(self) -> None:
        """Finish the batches in flight."""
        await asyncio.gather(*self._running.values(), return_exceptions=True)

    async def _drain(self, scopes: Scopes) -> None:
        try:
            while queue := self._queues.get(scopes):
                batch = queue[: self._max_batch]
                del queue[: self._max_batch]
                await self._admit_batch(batch)
        finally:
            # No await between the empty check and here: a newcomer either joined the queue
            # before it (and was drained) or finds no task and starts one.
            self._queues.pop(scopes, None)
            del self._running[scopes]

    async def _admit_batch(self, batch: list[tuple[Admission, asyncio.Future[Outcome]]]) -> None:
        try:
            if len(batch) == 1:
                outcomes = [await admit_request(self._pool, batch[0][0])]
            else:
                outcomes = await admit_requests(self._pool, [admission for admission, _ in batch])
        except Exception as exc:
            if len(batch) == 1:
                _resolve(batch[0][1], exc)
                return
            for admission, future in batch:
                try:
                    _resolve(future, await admit_request(self._pool, admission))
                except Exception as alone:
                    _resolve(future, alone)
            return
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            _resolve(future, outcome)


def _resolve(future: asyncio.Future[Outcome], result: Outcome | BaseException) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


async def expire_holds(conn: Queryable) -> int:
    """Release holds whose request's process died; returns how many."""
    return int(await conn.fetchval("select sl_expire_holds()"))


async def announce_budget_exhausted(conn: Queryable, refused: Refused, admission: Admission) -> None:
    """Enqueue `budget_crossed` for a budget that refused a request.

    Budgets are strict, so spend stops short of `max_budget`: the crossing a person wants to hear
    about is the first request the budget could not take. `sl_announce_budget_exhausted` builds its
    row with the key the follower uses for the same line (`sl_crossing_key`), so a period announces
    it once either way.
    """
    context = {
        "call_id": admission.call_id,
        **msgspec.structs.asdict(admission.scopes),
        "key_alias": admission.key_alias,
        "ended_at": admission.refused_at,
    }
    await conn.execute(
        "select sl_announce_budget_exhausted($1::jsonb, $2::jsonb)",
        _encoder.encode(refused.detail).decode(),
        _encoder.encode(context).decode(),
    )
