"""The ledger held against what Lago itself holds (issue 18, part 4): Lago's `events.errors` webhook
received and recorded, and `spendledger reconcile --against-lago` finding every difference planted
in the fake Lago — an event it lost, one whose value changed, one it rejected, one the ledger never
made, and the current usage those leave uneven."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.enforcement_support import AUTH, decimal_json, query, wait_until
from tests.e2e.outbox_support import EVENT_CODE, chats, lago_env, outbox_config
from tests.e2e.test_export import cli, export
from tests.fakes.lago import FakeLago, RunningLago, run_fake_lago
from tests.fakes.upstream import RunningUpstream
from tests.support import RunningServer, run_server

CUSTOMERS = ["rb-a", "rb-b", "rb-c"]


@pytest.fixture
def lago() -> Iterator[RunningLago]:
    with run_fake_lago(FakeLago()) as running:
        yield running


def env_of(lago: RunningLago) -> dict[str, str]:
    return {**lago_env(lago.base_url), "LAGO_WEBHOOK_HMAC_KEY": lago.app.hmac_key}


def post_webhook(server: RunningServer, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{server.base_url}/lago/webhooks", content=body, headers=headers, timeout=30)


def call_ids_by_customer(database_url: str) -> dict[str, list[str]]:
    rows = query(
        database_url,
        "select data->>'customer_id' as customer, data->>'call_id' as call_id from events "
        "where type = 'UsageRecorded' and data->>'customer_id' is not null order by position",
    )
    found: dict[str, list[str]] = {}
    for row in rows:
        found.setdefault(row["customer"], []).append(row["call_id"])
    return found


def test_lago_s_events_errors_are_recorded_once_and_only_when_lago_signed_them(
    upstream: RunningUpstream, lago: RunningLago, database_url: str
) -> None:
    config = outbox_config(upstream.base_url, lago=True)
    with run_server(config, database_url, env=env_of(lago)) as server:
        body, headers = lago.app.events_errors_webhook({"missing_aggregation_property": ["call-1", "call-2"]})
        first = post_webhook(server, body, headers)
        assert first.status_code == 200, first.text
        assert first.json() == {"received": True, "rejections_recorded": 2}
        again = post_webhook(server, body, headers)  # Lago sends a webhook again until it gets a 2xx
        assert again.json() == {"received": True, "rejections_recorded": 0}

        forged = {**headers, "X-Lago-Unique-Key": "forged-1"}
        tampered = post_webhook(server, body.replace(b"call-1", b"call-9"), forged)
        assert tampered.status_code == 401 and tampered.json()["error"]["code"] == "invalid_lago_webhook"
        unsigned = {k: v for k, v in headers.items() if k != "X-Lago-Signature"} | {"X-Lago-Unique-Key": "u-2"}
        assert post_webhook(server, body, unsigned).status_code == 401
        other = {**headers, "X-Lago-Signature-Algorithm": "md5", "X-Lago-Unique-Key": "u-3"}
        assert post_webhook(server, body, other).status_code == 400

        body, headers = lago.app.events_errors_webhook({"invalid_code": ["call-3"]}, algorithm="jwt")
        signed = post_webhook(server, body, headers)  # verified with the key Lago serves
        assert signed.status_code == 200 and signed.json()["rejections_recorded"] == 1
        forged_jwt = post_webhook(server, body.replace(b"call-3", b"call-4"), {**headers, "X-Lago-Unique-Key": "u-4"})
        assert forged_jwt.status_code == 401

        invoice = json.dumps({"webhook_type": "invoice.created", "object_type": "invoice", "invoice": {}}).encode()
        ignored = post_webhook(server, invoice, lago.app.signed_headers(invoice))
        assert ignored.status_code == 200 and ignored.json()["rejections_recorded"] == 0

        rows = query(database_url, "select stream, data from events where type = 'LagoEventRejected' order by position")
        found = [(json.loads(r["data"])["transaction_id"], json.loads(r["data"])["error"]) for r in rows]
        assert found == [
            ("call-1", "missing_aggregation_property"), ("call-2", "missing_aggregation_property"),
            ("call-3", "invalid_code"),
        ]  # fmt: skip
        status = httpx.get(f"{server.base_url}/outbox/status", headers=AUTH, timeout=30).json()
        assert status["lago_rejections"]["count"] == 3
        assert [r["transaction_id"] for r in status["lago_rejections"]["latest"]] == ["call-3", "call-2", "call-1"]
        audit = httpx.get(
            f"{server.base_url}/audit/events", params={"type": "LagoEventRejected"}, headers=AUTH, timeout=30
        )
        assert audit.status_code == 200, audit.text
        assert sorted(e["data"]["transaction_id"] for e in audit.json()["events"]) == ["call-1", "call-2", "call-3"]


def test_reconcile_against_lago_lists_every_difference_planted_in_lago(
    upstream: RunningUpstream, lago: RunningLago, database_url: str, tmp_path: Path
) -> None:
    config = outbox_config(upstream.base_url, lago=True)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(config)
    env = env_of(lago)
    with run_server(config, database_url, env=env) as server:
        chats(server.base_url, [CUSTOMERS[i % 3] for i in range(9)])
        assert wait_until(lambda: len(lago.app.accepted) == 9, 30)
        assert wait_until(
            lambda: query(database_url, "select count(*) as n from outbox where state = 'delivered'")[0]["n"] == 9, 15
        )
        against = ("reconcile", "--config", str(config_path), "--against-lago", "--concurrency", "3")
        clean = cli(*against, database_url=database_url, env=env)
        assert clean.returncode == 0, clean.stderr.decode()
        assert clean.stdout == b"" and b"agree" in clean.stderr

        calls = call_ids_by_customer(database_url)
        lost, changed, rejected = calls["rb-b"][0], calls["rb-c"][0], calls["rb-c"][1]
        with lago.app._lock:
            del lago.app.accepted[("rb-b", lost)]
            event = copy.deepcopy(lago.app.accepted[("rb-c", changed)])
            event["properties"]["output_tokens"] += 1
            lago.app.accepted[("rb-c", changed)] = event
            stranger = {
                "transaction_id": "not-ours-1", "external_subscription_id": "rb-a", "code": EVENT_CODE,
                "timestamp": int(time.time()), "properties": {"total_tokens": 5},
            }  # fmt: skip
            lago.app.accepted[("rb-a", "not-ours-1")] = stranger
            lago.app.received[("rb-a", "not-ours-1")] = time.time()
        body, headers = lago.app.events_errors_webhook({"invalid_filter_values": [rejected]})
        assert post_webhook(server, body, headers).json()["rejections_recorded"] == 1

        dirty = cli(*against, database_url=database_url, env=env)
        assert dirty.returncode == 1, dirty.stderr.decode()
        lines = [json.loads(line, parse_float=Decimal) for line in dirty.stdout.decode().splitlines()]
        found = sorted((d["kind"], d.get("call_id") or d.get("subscription")) for d in lines)
        assert found == sorted([
            ("missing_in_lago", lost), ("value_differs", changed), ("rejected_by_lago", rejected),
            ("not_in_ledger", "not-ours-1"), ("usage_differs", "rb-a"), ("usage_differs", "rb-b"),
        ])  # fmt: skip
        differs = next(d for d in lines if d["kind"] == "value_differs")
        assert list(differs["ledger"]) == ["properties.output_tokens"]
        assert differs["lago"]["properties.output_tokens"] == differs["ledger"]["properties.output_tokens"] + 1
        usage = {d["subscription"]: (d["ledger"], d["lago"]) for d in lines if d["kind"] == "usage_differs"}
        assert usage == {
            "rb-a": ({"events_count": 3}, {"events_count": 4}),
            "rb-b": ({"events_count": 3}, {"events_count": 2}),
        }
        assert next(d for d in lines if d["kind"] == "rejected_by_lago")["lago"]["error"] == "invalid_filter_values"
        assert b"6 difference(s)" in dirty.stderr

        summary: dict[str, Any] = decimal_json(export(server.base_url))["summary"]
        assert summary["rejected_by_lago"] == 1 and summary["delivered"] == 9

        lago.app.down = True
        unreachable = cli(*against, database_url=database_url, env=env)
        assert unreachable.returncode == 2 and b"cannot read Lago" in unreachable.stderr
        assert b"Traceback" not in unreachable.stderr
