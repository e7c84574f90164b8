"""What the routes share: settings, pool, upstream client, key cache, prices, router, and the
ledger's side of a proxied request (`tickets`: admission and settle).

Built once by the composition root (`api.app`) and put in `app.state.services`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog
from litestar.connection import ASGIConnection

from spendledger.api.deployment_limits import DeploymentLimits
from spendledger.api.keycache import KeyCache
from spendledger.api.publishing import PublisherRunner
from spendledger.api.routing import ModelRouter
from spendledger.api.upstream import Upstream
from spendledger.ledger.background import BackgroundTasks
from spendledger.ledger.config import Settings
from spendledger.ledger.lago_webhooks import LagoWebhookReceiver
from spendledger.ledger.pricing import PriceBook
from spendledger.ledger.scopes import BudgetSettings
from spendledger.ledger.tickets import OutboxRows, Tickets, no_outbox_rows
from spendledger.ledger.usage import NO_CONTEXT, RecordingContext

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
    background: BackgroundTasks  # settles that outlive their request; drained at shutdown
    # What a settle of usage that did not come through the proxy needs (api/ingest.py).
    recording_context: RecordingContext = NO_CONTEXT
    outbox_rows: OutboxRows = no_outbox_rows
    lago_webhooks: LagoWebhookReceiver | None = None  # with Lago configured: its events.errors
    # Deployments' rpm / tpm in PostgreSQL: None when no deployment sets one and the strategy is
    # not usage-based (then routing never leaves the process).
    limits: DeploymentLimits | None = None


def services_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Services:
    """The Services the composition root put on the app (every route's way to its dependencies)."""
    services: Services = connection.app.state.services
    return services
