"""Tickets: admission returns the ticket that owns a request's hold or lease share, and the ticket
ends the request once — settled (recorded, the lease finished whatever happens) or abandoned."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal

import asyncpg
import msgspec
import pytest

from spendledger.ledger.admission import Admission, GroupAdmitter, Refused
from spendledger.ledger.config import LagoSettings
from spendledger.ledger.events import UsageRecorded
from spendledger.ledger.leases import BudgetLeases
from spendledger.ledger.sinks.lago import lago_row
from spendledger.ledger.store import read_stream
from spendledger.ledger.tickets import Ticket, TicketClosed, Tickets
from spendledger.ledger.usage import NO_CONTEXT, GroupRecorder, record_usage
from tests.integration.ledger.test_group_admitter import HOLD, admission, budgeted, held
from tests.integration.ledger.test_group_recorder import usage
from tests.integration.ledger.test_leases import lease_rows

LAGO = LagoSettings(api_base="http://lago.invalid", api_key="k", event_code="llm_usage", charge_by="end_user_id")


@dataclass
class Ledger:
    """A process's ledger side: its leases (or none), its recorder, and the tickets built on them."""

    tickets: Tickets
    leases: BudgetLeases | None
    exceeded: list[str] = field(default_factory=list)


async def ledger(pool: asyncpg.Pool, leases: bool, **options: object) -> AsyncIterator[Ledger]:
    admitter, recorder = GroupAdmitter(pool), GroupRecorder(pool, NO_CONTEXT)
    manager = BudgetLeases(pool) if leases else None
    exceeded: list[str] = []
    tickets = Tickets(pool, admitter, manager, recorder, on_hold_exceeded=exceeded.append, **options)  # type: ignore[arg-type]
    recorder.start()
    if manager is not None:
        manager.start()
    yield Ledger(tickets, manager, exceeded)
    await tickets.stop()
    await admitter.stop()
    await recorder.stop()
    if manager is not None:
        await manager.stop()


@pytest.fixture
async def one_by_one(pool: asyncpg.Pool) -> AsyncIterator[Ledger]:
    async for it in ledger(pool, leases=False, outbox_rows=lambda event: [lago_row(event, LAGO)]):
        yield it


@pytest.fixture
async def leased(pool: asyncpg.Pool) -> AsyncIterator[Ledger]:
    async for it in ledger(pool, leases=True):
        yield it


def event_of(request: Admission, ticket: Ticket, cost: Decimal = Decimal("0.003")) -> UsageRecorded:
    """The request's UsageRecorded as the proxy builds it: the periods and hold of its ticket."""
    return msgspec.structs.replace(
        usage(request.call_id, request.scopes.customer_id or ""),
        cost=cost,
        budget_periods=ticket.budget_periods,
        hold=ticket.hold,
    )


async def ticket_of(tickets: Tickets, request: Admission) -> Ticket:
    ticket = await tickets.admit(request)
    assert isinstance(ticket, Ticket), ticket
    return ticket


async def under_lease(tickets: Tickets, name: str, customer: str) -> tuple[Admission, Ticket]:
    """A request admitted from this process's lease (the first ones go one by one, and ask for it)."""
    for i in range(100):
        request = admission(f"{name}-{i}", customer)
        ticket = await ticket_of(tickets, request)
        if ticket.lease is not None:
            return request, ticket
        await ticket.settle(event_of(request, ticket))
        await asyncio.sleep(0.01)
    raise AssertionError("no lease was granted")


async def retire_leases(leases: BudgetLeases | None) -> None:
    """Retire every lease and wait for what that gives back (as a scope change does)."""
    assert leases is not None
    leases.invalidate()
    for _ in range(100):
        await asyncio.sleep(0.01)
        if not leases._tasks:
            return


