"""Work that must finish even when whoever started it is gone: a client that hangs up mid-stream is
still billed, and a `HoldExceeded` is appended after the response has left. Shutdown drains it."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog

log = structlog.get_logger(__name__)


class BackgroundTasks:
    """The tasks spawned and not yet finished; a failure is logged by its type only (no payload)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background_task_failed", error_type=type(task.exception()).__name__)

    async def drain(self) -> None:
        """Wait for every task, those the tasks themselves spawn included (a settle spawns its
        HoldExceeded append)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
