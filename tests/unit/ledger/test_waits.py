"""A stop that arrives as the awaited event is set still stops the waiter (asyncio.wait_for in 3.11
returned normally there, and the publisher's loops went round again for good)."""

from __future__ import annotations

import asyncio

import pytest

from spendledger.ledger.waits import wait_until_set


async def test_set_within_the_timeout_is_true_and_no_set_is_false() -> None:
    event = asyncio.Event()
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_until_set(event, 5.0) is True
    assert await wait_until_set(asyncio.Event(), 0.01) is False


async def test_a_cancellation_in_the_iteration_the_event_is_set_is_not_lost() -> None:
    event = asyncio.Event()

    async def loop_until_stopped() -> None:
        while True:
            event.clear()
            await wait_until_set(event, 60.0)

    task = asyncio.create_task(loop_until_stopped())
    await asyncio.sleep(0.01)  # the loop is waiting
    await _set_then_cancel_in_one_iteration(event, task)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5.0)  # the lost stop: the loop waits its 60 s again, a TimeoutError


async def _set_then_cancel_in_one_iteration(event: asyncio.Event, task: asyncio.Task[None]) -> None:
    """The inner wait completes (its wakeup is queued), then the cancel lands before the waiter runs."""
    event.set()
    await asyncio.sleep(0)  # the inner event.wait() finishes; the waiter's wakeup is queued
    task.cancel()
