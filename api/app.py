"""The composition root: the one place that wires settings, database, upstream and routes."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any, Final

import asyncpg
import httpx
import msgspec
import structlog
from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.openapi.config import OpenAPIConfig

from spendledger.api.budget_gauges import BudgetGauges
from spendledger.api.deployment_limits import DeploymentLimits
from spendledger.api.docs_ui import assets_router, render_plugins
from spendledger.api.errors import exception_handlers
from spendledger.api.json_body import BoundedJsonRequest
from spendledger.api.keycache import KeyCache
from spendledger.api.logging import configure_logging
from spendledger.api.metrics import observe_hold_exceeded
from spendledger.api.publishing import PublisherRunner, outbox_rows_builder, recording_context
from spendledger.api.routes import (
    audit,
    budgets,
    customers,
    export,
    health,
    keys,
    outbox,
    proxy,
    spend,
    teams,
    usage,
    users,
)
from spendledger.api.routes import lago_webhooks as lago_webhooks_route
from spendledger.api.routing import ModelRouter
from spendledger.api.runtime import freeze_startup_heap
from spendledger.api.schemas import COMPONENTS, MoneyAsNumber
from spendledger.api.services import Services
from spendledger.api.ui import route_handlers as ui_route_handlers
from spendledger.api.upstream import Upstream
from spendledger.ledger.admission import GroupAdmitter
from spendledger.ledger.background import BackgroundTasks
from spendledger.ledger.budget_calendar import set_budget_timezone
from spendledger.ledger.config import Settings, load_settings
from spendledger.ledger.db import create_pool, wait_for_database
from spendledger.ledger.holds_sweeper import STALE_AFTER, HoldSweeper, process_name
from spendledger.ledger.keys import hash_key
from spendledger.ledger.lago_webhooks import LagoWebhookReceiver
from spendledger.ledger.leases import BudgetLeases
from spendledger.ledger.master_key import master_key_verdict
from spendledger.ledger.pricing import PriceBook
from spendledger.ledger.publisher_wakeups import PublisherWakeups
from spendledger.ledger.sinks.lago_reader import LagoReader
from spendledger.ledger.tickets import Tickets
from spendledger.ledger.usage import GroupRecorder
from spendledger.projections.budgets_remaining import Mark
from spendledger.projections.daily import DailySpendFollower

log = structlog.get_logger(__name__)


def _process_stale_after() -> timedelta:
    """SPENDLEDGER_PROCESS_STALE_S shortens how long a silent process is waited for (tests of
    killed servers use it)."""
    value = os.environ.get("SPENDLEDGER_PROCESS_STALE_S")
    return timedelta(seconds=float(value)) if value else STALE_AFTER


def create_app(
    settings: Settings, database_url: str, publish: bool = True, freeze_heap: bool = False
) -> Litestar:
    """The app; with `publish=False` it enqueues outbox rows but leaves their delivery to a separate
    `spendledger publish` process (off the serving event loop). With `freeze_heap` (a server
    process's own app) what start-up leaves alive is frozen out of the garbage collector's walks."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await wait_for_database(database_url)
        # The pool's connections carry this process's name: the holds it takes are marked with it.
        owner = process_name()
        pool = await create_pool(database_url, max_size=settings.database_pool_limit, application_name=owner)
        await set_budget_timezone(pool, settings.timezone)
        sweeper = HoldSweeper(pool, owner, stale_after=_process_stale_after())
        await sweeper.start()
        # Leases are asked for only while changes to scopes are heard (they retire on each).
        leases = BudgetLeases(pool, trusted=lambda: key_cache.listening) if settings.budget_leases else None
        key_cache = KeyCache(pool, database_url, on_scope_change=leases.invalidate if leases else lambda: None)
        await key_cache.start()
        upstream = Upstream()
        lago_client, lago_webhooks = lago_receiver(settings, pool)
        publisher = PublisherRunner(pool, database_url, settings, deliver=publish)
        context = recording_context(settings)
        outbox_rows = outbox_rows_builder(settings)
        recorder = GroupRecorder(pool, context, wakeups=PublisherWakeups(pool))
        admitter = GroupAdmitter(pool)
        background = BackgroundTasks()
        tickets = Tickets(
            pool,
            admitter,
            leases,
            recorder,
            outbox_rows=outbox_rows,
            announce_refusals=settings.webhook is not None,
            on_hold_exceeded=observe_hold_exceeded,
            background=background,
        )
        prices = PriceBook(settings.deployments)
        router = ModelRouter(
            settings.deployments,
            settings.router,
            # Under reject_unpriced_models an unpriced deployment is never called (a group left
            # with none is refused as unpriced).
            (lambda d: prices.price(d.deployment_id) is not None) if settings.reject_unpriced_models else lambda d: True,
        )
        usage_based = settings.router.routing_strategy == "usage-based-routing"
        limited = usage_based or any(d.rpm is not None or d.tpm is not None for d in settings.deployments)
        services = Services(
            settings=settings,
            database_url=database_url,
            pool=pool,
            upstream=upstream,
            keys=key_cache,
            prices=prices,
            router=router,
            master_key_hash=hash_key(settings.master_key or "anonymous"),
            budgets=settings.budget_settings(),
            tickets=tickets,
            publisher=publisher,
            background=background,
            lago_webhooks=lago_webhooks,
            recording_context=context,
            outbox_rows=outbox_rows,
            limits=DeploymentLimits(pool, usage_based) if limited else None,
        )
        app.state.services = services
        publisher.start()
        recorder.start()
        if leases is not None:
            leases.start()
        follower = DailySpendFollower(pool)
        follower.start()
        gauges = BudgetGauges(pool, [Mark(*m) for m in settings.budget_gauges], settings.budget_settings())
        gauges.start()
        if freeze_heap:
            freeze_startup_heap()
        try:
            yield
        finally:
            # In-flight requests are finished by the server before lifespan ends; recordings that
            # outlived their request (client hang-ups) are awaited here so none is lost, then the
            # HoldExceeded appends they started.
            await background.drain()
            await admitter.stop()
            await recorder.stop()
            if leases is not None:
                await leases.stop()  # after the last settle: what they leave is given back
            await sweeper.stop()
            await follower.stop()
            await gauges.stop()
            await publisher.stop()
            await key_cache.stop()
            await upstream.aclose()
            if lago_client is not None:
                await lago_client.aclose()
            await pool.close()

    return Litestar(
        route_handlers=[
            *proxy.route_handlers,
            *keys.route_handlers,
            *customers.route_handlers,
            *budgets.route_handlers,
            *teams.route_handlers,
            *users.route_handlers,
            *health.route_handlers,
            *spend.route_handlers,
            *outbox.route_handlers,
            *audit.route_handlers,
            *export.route_handlers,
            *lago_webhooks_route.route_handlers,
            *usage.route_handlers,
            assets_router(),
            *ui_route_handlers,
        ],
        lifespan=[lifespan],
        exception_handlers=dict(exception_handlers),
        request_class=BoundedJsonRequest,  # JSON bodies nested too deeply are a 400
        request_max_body_size=settings.max_request_size_bytes,
        openapi_config=OpenAPIConfig(
            title="spendledger", version="0.1.0", components=COMPONENTS, render_plugins=render_plugins()
        ),
        plugins=[MoneyAsNumber()],
        cors_config=CORSConfig(
            allow_origins=list(settings.cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
            allow_credentials=settings.cors_allow_credentials,
            expose_headers=list(EXPOSED_HEADERS),
        ),  # Decimal in the OpenAPI document: the JSON number it is sent as
        debug=False,
    )


# What a browser client may read of an answer (LiteLLM exposes the same).
EXPOSED_HEADERS: Final = (
    "x-litellm-call-id", "x-litellm-response-cost", "x-litellm-model-id", "x-litellm-model-group",
    "retry-after", "x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens",
)  # fmt: skip


def lago_receiver(
    settings: Settings, pool: asyncpg.Pool
) -> tuple[httpx.AsyncClient | None, LagoWebhookReceiver | None]:
    """With Lago configured, the receiver of its webhooks (and the client that fetches its public key)."""
    if settings.lago is None:
        return None, None
    client = httpx.AsyncClient(timeout=10)
    reader = LagoReader(settings.lago, client)
    return client, LagoWebhookReceiver(pool, settings.lago.webhook_hmac_key, reader.webhook_public_key)


def create_app_from_env() -> Litestar:
    """Factory for server workers: the CLI puts the config path and database URL in the environment."""
    json_logs = os.environ.get("SPENDLEDGER_JSON_LOGS")  # a worker: the CLI's choices (api/cli.py)
    configure_logging(os.environ.get("SPENDLEDGER_LOG_LEVEL", "INFO"), None if json_logs is None else json_logs == "1")
    settings = load_settings(os.environ["SPENDLEDGER_CONFIG"])
    if limit := os.environ.get("SPENDLEDGER_DATABASE_POOL_LIMIT"):  # DATABASE_URL's connection_limit
        settings = msgspec.structs.replace(settings, database_pool_limit=int(limit))
    publish = os.environ.get("SPENDLEDGER_PUBLISH", "1") != "0"
    return create_app(settings, os.environ["SPENDLEDGER_DATABASE_URL"], publish=publish, freeze_heap=True)


def startup_warnings(settings: Settings, prices: PriceBook) -> list[dict[str, Any]]:
    warnings: list[dict[str, Any]] = [{"event": "config_warning", "detail": w} for w in settings.warnings]
    for deployment in settings.deployments:
        if prices.price(deployment.deployment_id) is None:
            warnings.append(
                {
                    "event": "model_unpriced",
                    "model": deployment.model_name,
                    "upstream_model": deployment.upstream_model,
                    "detail": "served at cost 0 (set model_info prices, or reject_unpriced_models)",
                }
            )
    weak_key = master_key_verdict(settings).warning()
    if weak_key is not None:  # only ever permitted here: `spendledger serve` refuses it otherwise
        warnings.append({"event": "weak_master_key", "detail": weak_key})
    return warnings
