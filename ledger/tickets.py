"""A request's life in the ledger, from admission to its terminal event: the `Ticket`.

`Tickets.admit` admits a request — in memory, from the budget this process leased for its scopes
(ledger/leases.py), else through PostgreSQL (`GroupAdmitter`: `sl_admit` / `sl_admit_many`) — and
returns its `Ticket`, or the `Refused` whose `RequestRefused` is already the request's terminal
event (a budget refusal also enqueues its `budget_crossed` webhook, when webhooks are on).

The ticket owns what admission took — the request's own hold, or its share of a lease — and ends
the request exactly once:

- `settle(event)` records the terminal `UsageRecorded` with its outbox rows (the `GroupRecorder`:
  the same transaction releases the hold, or draws the cost from the lease row) and returns the
  key's new spend once that is committed: only then may a response be released. Whatever happens —
  committed, failed, its caller cancelled — the lease share is given back to the process's lease
  once (`BudgetLeases.finished`: what it drew, at most its hold; its whole hold when unknown). A
  request that cost more than its hold is billed in full, and `HoldExceeded` is appended after its
  `UsageRecorded`, off the caller's path.
- `abandon()` is for a request that will never settle (its task was cancelled before it could):
  its lease share goes back to the lease at once, counted as its whole hold (the strict side); a
  hold of its own is left to the hold sweeper, which releases it at expiry.

HTTP code builds the `Admission` and the `UsageRecorded`, and answers; it keeps no books.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

import asyncpg
import structlog

from spendledger.ledger import store
from spendledger.ledger.admission import (
    Admission,
    Admitted,
    GroupAdmitter,
    Outcome,
    Refused,
    announce_budget_exhausted,
)
from spendledger.ledger.background import BackgroundTasks
from spendledger.ledger.connections import DATABASE_ERRORS
from spendledger.ledger.events import HoldExceeded, UsageRecorded
from spendledger.ledger.leases import BudgetLeases
from spendledger.ledger.outbox import OutboxRow
from spendledger.ledger.usage import GroupRecorder, Recording

log = structlog.get_logger(__name__)

OutboxRows = Callable[[UsageRecorded], list[OutboxRow]]


def no_outbox_rows(event: UsageRecorded) -> list[OutboxRow]:
    return []


class TicketClosed(RuntimeError):
    """A ticket was settled (or abandoned) already: a request has one terminal event."""


class Ticket:
    """An admitted request's claim on its budgets, until it settles (`settle`) or is given up
    (`abandon`); either, once."""

    __slots__ = ("_closed", "_tickets", "admitted", "call_id", "hold")

    def __init__(self, tickets: Tickets, admission: Admission, admitted: Admitted) -> None:
        self._tickets = tickets
        self._closed = False
        self.call_id = admission.call_id
        self.hold = admission.hold  # the worst case held for it (ledger/holds.py)
        self.admitted = admitted

    @property
    def lease(self) -> str | None:
        """The lease it was admitted under (None: a hold of its own)."""
        return self.admitted.lease

    @property
    def budget_periods(self) -> tuple[tuple[str, str, str], ...]:
        """The budget periods it was admitted under: its event carries them, its cost goes to them."""
        return self.admitted.budget_periods

    @property
    def closed(self) -> bool:
        """Whether it was settled or abandoned (a settle that failed counts: it is not retried)."""
        return self._closed

    async def settle(self, event: UsageRecorded) -> Decimal | None:
        """Record the request's terminal event; the key's new spend once committed. Raises what the
        recording raised (then nothing was billed, and the response must be withheld)."""
        if self._closed:
            raise TicketClosed(f"request {self.call_id} is settled or abandoned already")
        if event.call_id != self.call_id:
            raise ValueError(f"the event of request {event.call_id} cannot settle request {self.call_id}")
        self._closed = True
        return await self._tickets._settle(self, event)

    def abandon(self) -> None:
        """The request will never settle: give its lease share back (a hold of its own expires).
        Nothing to do for a ticket that is closed already."""
        if self._closed:
            return
        self._closed = True
        self._tickets._abandoned(self)


class Tickets:
    """Admits requests and settles their tickets: the ledger's side of a request's life.

    `announce_refusals`: whether a budget refusal enqueues its `budget_crossed` webhook (webhooks
    on). `outbox_rows` builds the rows the application writes with each usage event (Lago's; the
    webhook rows follow the log, ledger/webhook_rows.py). `on_hold_exceeded` hears the model group of
    each request that cost more than its hold (a metric). `background` runs what outlives a settle
    (the process's, so that shutdown drains it with the rest)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        admitter: GroupAdmitter,
        leases: BudgetLeases | None,
        recorder: GroupRecorder,
        *,
        outbox_rows: OutboxRows = no_outbox_rows,
        announce_refusals: bool = False,
        on_hold_exceeded: Callable[[str], None] = lambda model_group: None,
        background: BackgroundTasks | None = None,
    ) -> None:
        self._pool = pool
        self._admitter = admitter
        self._leases = leases
        self._recorder = recorder
        self._outbox_rows = outbox_rows
        self._announce_refusals = announce_refusals
        self._on_hold_exceeded = on_hold_exceeded
        self._background = background if background is not None else BackgroundTasks()

    async def admit(self, admission: Admission) -> Ticket | Refused:
        """Hold the request's worst case on every budget that governs it (or take it from a lease),
        or refuse it."""
        outcome: Outcome | None = None
        if self._leases is not None:
            outcome = await self._leases.admit(admission)
        if outcome is None:
            outcome = await self._admitter.admit(admission)
        if isinstance(outcome, Admitted):
            return Ticket(self, admission, outcome)
        if outcome.reason == "budget_exceeded" and self._announce_refusals:
            try:
                await announce_budget_exhausted(self._pool, outcome, admission)
            except DATABASE_ERRORS as exc:
                # The refusal stands; the next refused request announces it (same dedupe key).
                log.warning("budget_crossed_not_enqueued", error_type=type(exc).__name__)
        return outcome

    async def admit_held(self, admission: Admission) -> Admitted | Refused:
        """Admit a call made elsewhere: always a hold of its own in PostgreSQL (never a lease share,
        which lives in this process), released by the settle of its call id in whichever process
        records it (POST /usage), or by the sweeper at `expires_at`."""
        outcome = await self._admitter.admit(admission)
        if isinstance(outcome, Refused) and outcome.reason == "budget_exceeded" and self._announce_refusals:
            try:
                await announce_budget_exhausted(self._pool, outcome, admission)
            except DATABASE_ERRORS as exc:
                log.warning("budget_crossed_not_enqueued", error_type=type(exc).__name__)
        return outcome

    async def stop(self) -> None:
        """Wait for the `HoldExceeded` appends still running (the settles are over by now)."""
        await self._background.drain()

    async def _settle(self, ticket: Ticket, event: UsageRecorded) -> Decimal | None:
        lease = ticket.lease
        drawn = None  # what the settle drew from the lease; None: unknown whether it committed
        try:
            spend = await self._recorder.record(
                Recording(
                    event=event,
                    outbox=self._outbox_rows(event),
                    metadata={"lease": lease} if lease is not None else {},
                )
            )
            drawn = event.cost
        finally:
            if lease is not None and self._leases is not None:
                self._leases.finished(lease, ticket.hold, drawn)
        if event.cost > ticket.hold:
            self._background.spawn(self._note_hold_exceeded(event, ticket.hold))
        return spend

    def _abandoned(self, ticket: Ticket) -> None:
        lease = ticket.lease
        if lease is not None and self._leases is not None:
            self._leases.finished(lease, ticket.hold, None)  # counted as its whole hold

    async def _note_hold_exceeded(self, event: UsageRecorded, hold: Decimal) -> None:
        """Append `HoldExceeded` after a request cost more than its hold (it is billed in full: its
        `UsageRecorded` is committed). If it cannot be appended, the warning and the metric still say
        so, and the usage event itself carries its hold and its cost."""
        self._on_hold_exceeded(event.model_group)
        log.warning(
            "hold_exceeded", call_id=event.call_id, model=event.model_group, hold=str(hold), cost=str(event.cost)
        )
        flag = HoldExceeded(
            call_id=event.call_id,
            route=event.route,
            model_group=event.model_group,
            deployment_id=event.deployment_id,
            key_hash=event.key_hash,
            user_id=event.user_id,
            team_id=event.team_id,
            customer_id=event.customer_id,
            hold=hold,
            cost=event.cost,
            excess=event.cost - hold,
            input_tokens=event.input_tokens,
            output_tokens=event.output_tokens,
        )
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await store.append(conn, f"request:{event.call_id}", 1, [flag], {"actor": event.key_hash})
        except DATABASE_ERRORS as exc:
            log.error("hold_exceeded_not_recorded", call_id=event.call_id, error_type=type(exc).__name__)
