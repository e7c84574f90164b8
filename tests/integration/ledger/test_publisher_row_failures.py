"""One bad row fails alone: it is counted, logged, backed off and, if the failure is its own, dead-lettered
after `MAX_OWN_FAILURES` attempts — while a receiver that is down is retried until it takes the row."""

from __future__ import annotations

from collections import Counter

import asyncpg
import pytest
from prometheus_client import REGISTRY
from standardwebhooks.webhooks import Webhook
from structlog.testing import capture_logs

from spendledger.api.metrics import observe_delivery
from spendledger.ledger.outbox import MAX_OWN_FAILURES, Publisher, retry_dead_letters
from spendledger.ledger.sinks.webhook import WEBHOOK_ID_MAX_LENGTH, webhook_id
from tests.integration.ledger.publisher_support import (
    SECRET,
    Receiver,
    enqueue,
    lago_sink,
    make_due,
    states,
    webhook_sink,
)


def row_failures(sink: str, error_type: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "spendledger_outbox_row_failures_total", {"sink": sink, "error_type": error_type}
        )
        or 0.0
    )


async def test_an_exception_sending_one_row_fails_that_row_alone_counted_and_logged(
    pool: asyncpg.Pool, database_url: str
) -> None:
    receiver = Receiver(refuse={"bad-row"})
    sink = webhook_sink(receiver)
    publisher = Publisher(pool, database_url, [sink])
    publisher.on_delivered.append(observe_delivery)
    await enqueue(pool, "webhook", "good-1", "bad-row", "good-2")
    before = row_failures("webhook", "ValueError")

    with capture_logs() as logs:
        assert await publisher.publish_once(sink) == 3

    assert sorted(receiver.ids()) == ["good-1", "good-2"]
    rows = await states(pool)
    assert rows["good-1"]["state"] == rows["good-2"]["state"] == "delivered"
    bad = rows["bad-row"]
    assert (bad["state"], bad["attempts"], bad["own_failures"]) == ("pending", 1, 1)
    assert bad["last_error"] == f"webhook row failed on its own: ValueError (1 of {MAX_OWN_FAILURES})"
    assert await pool.fetchval("select next_attempt_at > now() from outbox where dedupe_key = 'bad-row'")
    assert await publisher.publish_once(sink) == 0  # it backs off: nothing is due, nothing re-sent
    assert row_failures("webhook", "ValueError") == before + 1
    [failed] = [entry for entry in logs if entry["event"] == "outbox_row_failed"]
    bad_id = await pool.fetchval("select id from outbox where dedupe_key = 'bad-row'")
    assert (failed["sink"], failed["outbox_id"], failed["error_type"]) == ("webhook", bad_id, "ValueError")
    assert "bad-row" not in repr(logs) and SECRET not in repr(logs)  # neither payload nor secret
    # A row's own failure says nothing about the receiver, which took the others.
    assert publisher.health["webhook"].state == "ok"


