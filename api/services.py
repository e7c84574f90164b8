"""What the routes share: settings, pool, upstream client, key cache, prices, router, and the
ledger's side of a proxied request (`tickets`: admission and settle).

Built once by the composition root (`api.app`) and put in `app.state.services`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import structlog
from litestar.connection import ASGIConnection

from api.keycache import KeyCache
from api.publishing import PublisherRunner
from api.routing import ModelRouter
from api.upstream import Upstream
from ledger.config import Settings
from ledger.pricing import PriceBook
from ledger.scopes import BudgetSettings
from ledger.tickets import Tickets

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Services:
    settings: Settings
    database_url: str
    pool: asyncpg.Pool
    upstream: Upstream
    keys: KeyCache
    prices: PriceBook
    router: ModelRouter
    master_key_hash: str
    budgets: BudgetSettings  # the config's, built once (ledger/scopes.py)
    tickets: Tickets  # admits requests (a budget lease's, or a round trip) and settles them
    publisher: PublisherRunner
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run work that must finish even if the request that started it is cancelled (a client that
        hangs up mid-stream is still billed); shutdown waits for these tasks."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background_task_failed", error_type=type(task.exception()).__name__)

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def services_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Services:
    """The Services the composition root put on the app (every route's way to its dependencies)."""
    services: Services = connection.app.state.services
    return services
