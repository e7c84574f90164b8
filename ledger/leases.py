"""Budget leased to this process: admission without a round trip to PostgreSQL.

Strict admission holds each request's worst-case cost on every budget before the request goes
upstream: one round trip (`sl_admit`) per request. A lease holds many requests' worth at once
(`sl_lease`, migration 0011), and the process then admits that scope set's requests in memory: each
takes its hold from the lease, with no I/O. Its settle draws the request's cost from the lease row
(`sl_draw_leases`: the lease id is in the event's metadata), so a budget's `spent` and `held` move
exactly as with a hold per request. Budgets stay strict: what is admitted under a lease fits in
what the lease holds, and what it holds fitted the budget when it was granted.

PostgreSQL grants a lease only where deciding in memory is deciding as `sl_admit` would (no scope
blocked, the model allowed, no rpm / tpm / parallel limit) and where every budget has room for
`MIN_HOLDS` holds: near a limit requests go one by one again. (A budget several leases share —
two processes, or a team's or the global budget under several scope sets — can still refuse a
request while another lease sits on unused room: docs/budgets.md says how long at most.)

A lease is retired — no new requests; what they have not taken given back at once
(`sl_return_lease`); the rest released when its last request has settled (`sl_release_hold`) —
when it cannot take a request, when it is `TTL` old or `IDLE_S` idle, and when any key, user,
team, customer or budget changes (`invalidate`, on `sl_scope_changed`). A process that dies
leaves its leases to the hold sweeper, as it leaves its requests' holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final

import asyncpg
import msgspec
import structlog

from spendledger.ledger.admission import Admission, Admitted, params_of
from spendledger.ledger.connections import DATABASE_ERRORS
from spendledger.ledger.money import ZERO
from spendledger.ledger.scopes import BudgetSettings, Scopes

log = structlog.get_logger(__name__)

HOLDS_PER_LEASE: Final = 256  # a lease asks for this many of the first request's hold (> requests in flight)
MIN_HOLDS: Final = 8  # and is granted only with room for at least this many
SHARE: Final = Decimal("0.25")  # never more than this share of a budget's room
TTL: Final = timedelta(seconds=30)
IDLE_S: Final = 5.0
UNLEASABLE_S: Final = 5.0  # after PostgreSQL declines, how long a scope set goes one by one
_SWEEP_S: Final = 1.0

_encoder: Final = msgspec.json.Encoder(decimal_format="number")
_decoder: Final = msgspec.json.Decoder(float_hook=Decimal)

LeaseKey = tuple[Scopes, str, BudgetSettings]


def lease_key(admission: Admission) -> LeaseKey:
    """What a lease was granted for: the scopes, the model and the process-wide budget settings."""
    return (admission.scopes, admission.model, admission.budgets)


@dataclass(slots=True)
class Lease:
    id: str
    amount: Decimal | None  # None: no budget governs these scopes, there is nothing to hold
    budget_periods: tuple[tuple[str, str, str], ...]
    valid_until: datetime
    expires_at: datetime  # when the sweeper releases it if this process is gone
    taken: Decimal = ZERO  # the holds of its requests in flight
    drawn: Decimal = ZERO  # what its settled requests drew (their costs)
    in_flight: int = 0
    retired: bool = False
    last_used: float = 0.0

    def can_take(self, admission: Admission) -> bool:
        return (
            not self.retired
            and admission.refused_at < self.valid_until
            and admission.expires_at <= self.expires_at
            and (self.amount is None or self.drawn + self.taken + admission.hold <= self.amount)
        )

    def unused(self) -> Decimal:
        return ZERO if self.amount is None else max(ZERO, self.amount - self.drawn - self.taken)


class BudgetLeases:
    """This process's leases, one per scope set; `admit` answers from them or returns None (then
    the caller admits through PostgreSQL, and a lease is asked for in the background).

    `trusted` says whether changes to scopes are being heard right now: without that, no lease is
    asked for (one could outlive a change it never heard of)."""

    def __init__(self, pool: asyncpg.Pool, trusted: Callable[[], bool] = lambda: True) -> None:
        self._pool = pool
        self._trusted = trusted
        self._leases: dict[LeaseKey, Lease] = {}
        self._by_id: dict[str, Lease] = {}
        self._asking: set[LeaseKey] = set()
        self._unleasable: dict[LeaseKey, float] = {}
        self._generation = 0  # bumped by invalidate: a grant asked for before is not used
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep())

    async def stop(self) -> None:
        """Retire every lease and wait for what that gives back (requests are finished by now)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        self.invalidate()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def admit(self, admission: Admission) -> Admitted | None:
        key = lease_key(admission)
        lease = self._leases.get(key)
        if lease is not None:
            if lease.can_take(admission):
                lease.taken += admission.hold
                lease.in_flight += 1
                lease.last_used = time.monotonic()
                return Admitted(budget_periods=lease.budget_periods, lease=lease.id)
            # Give its room back before this request is admitted one by one: near a limit, the
            # room the lease sits on may be what the request needs.
            await self._retire(key, lease)
        self._ask(key, admission)
        return None

    def finished(self, lease_id: str, hold: Decimal, cost: Decimal | None) -> None:
        """A request admitted under `lease_id` is over: its settle drew `cost`, at most its hold
        (None: unknown whether it committed — counted as its whole hold, which errs on the strict
        side). A request that cost more than its hold is billed in full, but draws from the lease
        only what it held (as `sl_record_usage` and `sl_draw_leases` do): the lease's room for
        its other requests stays theirs."""
        lease = self._by_id.get(lease_id)
        if lease is None:
            return
        lease.taken -= hold
        lease.in_flight -= 1
        lease.drawn += hold if cost is None else min(cost, hold)
        if lease.retired and lease.in_flight == 0:
            self._spawn(self._release(lease))

    def invalidate(self) -> None:
        """Something a lease was granted on may have changed: retire them all, now."""
        self._generation += 1
        self._unleasable.clear()
        for key, lease in list(self._leases.items()):
            work = self._withdraw(key, lease)
            if work is not None:
                self._spawn(work)

    async def _retire(self, key: LeaseKey, lease: Lease) -> None:
        work = self._withdraw(key, lease)
        if work is not None:
            await work

    def _withdraw(self, key: LeaseKey, lease: Lease) -> Coroutine[Any, Any, None] | None:
        """Take a lease out of use at once; the database work that gives its room back, if any."""
        if self._leases.get(key) is lease:
            del self._leases[key]
        if lease.retired:
            return None
        lease.retired = True
        if lease.in_flight == 0:
            return self._release(lease)
        unused = lease.unused()
        if lease.amount is not None:
            lease.amount -= unused
        if unused > 0:
            return self._quietly(self._pool.execute("select sl_return_lease($1, $2)", lease.id, unused))
        return None

    async def _release(self, lease: Lease) -> None:
        if self._by_id.pop(lease.id, None) is None:
            return
        if lease.amount is not None:
            await self._quietly(self._pool.execute("select sl_release_hold($1)", lease.id))

    def _ask(self, key: LeaseKey, admission: Admission) -> None:
        if key in self._asking or not self._trusted() or self._unleasable.get(key, 0.0) > time.monotonic():
            return
        self._asking.add(key)
        self._spawn(self._grant(key, admission))

    async def _grant(self, key: LeaseKey, admission: Admission) -> None:
        generation, now = self._generation, datetime.now(UTC)
        valid_until = now + TTL
        lease_id = f"lease:{uuid.uuid4()}"
        params = params_of(admission) | {
            "lease_id": lease_id,
            "amount": admission.hold * HOLDS_PER_LEASE,
            "min_amount": admission.hold * MIN_HOLDS,
            "share": SHARE,
            "valid_until": valid_until,
            # the requests it admits may run as long as this one may
            "expires_at": valid_until + (admission.expires_at - admission.refused_at),
        }
        try:
            raw = await self._pool.fetchval("select sl_lease($1::jsonb)::text", _encoder.encode(params).decode())
        except DATABASE_ERRORS as exc:
            log.warning("lease_not_granted", error_type=type(exc).__name__)
            self._unleasable[key] = time.monotonic() + UNLEASABLE_S
            return
        finally:
            self._asking.discard(key)
        granted = _decoder.decode(raw)
        if not granted["leased"]:
            self._unleasable[key] = time.monotonic() + UNLEASABLE_S
            return
        amount = granted["amount"]
        lease = Lease(
            id=lease_id,
            amount=None if amount is None else Decimal(amount),
            budget_periods=tuple((str(s), str(i), str(p)) for s, i, p in granted["budget_periods"]),
            valid_until=datetime.fromisoformat(granted["valid_until"]),
            expires_at=params["expires_at"],
            last_used=time.monotonic(),
        )
        self._by_id[lease_id] = lease
        if generation != self._generation or key in self._leases:
            await self._retire(key, lease)  # granted on what may have changed meanwhile
            return
        self._leases[key] = lease

    async def _sweep(self) -> None:
        """Retire leases past their time or idle, so their room does not sit unused."""
        while True:
            await asyncio.sleep(_SWEEP_S)
            now, clock = datetime.now(UTC), time.monotonic()
            self._unleasable = {key: until for key, until in self._unleasable.items() if until > clock}
            for key, lease in list(self._leases.items()):
                if lease.valid_until <= now or (lease.in_flight == 0 and lease.last_used < clock - IDLE_S):
                    await self._retire(key, lease)
            # A request that never finished (its task was cancelled) keeps its lease from being
            # released here: past its expiry the hold sweeper has released it, so forget it.
            for lease_id, lease in list(self._by_id.items()):
                if lease.retired and lease.expires_at <= now:
                    del self._by_id[lease_id]

    async def _quietly(self, work: Coroutine[Any, Any, Any]) -> None:
        """Give back room; if the database cannot be reached, the hold sweeper releases it at expiry."""
        try:
            await work
        except DATABASE_ERRORS as exc:
            log.warning("lease_not_returned", error_type=type(exc).__name__)

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
