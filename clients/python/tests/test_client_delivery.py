"""SpendLedger's delivery: batches, retries through outages, the spool across restarts, what is
refused and what stops the sender."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import FAST
from sl_client_fakes import FakeLedger, envelope
from spendledger_client import (
    APIError,
    DeliveryDeferred,
    Result,
    SpendLedger,
    SpoolLocked,
    WireRecord,
)

USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def ledger(server: FakeLedger, **options: object) -> SpendLedger:
    return SpendLedger(server.url, server.api_key, **{**FAST, **options})  # type: ignore[arg-type]


def test_records_go_in_batches_of_batch_size(ledger_server: FakeLedger) -> None:
    with ledger(ledger_server, batch_size=10, flush_interval_s=30) as client:
        ids = [client.record(model="gpt-4o", usage=USAGE, user="c1") for _ in range(25)]
        ledger_server.wait_for(20)  # two full batches go at once, without waiting for the interval
        assert [len(b) for b in ledger_server.posts] == [10, 10]
        assert client.flush(timeout_s=5)
    assert [len(b) for b in ledger_server.posts] == [10, 10, 5]
    assert ledger_server.received() == ids
    assert ledger_server.records[ids[0]]["usage"] == USAGE
    assert ledger_server.records[ids[0]]["user"] == "c1"


def test_a_record_waits_at_most_the_flush_interval(ledger_server: FakeLedger) -> None:
    with ledger(ledger_server, flush_interval_s=0.05) as client:
        client.record(model="gpt-4o", usage=USAGE)
        ledger_server.wait_for(1, timeout_s=2)


def test_an_outage_is_retried_and_each_call_id_delivered_once(ledger_server: FakeLedger) -> None:
    ledger_server.down()
    with ledger(ledger_server, batch_size=5) as client:
        ids = [client.record(model="gpt-4o", usage=USAGE) for _ in range(12)]
        time.sleep(0.3)  # many refused connections, with backoff
        assert ledger_server.received() == []
        ledger_server.up()
        assert client.flush(timeout_s=5)
    assert sorted(ledger_server.received()) == sorted(ids)  # each exactly once


def test_503_and_429_are_retried_after_retry_after(ledger_server: FakeLedger) -> None:
    ledger_server.scripted = [
        envelope(503, "unavailable", "later", {"retry-after": "0.2"}),
        envelope(429, "rate_limit_exceeded", "slow down", {"retry-after": "0"}),
        envelope(500, "server_error", "oops"),
    ]
    with ledger(ledger_server, max_backoff_s=0.5) as client:  # retry-after is capped by max_backoff_s
        started = time.monotonic()
        call_id = client.record(model="gpt-4o", usage=USAGE)
        assert client.flush(timeout_s=5)
        assert time.monotonic() - started >= 0.2  # retry-after honoured over the tiny backoff
    assert ledger_server.received() == [call_id]
    assert ledger_server.scripted == []


def test_a_per_record_conflict_is_reported_not_retried(ledger_server: FakeLedger) -> None:
    refused: list[tuple[WireRecord, Result]] = []
    with ledger(ledger_server, on_error=lambda r, res: refused.append((r, res))) as client:
        client.record(model="gpt-4o", usage=USAGE, call_id="same")
        client.flush(timeout_s=5)
        client.record(model="gpt-4o", usage={**USAGE, "completion_tokens": 9}, call_id="same")
        client.record(model="gpt-4o", usage=USAGE, call_id="other")
        assert client.flush(timeout_s=5)
    assert ledger_server.received() == ["same", "same", "other"]
    [(record, result)] = refused
    assert record["usage"]["completion_tokens"] == 9
    assert result.outcome == "error" and result.error is not None and result.error.code == "conflict"


def test_a_resent_record_is_a_duplicate_and_leaves_the_spool(ledger_server: FakeLedger, tmp_path: Path) -> None:
    spool = tmp_path / "usage.spool"
    with ledger(ledger_server, spool_path=spool) as client:
        assert client.record_now(model="gpt-4o", usage=USAGE, call_id="c-1").outcome == "recorded"
        assert client.record_now(model="gpt-4o", usage=USAGE, call_id="c-1").outcome == "duplicate"
    assert _live(spool) == []


def test_a_bad_record_is_found_by_halving_and_rejected_alone(ledger_server: FakeLedger) -> None:
    ledger_server.invalid_call_ids = {"bad"}
    refused: list[str] = []
    with ledger(ledger_server, batch_size=8, flush_interval_s=30, on_error=lambda r, res: refused.append(r["call_id"])) as client:
        ids = [client.record(model="gpt-4o", usage=USAGE, call_id=f"r{i}") for i in range(3)]
        client.record(model="gpt-4o", usage=USAGE, call_id="bad")
        ids += [client.record(model="gpt-4o", usage=USAGE, call_id=f"r{i}") for i in range(3, 7)]
        assert client.flush(timeout_s=5)
    assert refused == ["bad"]
    assert sorted(ledger_server.records) == sorted(ids)


def test_a_wrong_key_stops_the_sender_and_keeps_the_records(ledger_server: FakeLedger, tmp_path: Path) -> None:
    spool = tmp_path / "usage.spool"
    client = SpendLedger(ledger_server.url, "sk-wrong", spool_path=spool, **FAST)  # type: ignore[arg-type]
    client.record(model="gpt-4o", usage=USAGE, call_id="kept")
    with pytest.raises(APIError) as raised:
        client.flush(timeout_s=5)
    assert raised.value.status_code == 401
    client.close()
    with ledger(ledger_server, spool_path=spool) as fixed:  # the right key, on the same spool
        assert fixed.flush(timeout_s=5)
    assert ledger_server.received() == ["kept"]


def test_the_spool_survives_a_restart(ledger_server: FakeLedger, tmp_path: Path) -> None:
    spool = tmp_path / "usage.spool"
    ledger_server.down()
    first = ledger(ledger_server, spool_path=spool, close_timeout_s=0.1)
    ids = [first.record(model="gpt-4o", usage=USAGE, user=f"c{i}") for i in range(30)]
    first.close()  # the server is down all along: nothing delivered, nothing lost
    assert sorted(_live(spool)) == sorted(ids)
    ledger_server.up()
    with ledger(ledger_server, spool_path=spool) as second:
        ledger_server.wait_for(30)
        second.record(model="gpt-4o", usage=USAGE, call_id="new")
    assert sorted(ledger_server.received()) == sorted([*ids, "new"])
    assert _live(spool) == []


def test_no_record_lost_when_the_server_goes_down_during_close(ledger_server: FakeLedger, tmp_path: Path) -> None:
    spool = tmp_path / "usage.spool"
    client = ledger(ledger_server, spool_path=spool, batch_size=10, flush_interval_s=30, close_timeout_s=0.2)
    ids = [client.record(model="gpt-4o", usage=USAGE) for _ in range(10)]
    ledger_server.wait_for(10)
    ledger_server.down()
    late = [client.record(model="gpt-4o", usage=USAGE) for _ in range(5)]
    client.close()
    assert sorted(_live(spool)) == sorted(late)
    ledger_server.up()
    with ledger(ledger_server, spool_path=spool) as restarted:
        assert restarted.flush(timeout_s=5)
    assert sorted(ledger_server.received()) == sorted(ids + late)


def test_records_spooled_before_a_crash_are_sent_by_the_next_process(ledger_server: FakeLedger, tmp_path: Path) -> None:
    spool = tmp_path / "usage.spool"
    ledger_server.down()
    script = (
        "import os, sys\n"
        "from spendledger_client import SpendLedger\n"
        "ledger = SpendLedger(sys.argv[1], 'sk-test', spool_path=sys.argv[2], initial_backoff_s=0.01)\n"
        "for i in range(5):\n"
        "    ledger.record(model='gpt-4o', usage={'prompt_tokens': 1}, call_id=f'crash-{i}')\n"
        "os._exit(1)  # no close, no atexit: a crash\n"
    )
    subprocess.run([sys.executable, "-c", script, ledger_server.url, str(spool)], check=False, timeout=30)
    assert sorted(_live(spool)) == [f"crash-{i}" for i in range(5)]
    ledger_server.up()
    with ledger(ledger_server, spool_path=spool) as restarted:
        assert restarted.flush(timeout_s=5)
    assert sorted(ledger_server.received()) == [f"crash-{i}" for i in range(5)]


def test_a_torn_last_line_is_skipped(ledger_server: FakeLedger, tmp_path: Path) -> None:
    spool = tmp_path / "usage.spool"
    record = {"call_id": "whole", "model": "m", "usage": None, "status": "success", "metadata": {}}
    spool.write_text(json.dumps({"sid": "a", "record": record}) + '\n{"sid": "b", "rec')
    with ledger(ledger_server, spool_path=spool) as client:
        assert client.flush(timeout_s=5)
    assert ledger_server.received() == ["whole"]


def test_one_spool_one_client(tmp_path: Path, ledger_server: FakeLedger) -> None:
    spool = tmp_path / "usage.spool"
    with ledger(ledger_server, spool_path=spool), pytest.raises(SpoolLocked):
        ledger(ledger_server, spool_path=spool)


def test_the_spool_is_compacted(ledger_server: FakeLedger, tmp_path: Path) -> None:
    spool = tmp_path / "usage.spool"
    with ledger(ledger_server, spool_path=spool, batch_size=50) as client:
        for _ in range(600):
            client.record(model="gpt-4o", usage=USAGE)
        assert client.flush(timeout_s=10)
        assert len(spool.read_text().splitlines()) < 600  # settled records were rewritten away
    assert len(ledger_server.records) == 600


def test_record_now_returns_the_result(ledger_server: FakeLedger) -> None:
    with ledger(ledger_server) as client:
        result = client.record_now(model="gpt-4o", usage=USAGE, cost=Decimal("0.001112"), call_id="now")
    assert result == Result(call_id="now", outcome="recorded", cost=Decimal("0.25"), error=None)
    assert b'"cost":0.001112}' in ledger_server.raw_bodies[0]  # the decimal's digits, not a float's


def test_record_now_defers_to_the_sender_when_the_server_is_down(ledger_server: FakeLedger) -> None:
    ledger_server.down()
    with ledger(ledger_server, timeout_s=0.1) as client:
        with pytest.raises(DeliveryDeferred):
            client.record_now(model="gpt-4o", usage=USAGE, call_id="later")
        ledger_server.up()
        assert client.flush(timeout_s=5)
    assert ledger_server.received() == ["later"]


def test_recording_from_many_threads(ledger_server: FakeLedger, tmp_path: Path) -> None:
    with ledger(ledger_server, spool_path=tmp_path / "s", batch_size=37) as client:

        def work(t: int) -> None:
            for i in range(50):
                client.record(model="gpt-4o", usage=USAGE, call_id=f"t{t}-{i}")

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(ledger_server.received()) == 400 == len(set(ledger_server.received()))


def test_a_closed_ledger_refuses_records(ledger_server: FakeLedger) -> None:
    client = ledger(ledger_server)
    client.close()
    with pytest.raises(RuntimeError):
        client.record(model="gpt-4o")


def _live(spool: Path) -> list[str]:
    """The call_ids a spool file still holds (its log replayed)."""
    live: dict[str, str] = {}
    for line in spool.read_text().splitlines():
        item = json.loads(line)
        if "ack" in item:
            for sid in item["ack"]:
                live.pop(sid)
        else:
            live[item["sid"]] = item["record"]["call_id"]
    return list(live.values())
