"""The outbox end to end (CONTRACT §6): Lago usage events and spend webhooks leave the system
exactly once — through Lago being down, slow, refusing our key or one poison event, through a
publisher SIGKILLed between send and mark, and through two publishers racing.

Every fault test ends with `assert_lago_exactly_once`: the fake Lago's accepted transaction_ids are
exactly the ledger's UsageRecorded call_ids that have a charge-by id, each answered 2xx exactly once,
with the event's exact cost, and every copy ever sent of one event identical (frozen timestamp).
Where a test would otherwise wait out a publisher backoff it makes the pending rows due with SQL
(`make_due`), which stands for time passing.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from spendledger.ledger.config import LagoSettings
from spendledger.ledger.outbox import Claimed, Delivery, Publisher
from spendledger.ledger.sinks.lago import LagoSink
from tests.e2e.conftest import MASTER_KEY
from tests.e2e.enforcement_support import post, query, unit_cost, wait_until
from tests.e2e.outbox_support import (
    EVENT_CODE,
    LAGO_KEY,
    WEBHOOK_SECRET,
    assert_lago_exactly_once,
    chat_ok,
    chat_without_customer,
    chats,
    closed_url,
    db_counts,
    lago_env,
    make_due,
    outbox_config,
    outbox_status,
    postpone,
    run_publisher,
    sent_copies,
    sink_counts,
    webhook_env,
)
from tests.fakes.lago import FakeLago, RunningLago, run_fake_lago
from tests.fakes.upstream import RunningUpstream
from tests.fakes.webhooks import FakeWebhookReceiver, RunningWebhookReceiver, run_fake_webhook_receiver
from tests.support import PROJECT_ROOT, free_port, run_server


@pytest.fixture
def lago() -> Iterator[RunningLago]:
    with run_fake_lago(FakeLago()) as running:
        yield running


@pytest.fixture
def receiver() -> Iterator[RunningWebhookReceiver]:
    with run_fake_webhook_receiver(FakeWebhookReceiver()) as running:
        yield running


def publisher_state(base_url: str, sink: str = "lago") -> str:
    state: str = outbox_status(base_url)["publisher"][sink]["state"]
    return state


def lago_ids(lago: RunningLago) -> set[str]:
    return {tid for _, tid in dict(lago.app.accepted)}


# --- 1. the happy path ---


def test_each_customer_request_becomes_one_lago_event_and_usage_without_customer_is_unbillable(
    upstream: RunningUpstream, lago: RunningLago, database_url: str
) -> None:
    config = outbox_config(upstream.base_url, lago=True)
    with run_server(config, database_url, env=lago_env(lago.base_url)) as server:
        customers = [f"c{i % 5 + 1}" for i in range(20)]
        call_ids = chats(server.base_url, customers)
        unbillable = chat_without_customer(server.base_url)
        assert wait_until(lambda: len(lago.app.accepted) == 20, 30)
        assert wait_until(
            lambda: (
                sink_counts(server.base_url) == {"pending": 0, "delivered": 20, "dead": 0, "unbillable": 1}
            ),
            15,
        )
        status = outbox_status(server.base_url)
        assert status["dead_letters"] == []
        assert "webhook_follower" not in status  # no webhooks: nothing follows the log for them
        assert status["publisher"]["lago"]["state"] == "ok"
        assert status["publisher"]["lago"]["last_delivery_at"] is not None
    ledger = assert_lago_exactly_once(lago, database_url, expected=20)
    assert set(ledger) == set(call_ids)
    for index in range(1, 6):
        assert len(lago.app.events_for(f"c{index}")) == 4
    # The request without a customer is kept (in the ledger and the outbox) but never sent.
    assert unbillable not in sent_copies(lago)
    [row] = query(
        database_url, "select state, payload from outbox where sink = 'lago' and call_id = $1", unbillable
    )
    assert row["state"] == "unbillable"
    assert json.loads(row["payload"])["external_subscription_id"] is None
    assert query(database_url, "select 1 from events where stream = $1", f"request:{unbillable}")


def test_serve_without_publisher_leaves_delivery_to_a_publish_process(
    upstream: RunningUpstream, lago: RunningLago, database_url: str
) -> None:
    config = outbox_config(upstream.base_url, lago=True)
    env = lago_env(lago.base_url)
    with run_server(config, database_url, env=env, args=["--no-publisher"]) as server:
        call_ids = chats(server.base_url, [f"np-{i}" for i in range(10)])
        time.sleep(1.5)  # a publisher in the server would have delivered by now (NOTIFY wakes it)
        assert lago.app.accepted == {}
        assert db_counts(database_url) == {"pending": 10}
        with run_publisher(config, database_url, env) as publisher:
            assert wait_until(lambda: db_counts(database_url) == {"delivered": 10}, 30), publisher.log()
    ledger = assert_lago_exactly_once(lago, database_url, expected=10)
    assert set(ledger) == set(call_ids)


def test_lago_charge_by_team_id_charges_the_keys_team(
    upstream: RunningUpstream, lago: RunningLago, database_url: str
) -> None:
    config = outbox_config(upstream.base_url, lago=True)
    env = lago_env(lago.base_url, charge_by="team_id")
    with run_server(config, database_url, env=env) as server:
        key = post(server.base_url, "/key/generate", {"team_id": "lago-team"}).json()["key"]
        team_calls = chats(server.base_url, ["team-cust-1", "team-cust-2", "team-cust-3"], key=key)
        without_team = chat_ok(server.base_url, "team-cust-1")  # the master key has no team
        assert wait_until(
            lambda: (
                sink_counts(server.base_url) == {"pending": 0, "delivered": 3, "dead": 0, "unbillable": 1}
            ),
            30,
        )
    ledger = assert_lago_exactly_once(lago, database_url, charge_field="team_id", expected=3)
    assert set(ledger) == set(team_calls)
    assert {sub for sub, _ in lago.app.accepted} == {"lago-team"}
    assert without_team not in sent_copies(lago)


# --- 2. Lago down ---


def test_lago_down_during_200_requests_then_up_delivers_each_exactly_once(
    upstream: RunningUpstream, lago: RunningLago, database_url: str
) -> None:
    lago.app.down = True
    config = outbox_config(upstream.base_url, lago=True)
    with run_server(config, database_url, env=lago_env(lago.base_url)) as server:
        chats(server.base_url, [f"down-{i % 10}" for i in range(200)], workers=16)
        assert wait_until(lambda: publisher_state(server.base_url) == "failing", 15)
        counts = sink_counts(server.base_url)
        assert (counts["pending"], counts["delivered"], counts["dead"]) == (200, 0, 0)
        assert counts["oldest_pending_age_s"] > 0
        assert outbox_status(server.base_url)["publisher"]["lago"]["last_error"] == "lago answered 503"
        assert lago.app.accepted == {}
        assert {r.status for r in lago.app.event_requests()} == {503}
        lago.app.down = False
        # No help here: the publisher's own backoff (1 s doubling, a few seconds at most after a
        # few seconds down) brings every row back.
        assert wait_until(lambda: sink_counts(server.base_url).get("delivered") == 200, 90, 0.5)
        counts = sink_counts(server.base_url)
        assert (counts["pending"], counts["dead"]) == (0, 0)
        assert "oldest_pending_age_s" not in counts
        assert publisher_state(server.base_url) == "ok"
    assert_lago_exactly_once(lago, database_url, expected=200)


# --- 3. Lago slower than the client timeout ---


class RecordingSink:
    """A sink that remembers what each delivery made of its batch."""

    def __init__(self, inner: LagoSink) -> None:
        self.inner = inner
        self.name = inner.name
        self.batch_size = inner.batch_size
        self.deliveries: list[Delivery] = []

    async def deliver(self, rows: Any) -> Delivery:
        rows = list(rows)
        assert all(isinstance(row, Claimed) for row in rows)
        delivery = await self.inner.deliver(rows)
        self.deliveries.append(delivery)
        return delivery


def publish_once_in_process(database_url: str, lago_base_url: str, timeout_s: float) -> Delivery:
    """One claim–send–mark round of a real Publisher, with a Lago client timeout short enough for a test."""

    async def run() -> Delivery:
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        assert pool is not None
        try:
            async with httpx.AsyncClient() as client:
                settings = LagoSettings(
                    api_base=lago_base_url, api_key=LAGO_KEY, event_code=EVENT_CODE, charge_by="end_user_id"
                )
                sink = RecordingSink(LagoSink(settings, client, timeout_s=timeout_s))
                publisher = Publisher(pool, database_url, [sink])
                assert await publisher.publish_once(sink) > 0
                [delivery] = sink.deliveries
                return delivery
        finally:
            await pool.close()

    return asyncio.run(run())


def test_lago_answering_after_the_timeout_stored_the_batch_and_the_retry_is_deduplicated(
    upstream: RunningUpstream, lago: RunningLago, database_url: str
) -> None:
    config = outbox_config(upstream.base_url, lago=True)
    # The server records the usage; its own publisher cannot reach Lago (nothing listens there).
    with run_server(config, database_url, env=lago_env(closed_url())) as server:
        call_ids = chats(server.base_url, [f"slow-{i}" for i in range(5)])
    # The server is stopped: the publisher below is the only one.
    before = {
        r["call_id"]: r["attempts"] for r in query(database_url, "select call_id, attempts from outbox")
    }
    assert set(before) == set(call_ids)
    lago.app.delay_s = 1.0  # Lago stores the batch at once, and answers after our 0.5 s timeout
    make_due(database_url)
    first = publish_once_in_process(database_url, lago.base_url, timeout_s=0.5)
    assert first.delivered == [] and first.dead == {}
    assert set(first.retry.values()) == {"lago unreachable: ReadTimeout"} and len(first.retry) == 5
    assert lago_ids(lago) == set(call_ids)  # ... yet Lago holds them
    rows = query(database_url, "select call_id, state, attempts, last_error from outbox")
    for row in rows:
        assert row["state"] == "pending"
        assert row["attempts"] == before[row["call_id"]] + 1
        assert row["last_error"] == "lago unreachable: ReadTimeout"
    lago.app.delay_s = 0.0
    make_due(database_url)
    second = publish_once_in_process(database_url, lago.base_url, timeout_s=0.5)
    assert sorted(second.delivered) == sorted(first.retry) and second.dead == {} and second.retry == {}
    # The retry was answered 422 value_already_exist for every event: that is success.
    assert [r.status for r in lago.app.event_requests()] == [200, 422]
    assert db_counts(database_url) == {"delivered": 5}
    assert_lago_exactly_once(lago, database_url, expected=5)


# --- 4. a publisher SIGKILLed between send and mark ---


def test_publisher_killed_between_send_and_mark_resends_and_lago_dedupes(
    upstream: RunningUpstream, lago: RunningLago, database_url: str
) -> None:
    config = outbox_config(upstream.base_url, lago=True)
    with run_server(config, database_url, env=lago_env(closed_url())) as server:
        call_ids = chats(server.base_url, [f"killed-{i}" for i in range(10)])
    before = {
        r["call_id"]: r["attempts"] for r in query(database_url, "select call_id, attempts from outbox")
    }
    lago.app.delay_s = 3.0  # stores at once, answers late: the batch is "sent but not acknowledged"
    make_due(database_url)
    with run_publisher(config, database_url, lago_env(lago.base_url)) as first:
        assert wait_until(lambda: len(lago.app.accepted) == 10, 30, 0.02), first.log()
        first.process.kill()
        first.process.wait()
    assert first.process.returncode == -signal.SIGKILL
    # It held no transaction: its claim outlives it as a lease. The rows are pending and unmarked,
    # out of the due set until the lease ends (test_publisher_leases.py waits one out).
    leased = query(
        database_url,
        "select o.id from outbox o, outbox_claims c where o.id = any(c.ids) and c.lease_until > now() "
        "and o.sink = 'lago' and o.state = 'pending'",
    )
    assert len(leased) == 10
    after = {r["call_id"]: r["attempts"] for r in query(database_url, "select call_id, attempts from outbox")}
    assert after == before
    lago.app.delay_s = 0.0
    query(database_url, "update outbox_claims set lease_until = now() returning id")  # the lease ends
    with run_publisher(config, database_url, lago_env(lago.base_url)) as second:
        assert wait_until(lambda: db_counts(database_url) == {"delivered": 10}, 30), second.log()
    assert [r.status for r in lago.app.event_requests()] == [200, 422]
    ledger = assert_lago_exactly_once(lago, database_url, expected=10)
    assert set(ledger) == set(call_ids)


# --- 5. two publishers racing ---


def test_two_publishers_racing_on_300_events_send_each_once(
    upstream: RunningUpstream, lago: RunningLago, database_url: str
) -> None:
    config = outbox_config(upstream.base_url, lago=True)
    with run_server(config, database_url, env=lago_env(closed_url())) as server:
        chats(server.base_url, [f"race-{i % 10}" for i in range(300)], workers=16)
    postpone(database_url)  # nothing due until both publishers listen
    delay = 1.0
    lago.app.delay_s = delay  # each batch stays in flight long enough for the other publisher to claim
    env = lago_env(lago.base_url)
    with (
        run_publisher(config, database_url, env) as first,
        run_publisher(config, database_url, env) as second,
    ):
        first.wait_started()
        second.wait_started()
        make_due(database_url)
        assert wait_until(lambda: db_counts(database_url) == {"delivered": 300}, 60, 0.5), (
            first.log() + second.log()
        )
    requests = lago.app.event_requests()
    assert {r.status for r in requests} == {200}
    copies = sent_copies(lago)
    assert len(copies) == 300
    assert all(len(sent) == 1 for sent in copies.values()), "an event was sent twice without any failure"
    starts = sorted(r.received_at for r in requests)
    assert any(b - a < delay for a, b in itertools.pairwise(starts)), (
        "the two publishers never had a batch in flight at the same time"
    )
    assert_lago_exactly_once(lago, database_url, expected=300)


# --- 6. one poison event in a batch ---


def test_poison_event_becomes_a_dead_letter_the_rest_are_delivered_and_retry_delivers_it(
    upstream: RunningUpstream, lago: RunningLago, database_url: str
) -> None:
    lago.app.down = True  # the rows gather while we learn the call ids
    config = outbox_config(upstream.base_url, lago=True)
    with run_server(config, database_url, env=lago_env(lago.base_url)) as server:
        call_ids = chats(server.base_url, [f"poison-{i}" for i in range(10)])
        poison = call_ids[3]
        lago.app.reject_transaction_ids.add(poison)
        lago.app.down = False
        make_due(database_url)  # all ten due at once: one batch
        assert wait_until(
            lambda: (
                sink_counts(server.base_url) == {"pending": 0, "delivered": 9, "dead": 1, "unbillable": 0}
            ),
            30,
        )
        status = outbox_status(server.base_url)
        [dead] = status["dead_letters"]
        assert (dead["sink"], dead["call_id"], dead["dedupe_key"]) == ("lago", poison, poison)
        assert dead["last_error"].startswith("lago 422") and "value_is_invalid" in dead["last_error"]
        assert lago_ids(lago) == set(call_ids) - {poison}
        # Lago refused the poison's batch as a whole; the others were re-sent at once without it.
        refused = [r for r in lago.app.event_requests() if r.status == 422]
        assert refused
        for request in refused:
            assert poison in [e["transaction_id"] for e in request.json["events"]]
        lago.app.reject_transaction_ids.clear()
        retried = post(server.base_url, "/outbox/retry", {})
        assert retried.status_code == 200 and retried.json() == {"requeued": 1}
        assert wait_until(
            lambda: (
                sink_counts(server.base_url) == {"pending": 0, "delivered": 10, "dead": 0, "unbillable": 0}
            ),
            30,
        )
        assert outbox_status(server.base_url)["dead_letters"] == []
    assert_lago_exactly_once(lago, database_url, expected=10)


# --- 7. Lago refuses our key ---


def metric(base_url: str, line_start: str) -> str | None:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return next((line for line in text.splitlines() if line.startswith(line_start)), None)


def test_lago_refusing_our_key_loses_nothing_says_so_and_delivers_once_fixed(
    upstream: RunningUpstream, lago: RunningLago, database_url: str
) -> None:
    configured = "lago-key-not-yet-accepted"
    config = outbox_config(upstream.base_url, lago=True)
    with run_server(config, database_url, env=lago_env(lago.base_url, api_key=configured)) as server:
        call_ids = chats(server.base_url, [f"auth-{i}" for i in range(5)])
        assert wait_until(lambda: publisher_state(server.base_url) == "unauthorized", 20)
        assert wait_until(lambda: sink_counts(server.base_url).get("pending") == 5, 10)
        assert lago.app.accepted == {}
        assert {r.status for r in lago.app.event_requests()} == {401}
        readiness = httpx.get(f"{server.base_url}/health/readiness", timeout=10)
        assert readiness.json()["status"] == "degraded"
        assert readiness.json()["publisher"] == {"lago": "unauthorized"}
        assert metric(server.base_url, 'spendledger_sink_unauthorized{sink="lago"}') == (
            'spendledger_sink_unauthorized{sink="lago"} 1.0'
        )
        lago.app.api_key = configured  # the key is now valid at Lago
        make_due(database_url)  # stands for the 30 s until the publisher probes again
        assert wait_until(lambda: sink_counts(server.base_url).get("delivered") == 5, 30)
        assert publisher_state(server.base_url) == "ok"
        assert httpx.get(f"{server.base_url}/health/readiness", timeout=10).json()["status"] == "healthy"
        assert metric(server.base_url, 'spendledger_sink_unauthorized{sink="lago"}') == (
            'spendledger_sink_unauthorized{sink="lago"} 0.0'
        )
    ledger = assert_lago_exactly_once(lago, database_url, expected=5, api_key=configured)
    assert set(ledger) == set(call_ids)


# --- 8. webhooks ---

SPEND_TRACKED_KEYS = {
    "spend",
    "max_budget",
    "token",
    "customer_id",
    "user_id",
    "team_id",
    "user_email",
    "key_alias",
    "projected_exceeded_date",
    "projected_spend",
    "event",
    "event_group",
    "event_message",
    "event_id",
    "created_at",
    "total_spend",
}
_NUMBER = re.compile(r'"(spend|max_budget|soft_budget|total_spend)":\s*([^,}\s]+)')


def assert_exact_money(body: bytes) -> None:
    """Money fields are JSON numbers written with plain decimal digits (no float noise, no exponent)."""
    for _, text in _NUMBER.findall(body.decode()):
        assert text == "null" or re.fullmatch(r"-?\d+(\.\d+)?", text), text


def webhooks_unfollowed(database_url: str) -> int:
    """Events the webhook follower has not read yet: their rows are still to be written."""
    return int(
        query(
            database_url,
            "select count(*) as n from events e, projection_checkpoints c where c.name = 'webhooks' "
            "and (e.txid, e.position) > (c.last_txid, c.last_position)",
        )[0]["n"]
    )


def wait_webhooks_delivered(
    database_url: str, receiver: RunningWebhookReceiver, timeout_s: float = 30
) -> int:
    def done() -> bool:
        counts = db_counts(database_url, "webhook")
        return (
            webhooks_unfollowed(database_url) == 0
            and counts.get("pending", 0) == 0
            and len(receiver.app.unique_ids()) == counts.get("delivered")
        )

    assert wait_until(done, timeout_s, 0.3), db_counts(database_url, "webhook")
    return db_counts(database_url, "webhook")["delivered"]


def in_flight_while(server_url: str, upstream: RunningUpstream, customer: str, during: Any) -> str:
    """A chat held upstream while `during()` runs (e.g. a budget change); returns its call id."""
    upstream.app.delay_s = 1.5
    seen = len(upstream.app.requests)
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(chat_ok(server_url, customer)))
    thread.start()
    assert wait_until(lambda: len(upstream.app.requests) > seen, 10, 0.02)
    during()
    thread.join(30)
    upstream.app.delay_s = 0.0
    [call_id] = result
    return call_id


def test_webhooks_spend_tracked_signed_exactly_once_and_each_budget_crossing_once_per_period(
    upstream: RunningUpstream, receiver: RunningWebhookReceiver, database_url: str
) -> None:
    c = unit_cost()
    config = outbox_config(upstream.base_url, webhook=True)
    with run_server(config, database_url, env=webhook_env(receiver.url)) as server:
        url = server.base_url
        # A: spend_tracked through a receiver that fails three times first.
        receiver.app.fail_next = 3
        fields = {"user_id": "wh-user", "team_id": "wh-team", "key_alias": "wh-alias"}
        key = post(url, "/key/generate", fields).json()["key"]
        plain = [chat_ok(url, "wh-plain", key) for _ in range(4)]
        assert wait_webhooks_delivered(database_url, receiver) == 4
        deliveries = list(receiver.app.deliveries)
        assert len(deliveries) == 7 and sum(not d.ok for d in deliveries) == 3
        receiver.app.verify(WEBHOOK_SECRET)  # every delivery, failed or not, is signed
        ok_ids = Counter(d.webhook_id for d in deliveries if d.ok)
        assert set(ok_ids.values()) == {1}  # each delivered (2xx) exactly once
        first_body = {d.webhook_id: d.body for d in deliveries if d.ok}
        for delivery in deliveries:  # retries keep the webhook-id and the body
            assert delivery.body == first_body[delivery.webhook_id]
        payloads = receiver.app.delivered_payloads("spend_tracked")
        assert sorted(p["event_id"] for p in payloads) == sorted(f"spend_tracked:{i}" for i in plain)
        for delivery in deliveries:
            assert key.encode() not in delivery.body
            assert delivery.headers["content-type"] == "application/json"
            assert delivery.webhook_id == delivery.json["event_id"]
            assert_exact_money(delivery.body)
        for payload in payloads:
            assert set(payload) == SPEND_TRACKED_KEYS
            assert payload["token"] == hashlib.sha256(key.encode()).hexdigest()
            assert payload["spend"] == c and isinstance(payload["spend"], Decimal)
            assert (payload["customer_id"], payload["user_id"], payload["team_id"]) == (
                "wh-plain",
                "wh-user",
                "wh-team",
            )
            assert (payload["key_alias"], payload["event"], payload["event_group"]) == (
                "wh-alias",
                "spend_tracked",
                "customer",
            )
            assert payload["max_budget"] is None and payload["user_email"] is None
            assert payload["projected_exceeded_date"] is None and payload["projected_spend"] is None
            assert "wh-plain" in payload["event_message"]
        assert sorted(p["total_spend"] for p in payloads) == [c * n for n in range(1, 5)]

        # B: a customer with max_budget 100c and soft_budget 50c, spent one request at a time.
        assert (
            post(
                url,
                "/customer/new",
                {"user_id": "wh-budget", "max_budget": str(100 * c), "soft_budget": str(50 * c)},
            ).status_code
            == 200
        )
        for _ in range(95):
            chat_ok(url, "wh-budget")

        # The 96th request's hold no longer fits under 100c; lower the budget while it is in flight
        # so that it lands on the other side of the new line: budget_crossed.
        def lower(amount: Decimal) -> Any:
            return lambda: post(url, "/customer/update", {"user_id": "wh-budget", "max_budget": str(amount)})

        in_flight_while(url, upstream, "wh-budget", lower(Decimal("95.5") * c))
        # Raised and crossed again in the same period: not announced again.
        assert (
            post(url, "/customer/update", {"user_id": "wh-budget", "max_budget": str(200 * c)}).status_code
            == 200
        )
        in_flight_while(url, upstream, "wh-budget", lower(Decimal("96.5") * c))
        assert customer_spend(database_url, "wh-budget") == 97 * c

        # C: a soft budget of half a request per 3 s period: crossed once in each period used.
        assert (
            post(
                url,
                "/customer/new",
                {"user_id": "wh-period", "soft_budget": str(c / 2), "budget_duration": "3s"},
            ).status_code
            == 200
        )
        chat_ok(url, "wh-period")
        chat_ok(url, "wh-period")
        time.sleep(3.1)
        chat_ok(url, "wh-period")

        # D: a soft budget alone (no max_budget, no duration) is crossed once too.
        assert (
            post(
                url, "/customer/new", {"user_id": "wh-soft", "soft_budget": str(Decimal("1.5") * c)}
            ).status_code
            == 200
        )
        chat_ok(url, "wh-soft")
        chat_ok(url, "wh-soft")

        total = wait_webhooks_delivered(database_url, receiver)
        receiver.app.verify(WEBHOOK_SECRET)
        assert outbox_status(url)["webhook_follower"]["events_behind"] == 0
    crossings = [p for p in receiver.app.delivered_payloads() if p["event"] != "spend_tracked"]
    by_id = {p["event_id"]: p for p in crossings if p["customer_id"] == "wh-budget"}
    assert sorted(by_id) == [
        "budget_crossed:customer:wh-budget:0:max",
        "soft_budget_crossed:customer:wh-budget:0:soft",
        "threshold_crossed:customer:wh-budget:0:85",
        "threshold_crossed:customer:wh-budget:0:95",
    ]
    expected_spend = {"85": 85 * c, "95": 95 * c, "soft": 50 * c, "max": 96 * c}
    for event_id, payload in by_id.items():
        assert payload["spend"] == expected_spend[event_id.rsplit(":", 1)[1]]
        assert payload["event_group"] == "customer"
        assert payload["token"] == hashlib.sha256(MASTER_KEY.encode()).hexdigest()
    assert by_id["budget_crossed:customer:wh-budget:0:max"]["max_budget"] == Decimal("95.5") * c
    assert by_id["threshold_crossed:customer:wh-budget:0:95"]["max_budget"] == 100 * c
    assert "threshold=85%" in by_id["threshold_crossed:customer:wh-budget:0:85"]["event_message"]
    budget_tracked = receiver.app.delivered_payloads("spend_tracked")
    totals = sorted(p["total_spend"] for p in budget_tracked if p["customer_id"] == "wh-budget")
    assert totals == [c * n for n in range(1, 98)]

    periods = query(
        database_url,
        "select distinct r->>2 as period from events, jsonb_array_elements(data->'budget_periods') r "
        "where type = 'UsageRecorded' and data->>'customer_id' = 'wh-period' and r->>0 = 'customer'",
    )
    soft_period = [p for p in crossings if p["customer_id"] == "wh-period"]
    assert len(periods) >= 2
    assert [p["event"] for p in soft_period] == ["soft_budget_crossed"] * len(periods)
    assert len({p["event_id"] for p in soft_period}) == len(periods)

    soft_only = [p for p in crossings if p["customer_id"] == "wh-soft"]
    assert [(p["event"], p["spend"]) for p in soft_only] == [("soft_budget_crossed", 2 * c)]

    webhook_rows = query(database_url, "select count(*) as n from outbox where sink = 'webhook'")[0]["n"]
    assert total == webhook_rows == len(receiver.app.unique_ids())
    assert set(Counter(d.webhook_id for d in receiver.app.successful()).values()) == {1}


def customer_spend(database_url: str, customer: str) -> Decimal:
    rows = query(
        database_url, "select spend from spend_totals where scope = 'customer' and scope_id = $1", customer
    )
    spend: Decimal = rows[0]["spend"]
    return spend


# --- 9. start-up without the Lago key ---


@pytest.mark.parametrize("command", ["serve", "publish"])
def test_lago_callback_without_its_api_key_stops_start_up_naming_it(
    upstream: RunningUpstream, tmp_path: Path, command: str
) -> None:
    config_path = tmp_path / "config.yaml"
    config_path.write_text(outbox_config(upstream.base_url, lago=True))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAGO_", "WEBHOOK_"))}
    env.update(lago_env(closed_url()))
    del env["LAGO_API_KEY"]
    # Nothing listens at this database: the config error must come first.
    env["DATABASE_URL"] = "postgresql://nobody@127.0.0.1:9/nothing"
    args = [sys.executable, "-m", "spendledger.api", command, "--config", str(config_path)]
    if command == "serve":
        args += ["--port", str(free_port())]
    result = subprocess.run(args, cwd=PROJECT_ROOT, env=env, capture_output=True, timeout=60)
    output = (result.stdout + result.stderr).decode()
    assert result.returncode != 0, output
    assert "LAGO_API_KEY" in output
    assert "LAGO_API_BASE" not in output and "LAGO_API_EVENT_CODE" not in output
    assert not re.search(r"Traceback", output), output


def test_the_first_request_a_budget_refuses_announces_budget_crossed_once_per_period(
    upstream: RunningUpstream, receiver: RunningWebhookReceiver, database_url: str
) -> None:
    """Strict budgets stop spend short of max_budget, so the crossing is the first refusal."""
    config = outbox_config(upstream.base_url, webhook=True)
    with run_server(config, database_url, env=webhook_env(receiver.url)) as server:
        budget = str(unit_cost() * 6)  # room for one request's hold, not for a second
        assert (
            post(server.base_url, "/customer/new", {"user_id": "exhausted", "max_budget": budget}).status_code
            == 200
        )
        assert chat_ok(server.base_url, "exhausted")
        statuses = [
            httpx.post(
                f"{server.base_url}/chat/completions",
                headers={"Authorization": f"Bearer {MASTER_KEY}"},
                json={
                    "model": "fake-openai-endpoint",
                    "user": "exhausted",
                    "messages": [{"role": "user", "content": "what time is it"}],
                },
            ).status_code
            for _ in range(3)
        ]
        assert statuses == [429, 429, 429]
        wait_webhooks_delivered(database_url, receiver)
        crossed = receiver.app.delivered_payloads("budget_crossed")
        assert len(crossed) == 1
        assert crossed[0]["event_group"] == "customer" and crossed[0]["customer_id"] == "exhausted"
        assert crossed[0]["max_budget"] == Decimal(budget) and crossed[0]["spend"] == unit_cost()
        receiver.app.verify(WEBHOOK_SECRET)