async def test_a_sink_raising_for_a_batch_has_each_row_sent_alone(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """Lago sends a batch in one request: an exception out of it is isolated row by row."""
    receiver = Receiver(refuse={"poisoned"})
    sink = lago_sink(receiver)
    publisher = Publisher(pool, database_url, [sink])
    await enqueue(pool, "lago", "lago-1", "poisoned", "lago-2")

    assert await publisher.publish_once(sink) == 3

    sent = [event["transaction_id"] for s in receiver.answered for event in s.json["events"]]
    assert sorted(sent) == ["lago-1", "lago-2"]
    rows = await states(pool)
    assert (rows["lago-1"]["state"], rows["lago-2"]["state"]) == ("delivered", "delivered")
    assert (rows["poisoned"]["state"], rows["poisoned"]["own_failures"]) == ("pending", 1)


async def test_a_row_failing_on_its_own_is_dead_lettered_after_max_own_failures(
    pool: asyncpg.Pool, database_url: str
) -> None:
    receiver = Receiver(refuse={"bad-row"})
    sink = webhook_sink(receiver)
    publisher = Publisher(pool, database_url, [sink])
    await enqueue(pool, "webhook", "bad-row")
    for attempt in range(1, MAX_OWN_FAILURES + 1):
        assert await publisher.publish_once(sink) == 1
        bad = (await states(pool))["bad-row"]
        assert bad["own_failures"] == attempt
        assert bad["state"] == ("dead" if attempt == MAX_OWN_FAILURES else "pending")
        await make_due(pool)
    assert await publisher.publish_once(sink) == 0  # dead: never claimed again
    assert bad["last_error"] == (
        f"webhook row failed on its own: ValueError ({MAX_OWN_FAILURES} of {MAX_OWN_FAILURES})"
    )
    assert publisher.health["webhook"].dead == 1

    # Retried by hand, it starts again with all its attempts; fixed, it goes.
    receiver.refuse.clear()
    assert await retry_dead_letters(pool) == 1
    assert (await states(pool))["bad-row"]["own_failures"] == 0
    assert await publisher.publish_once(sink) == 1
    assert receiver.ids() == ["bad-row"]
    assert (await states(pool))["bad-row"]["state"] == "delivered"


@pytest.mark.parametrize("failure", ["down", "503"])
async def test_a_receiver_down_is_retried_past_max_own_failures_until_it_takes_the_row(
    pool: asyncpg.Pool, database_url: str, failure: str
) -> None:
    receiver = Receiver(down=failure == "down", status=503 if failure == "503" else 200)
    sink = webhook_sink(receiver)
    publisher = Publisher(pool, database_url, [sink])
    await enqueue(pool, "webhook", "patient")
    for _ in range(MAX_OWN_FAILURES * 2):
        assert await publisher.publish_once(sink) == 1
        await make_due(pool)
    waiting = (await states(pool))["patient"]
    assert (waiting["state"], waiting["attempts"], waiting["own_failures"]) == (
        "pending",
        MAX_OWN_FAILURES * 2,
        0,
    )
    assert publisher.health["webhook"].state == "failing"
    receiver.down, receiver.status = False, 200
    assert await publisher.publish_once(sink) == 1
    assert (await states(pool))["patient"]["state"] == "delivered"
    assert Counter(receiver.ids())["patient"] == 1 + (failure == "503") * MAX_OWN_FAILURES * 2
    assert publisher.health["webhook"].state == "ok"


async def test_a_header_unsafe_dedupe_key_is_sent_encoded_signed_and_the_same_on_every_retry(
    pool: asyncpg.Pool, database_url: str
) -> None:
    key = "budget_crossed:customer:evil\r\nX-Injected: yes:0:max"
    receiver = Receiver(status=500)
    sink = webhook_sink(receiver)
    publisher = Publisher(pool, database_url, [sink])
    await pool.execute(
        "select sl_enqueue_webhook('budget_crossed', $1, '{}'::jsonb, '{\"customer_id\": \"evil\"}'::jsonb)",
        key,
    )
    assert await publisher.publish_once(sink) == 1
    await make_due(pool)
    receiver.status = 200
    assert await publisher.publish_once(sink) == 1
    assert receiver.ids() == ["budget_crossed:customer:evil%0D%0AX-Injected:%20yes:0:max"] * 2
    verifier = Webhook(SECRET)
    for sent in receiver.answered:
        verifier.verify(sent.body, sent.headers)  # the signature covers the id as sent
        assert "x-injected" not in sent.headers
    assert (await states(pool))[key]["state"] == "delivered"


def test_webhook_ids_are_safe_ids_unchanged_and_otherwise_encoded_one_to_one_and_bounded() -> None:
    for safe in (
        "spend_tracked:6f1c0a8e-3b1e-4d55-9f3e-2a7d8d1c9b10",
        "budget_crossed:customer:a.b@c.com:0:max",
    ):
        assert webhook_id(safe) == safe
    assert webhook_id("a b") == "a%20b"
    assert webhook_id("a%20b") == "a%2520b"  # the escape character is escaped too
    assert webhook_id("a~b") == "a%7Eb"  # `~` is kept for the digest of long ids
    assert webhook_id("client-é") == "client-%C3%A9"
    long_a, long_b = "x" * 600, "x" * 599 + "y"
    assert len(webhook_id(long_a)) == WEBHOOK_ID_MAX_LENGTH
    assert webhook_id(long_a) != webhook_id(long_b)
    assert webhook_id(long_a) == webhook_id("x" * 600)
    assert all(33 <= ord(c) < 127 for c in webhook_id("\x00\r\n\t é" * 200))