async def test_a_ticket_settles_once_with_its_outbox_rows(pool: asyncpg.Pool, one_by_one: Ledger) -> None:
    await budgeted(pool, "once", HOLD * 100)
    request = admission("once-1", "once")
    ticket = await ticket_of(one_by_one.tickets, request)
    assert ticket.lease is None and ticket.hold == HOLD and not ticket.closed
    assert await held(pool, "once") == HOLD

    event = event_of(request, ticket)
    spend = await ticket.settle(event)
    assert spend == event.cost and ticket.closed
    assert await held(pool, "once") == 0  # the hold was released by the settle's transaction
    with pytest.raises(TicketClosed):
        await ticket.settle(event)
    ticket.abandon()  # a no-op once settled
    async with pool.acquire() as conn:
        stored = await read_stream(conn, "request:once-1")
    assert [type(s.event).__name__ for s in stored] == ["UsageRecorded"]  # one terminal event
    assert await pool.fetchval("select count(*) from outbox where sink = 'lago' and dedupe_key = 'once-1'") == 1


async def test_a_ticket_settles_only_its_own_request(one_by_one: Ledger, pool: asyncpg.Pool) -> None:
    ticket = await ticket_of(one_by_one.tickets, admission("own-1", "own"))
    with pytest.raises(ValueError, match="own-2"):
        await ticket.settle(event_of(admission("own-2", "own"), ticket))
    assert not ticket.closed  # still its to settle
    await ticket.settle(event_of(admission("own-1", "own"), ticket))


async def test_a_refusal_is_no_ticket(pool: asyncpg.Pool, one_by_one: Ledger) -> None:
    await budgeted(pool, "broke", HOLD / 2)
    refused = await one_by_one.tickets.admit(admission("broke-1", "broke"))
    assert isinstance(refused, Refused) and refused.reason == "budget_exceeded"
    assert await pool.fetchval("select count(*) from outbox where sink = 'webhook'") == 0  # webhooks off


async def test_a_budget_refusal_announces_the_crossing_when_webhooks_are_on(pool: asyncpg.Pool) -> None:
    await budgeted(pool, "broke", HOLD / 2)
    async for it in ledger(pool, leases=False, announce_refusals=True):
        refused = await it.tickets.admit(admission("broke-1", "broke"))
        assert isinstance(refused, Refused)
    keys = await pool.fetch("select dedupe_key from outbox where sink = 'webhook'")
    assert [k["dedupe_key"].split(":")[:3] for k in keys] == [["budget_crossed", "customer", "broke"]]


async def test_abandoning_a_leased_ticket_gives_its_share_back(pool: asyncpg.Pool, leased: Ledger) -> None:
    await budgeted(pool, "gone", HOLD * 10_000)
    _, ticket = await under_lease(leased.tickets, "gone", "gone")
    (lease,) = await lease_rows(pool)
    ticket.abandon()
    assert ticket.closed
    with pytest.raises(TicketClosed):
        await ticket.settle(usage(ticket.call_id, "gone"))
    await retire_leases(leased.leases)
    # Its lease had no request left in flight, so retiring released it whole: nothing is held.
    assert await lease_rows(pool) == []
    assert lease["amount"] > 0 and await held(pool, "gone") == 0


async def test_a_leased_ticket_never_ended_keeps_its_lease_held(pool: asyncpg.Pool, leased: Ledger) -> None:
    """The control of the test above: a request still in flight keeps its share of a retired lease."""
    await budgeted(pool, "busy", HOLD * 10_000)
    _, ticket = await under_lease(leased.tickets, "busy", "busy")
    await retire_leases(leased.leases)
    (lease,) = await lease_rows(pool)
    assert lease["amount"] == HOLD  # only what the request in flight took is still held
    ticket.abandon()


async def test_abandoning_a_ticket_of_its_own_hold_leaves_it_to_expire(pool: asyncpg.Pool, one_by_one: Ledger) -> None:
    await budgeted(pool, "left", HOLD * 100)
    ticket = await ticket_of(one_by_one.tickets, admission("left-1", "left"))
    ticket.abandon()
    assert ticket.closed
    assert await pool.fetchval("select count(*) from holds where call_id = 'left-1'") == 1
    assert await held(pool, "left") == HOLD  # the hold sweeper gives it back at expiry


