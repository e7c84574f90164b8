"""Waiting for an event with a timeout, in a way a cancellation always gets through.

Python 3.11's `asyncio.wait_for` returns the inner result when it is cancelled in the loop iteration
in which that result arrives: the cancellation is lost. A publisher loop that lost its stop that way
went round again and `Publisher.run` never returned (a test run hung until CI's limit). `asyncio.timeout`
tells its own expiry from a cancellation from outside and re-raises the latter.
"""

from __future__ import annotations

import asyncio


async def wait_until_set(event: asyncio.Event, timeout_s: float) -> bool:
    """Whether `event` was set within `timeout_s`; a cancellation of the caller always propagates."""
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True
