"""Issue 15's probe of the outbox, replayed over the real HTTP client (aiohttp under httpx) and fake
receivers on sockets. Both failed on 8e40733:

- a dedupe key holding CR LF (a client id that reached a `budget_crossed` key) made aiohttp refuse
  the `webhook-id` header with a ValueError, which rolled the batch back and left the row at the head
  of the claim order: its neighbours were re-sent every second and the rows after it never went;
- a webhook receiver that takes seconds to answer held the publisher's claim transaction open, so
  new events stayed out of `/audit/events` (below the snapshot horizon) and Lago waited for it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg

from spendledger.api.http_client import pooled_client
from spendledger.ledger.config import LagoSettings, WebhookSettings
from spendledger.ledger.outbox import CHANNEL, Publisher
from spendledger.ledger.sinks.lago import LagoSink, lago_row
from spendledger.ledger.sinks.webhook import WebhookSink
from spendledger.ledger.usage import NO_CONTEXT, Recording, record_usages
from spendledger.projections.audit import AuditFilters, read_events
from tests.fakes.lago import DEFAULT_API_KEY, FakeLago, run_fake_lago
from tests.fakes.webhooks import FakeWebhookReceiver, run_fake_webhook_receiver
from tests.integration.ledger.test_group_recorder import usage

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
EVIL_KEY = "budget_crossed:customer:evil\r\nX-Injected: yes:0:max"


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 30.0) -> bool:
    for _ in range(int(timeout_s / 0.05)):
        if await check():
            return True
        await asyncio.sleep(0.05)
    return await check()


@contextlib.asynccontextmanager
async def publishing(publisher: Publisher) -> AsyncIterator[None]:
    task = asyncio.create_task(publisher.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def enqueue_webhooks(pool: asyncpg.Pool, *keys: str) -> None:
    for key in keys:
        await pool.execute(
            "select sl_enqueue_webhook('spend_tracked', $1, '{}'::jsonb, '{\"customer_id\": \"c\"}'::jsonb)",
            key,
        )
    await pool.execute("select pg_notify($1, '')", CHANNEL)


async def test_a_dedupe_key_with_crlf_does_not_jam_the_webhook_outbox(
    pool: asyncpg.Pool, database_url: str
) -> None:
    before = [f"spend_tracked:before-{i}" for i in range(3)]
    after = [f"spend_tracked:after-{i}" for i in range(60)]  # more than a batch behind it
    await enqueue_webhooks(pool, *before)
    await pool.execute(
        "select sl_enqueue_webhook('budget_crossed', $1, '{}'::jsonb, '{\"customer_id\": \"evil\"}'::jsonb)",
        EVIL_KEY,
    )
    await enqueue_webhooks(pool, *after)
    client = pooled_client(20)
    with run_fake_webhook_receiver(FakeWebhookReceiver()) as receiver:
        sink = WebhookSink(WebhookSettings(url=receiver.url, secret=SECRET), client)
        publisher = Publisher(pool, database_url, [sink])

        async def settled() -> bool:
            return not await pool.fetchval("select count(*) from outbox where state = 'pending'")

        async with publishing(publisher):
            assert await eventually(settled), await pool.fetch(
                "select dedupe_key, attempts, last_error from outbox where state = 'pending' limit 5"
            )
        deliveries = list(receiver.app.deliveries)
    await client.aclose()
    sent = Counter(d.webhook_id for d in deliveries)
    assert all(sent[key] == 1 for key in before + after), sent.most_common(3)  # each good row once
    rows = {r["dedupe_key"]: r["state"] for r in await pool.fetch("select dedupe_key, state from outbox")}
    assert all(rows[key] == "delivered" for key in before + after)
    evil = [d for d in deliveries if d.json.get("event_id") == EVIL_KEY]
    if rows[EVIL_KEY] == "delivered":  # sent once, under an id that is one header
        [copy] = evil
        assert copy.webhook_id is not None and "\r" not in copy.webhook_id and "\n" not in copy.webhook_id
        assert "x-injected" not in copy.headers
    else:
        assert rows[EVIL_KEY] == "dead" and len(evil) <= 1
    assert len(deliveries) == len(before) + len(after) + len(evil)  # nothing re-sent in a loop
    receiver.app.verify(SECRET)


async def test_a_webhook_receiver_taking_seconds_delays_neither_lago_nor_the_audit_log(
    pool: asyncpg.Pool, database_url: str
) -> None:
    slow = FakeWebhookReceiver(delay_s=600.0)  # answers when the test ends, not before
    client = pooled_client(20)
    with run_fake_webhook_receiver(slow) as receiver, run_fake_lago(FakeLago()) as lago:
        settings = LagoSettings(
            api_base=lago.base_url, api_key=DEFAULT_API_KEY, event_code="tokens", charge_by="end_user_id"
        )
        # The client would give up on the receiver after 10 s and retry later; here it waits as long
        # as the receiver takes, so that its row is in flight (claimed, never marked) throughout.
        hooks = WebhookSink(WebhookSettings(url=receiver.url), client, timeout_s=600.0)
        sinks = [hooks, LagoSink(settings, client)]
        publisher = Publisher(pool, database_url, sinks)
        async with publishing(publisher):
            await enqueue_webhooks(pool, "spend_tracked:slow")
            assert await eventually(lambda: _true(len(slow.deliveries) == 1))  # now in flight, for minutes

            event = usage("recorded-while-slow", "patient")
            await record_usages(
                pool, [Recording(event=event, outbox=[lago_row(event, settings)])], NO_CONTEXT
            )
            # At once below the snapshot horizon: the audit log shows it.
            events, _ = await read_events(pool, AuditFilters(customer="patient", types=("UsageRecorded",)))
            assert [e.stream for e in events] == ["request:recorded-while-slow"]
            # And Lago gets it while the webhook is still unanswered.
            assert await eventually(
                lambda: _true(lago.app.accepted_transaction_ids() == ["recorded-while-slow"])
            )
            # ... in flight all along: received once, its row not yet marked.
            assert len(slow.deliveries) == 1
            webhook = await pool.fetchrow("select state, attempts from outbox where sink = 'webhook'")
            assert (webhook["state"], webhook["attempts"]) == ("pending", 0)
    await client.aclose()


async def _true(value: bool) -> bool:
    return value