async def test_a_settle_that_fails_to_commit_still_finishes_the_lease(pool: asyncpg.Pool, leased: Ledger) -> None:
    await budgeted(pool, "failing", HOLD * 10_000)
    request, ticket = await under_lease(leased.tickets, "failing", "failing")
    (lease,) = await lease_rows(pool)
    # Its call id is taken already: its UsageRecorded cannot be appended, the settle fails whole.
    await record_usage(pool, usage(request.call_id, "someone-else"))
    with pytest.raises(asyncpg.PostgresError):
        await ticket.settle(event_of(request, ticket))
    assert ticket.closed  # a failed settle is not retried: the response is withheld
    with pytest.raises(TicketClosed):
        await ticket.settle(event_of(request, ticket))
    (after,) = await lease_rows(pool)
    assert after["amount"] == lease["amount"]  # nothing was drawn
    await retire_leases(leased.leases)
    assert await lease_rows(pool) == []  # finished: the retired lease was released whole


async def test_a_settle_whose_caller_is_cancelled_still_finishes_the_lease(
    pool: asyncpg.Pool, leased: Ledger
) -> None:
    await budgeted(pool, "hung-up", HOLD * 10_000)
    request, ticket = await under_lease(leased.tickets, "hung-up", "hung-up")
    settle = asyncio.create_task(ticket.settle(event_of(request, ticket)))
    await asyncio.sleep(0)  # it has handed its recording to the recorder
    settle.cancel()
    with pytest.raises(asyncio.CancelledError):
        await settle
    for _ in range(100):  # the batch commits anyway: the request is billed
        if await pool.fetchval("select count(*) from events where stream = 'request:' || $1", request.call_id):
            break
        await asyncio.sleep(0.01)
    await retire_leases(leased.leases)
    assert await lease_rows(pool) == []


async def test_a_settle_past_its_hold_bills_in_full_draws_only_the_hold_and_flags_it(
    pool: asyncpg.Pool, leased: Ledger
) -> None:
    await budgeted(pool, "greedy", HOLD * 10_000)
    request, ticket = await under_lease(leased.tickets, "greedy", "greedy")
    (lease,) = await lease_rows(pool)
    spent_before = await pool.fetchval("select spent from budget_usage where scope = 'customer'")
    cost = HOLD * 3
    await ticket.settle(event_of(request, ticket, cost))
    await leased.tickets.stop()  # the HoldExceeded append runs off the settle's path
    assert await pool.fetchval("select spent from budget_usage where scope = 'customer'") == spent_before + cost
    (after,) = await lease_rows(pool)
    assert after["amount"] == lease["amount"] - HOLD  # the lease gives up only what the request held
    async with pool.acquire() as conn:
        stored = await read_stream(conn, f"request:{request.call_id}")
    assert [type(s.event).__name__ for s in stored] == ["UsageRecorded", "HoldExceeded"]
    flag = stored[1].event
    assert (flag.hold, flag.cost, flag.excess) == (HOLD, cost, cost - HOLD)  # type: ignore[union-attr]
    assert flag.scopes == request.scopes  # type: ignore[union-attr]
    assert leased.exceeded == ["m"]


async def test_a_settle_within_its_hold_draws_its_cost(pool: asyncpg.Pool, leased: Ledger) -> None:
    await budgeted(pool, "modest", HOLD * 10_000)
    request, ticket = await under_lease(leased.tickets, "modest", "modest")
    (lease,) = await lease_rows(pool)
    cost = HOLD / 4
    await ticket.settle(event_of(request, ticket, cost))
    (after,) = await lease_rows(pool)
    assert after["amount"] == lease["amount"] - cost
    await leased.tickets.stop()
    assert leased.exceeded == []
