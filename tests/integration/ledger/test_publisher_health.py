"""The publisher's health as any process reads it: written by the publisher that delivers (at once on
a change of state, else on its heartbeat), read back with `not_running` where no publisher has
reported lately — delivery has stopped, and readiness must say so."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg

from spendledger.ledger.outbox import Publisher
from spendledger.ledger.publisher_health import HealthReporter, SinkHealth, read_health
from tests.integration.ledger.publisher_support import Receiver, enqueue, eventually, lago_sink, running


async def test_a_sink_no_publisher_reports_on_is_not_running(pool: asyncpg.Pool) -> None:
    reports = await read_health(pool, ["lago", "webhook"])
    assert {name: report.state for name, report in reports.items()} == {
        "lago": "not_running",
        "webhook": "not_running",
    }


async def test_a_report_is_read_back_and_goes_stale_when_the_heartbeat_stops(pool: asyncpg.Pool) -> None:
    delivered_at = datetime(2026, 12, 7, 6, 0, tzinfo=UTC)
    health = {"lago": SinkHealth(state="failing", last_error="lago answered 503", last_delivery_at=delivered_at)}
    await HealthReporter(pool, health, "host:1").report()
    [lago] = (await read_health(pool, ["lago"])).values()
    assert (lago.state, lago.last_error, lago.last_delivery_at) == ("failing", "lago answered 503", delivered_at)
    await pool.execute("update publisher_health set reported_at = now() - interval '31 seconds'")
    [stale] = (await read_health(pool, ["lago"])).values()
    assert (stale.state, stale.last_error) == ("not_running", "lago answered 503")  # the last word kept
    assert (await read_health(pool, ["lago"], stale_after_s=60))["lago"].state == "failing"


async def test_two_publishers_of_one_sink_keep_the_latest_delivery(pool: asyncpg.Pool) -> None:
    later = datetime.now(UTC)
    await HealthReporter(pool, {"lago": SinkHealth(last_delivery_at=later)}, "host:1").report()
    await HealthReporter(pool, {"lago": SinkHealth(last_delivery_at=later - timedelta(minutes=5))}, "host:2").report()
    assert (await read_health(pool, ["lago"]))["lago"].last_delivery_at == later
    assert await pool.fetchval("select reporter from publisher_health") == "host:2"  # the latest heartbeat


async def test_a_running_publisher_reports_a_change_of_state_at_once(pool: asyncpg.Pool, database_url: str) -> None:
    lago = Receiver(status=503)
    publisher = Publisher(pool, database_url, [lago_sink(lago)], reporter="host:7")
    # A heartbeat far longer than the test: only the change itself can write the report in time.
    publisher.health_reporter = HealthReporter(pool, publisher.health, "host:7", every_s=3600)
    async with running(publisher):
        assert await eventually(lambda: state_of(pool, "lago", "ok"))  # the first beat, at start
        await enqueue(pool, "lago", "refused")
        assert await eventually(lambda: state_of(pool, "lago", "failing"))
        lago.status = 200
        await pool.execute("update outbox set next_attempt_at = now()")
        await pool.execute("select pg_notify('sl_outbox', '')")
        assert await eventually(lambda: state_of(pool, "lago", "ok"))
    [report] = (await read_health(pool, ["lago"])).values()
    assert report.last_delivery_at is not None and report.last_error is None


async def state_of(pool: asyncpg.Pool, sink: str, expected: str) -> bool:
    return (await read_health(pool, [sink]))[sink].state == expected
