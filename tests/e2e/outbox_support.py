"""Helpers for the outbox tests: configs and env for the sinks, standalone publishers, and the
exactly-once check of what the fake Lago holds against the ledger."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.conftest import MASTER_KEY, proxy_config
from tests.e2e.enforcement_support import AUTH, MAX_TOKENS, MESSAGES, chat, query
from tests.fakes.lago import BATCH_PATH, DEFAULT_API_KEY, RunningLago
from tests.support import PROJECT_ROOT, free_port

LAGO_KEY = DEFAULT_API_KEY
EVENT_CODE = "openai_tokens"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
PROPERTY_KEYS = {"input_tokens", "output_tokens", "total_tokens", "model", "response_cost"}
EVENT_KEYS = {
    "transaction_id",
    "external_subscription_id",
    "external_customer_id",
    "code",
    "timestamp",
    "properties",
}


def outbox_config(upstream_base_url: str, lago: bool = False, webhook: bool = False) -> str:
    """proxy_config ends with `general_settings:\n  master_key: …\n`, so an indented line of
    `extra` lands in general_settings and an unindented block starts a new section."""
    extra = ""
    if webhook:
        extra += '  alerting: ["webhook"]\n'
    if lago:
        extra += 'litellm_settings:\n  callbacks: ["lago"]\n'
    return proxy_config(upstream_base_url, extra)


def closed_url() -> str:
    """A local URL where nothing listens: connections are refused at once."""
    return f"http://127.0.0.1:{free_port()}"


def lago_env(base_url: str, api_key: str = LAGO_KEY, charge_by: str | None = None) -> dict[str, str]:
    env = {"LAGO_API_BASE": base_url, "LAGO_API_KEY": api_key, "LAGO_API_EVENT_CODE": EVENT_CODE}
    if charge_by is not None:
        env["LAGO_API_CHARGE_BY"] = charge_by
    return env


def webhook_env(url: str) -> dict[str, str]:
    return {"WEBHOOK_URL": url, "WEBHOOK_SECRET": WEBHOOK_SECRET}


# --- traffic ---


def chat_ok(base_url: str, customer: str, key: str = MASTER_KEY) -> str:
    """One successful chat completion; returns its call id."""
    response = chat(base_url, customer, key)
    assert response.status_code == 200, response.text
    return response.headers["x-litellm-call-id"]


def chat_without_customer(base_url: str) -> str:
    body = {"model": "fake-openai-endpoint", "messages": MESSAGES, "max_tokens": MAX_TOKENS}
    response = httpx.post(f"{base_url}/chat/completions", json=body, headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    return response.headers["x-litellm-call-id"]


def chats(base_url: str, customers: Sequence[str], key: str = MASTER_KEY, workers: int = 8) -> list[str]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda customer: chat_ok(base_url, customer, key), customers))


def outbox_status(base_url: str) -> dict[str, Any]:
    response = httpx.get(f"{base_url}/outbox/status", headers=AUTH, timeout=10)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def sink_counts(base_url: str, sink: str = "lago") -> dict[str, Any]:
    counts: dict[str, Any] = outbox_status(base_url)["sinks"].get(sink, {})
    return counts


def db_counts(database_url: str, sink: str = "lago") -> dict[str, int]:
    rows = query(database_url, "select state, count(*) as n from outbox where sink = $1 group by 1", sink)
    return {r["state"]: r["n"] for r in rows}


def make_due(database_url: str, sink: str = "lago") -> None:
    """Simulate the passing of time: the pending rows' backoff is over, so they are due now (and the
    publishers are woken). Without it a test would wait out backoffs of up to 5 minutes."""
    query(
        database_url,
        "update outbox set next_attempt_at = now() where sink = $1 and state = 'pending' returning id",
        sink,
    )
    query(database_url, "select pg_notify('sl_outbox', '')")


def postpone(database_url: str, sink: str = "lago") -> None:
    """Make every pending row of `sink` not due for a day (until `make_due`)."""
    query(
        database_url,
        "update outbox set next_attempt_at = now() + interval '1 day' "
        "where sink = $1 and state = 'pending' returning id",
        sink,
    )


# --- standalone publishers ---


@dataclass
class RunningPublisher:
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_started(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"publisher exited early:\n{self.log()}"
            if '"publishing"' in self.log():
                return
            time.sleep(0.05)
        raise AssertionError(f"publisher did not start in {timeout_s}s:\n{self.log()}")


@contextmanager
def run_publisher(config_text: str, database_url: str, env: dict[str, str]) -> Iterator[RunningPublisher]:
    """`python -m spendledger.api publish --config …` as its own process; SIGTERM (then SIGKILL) on exit."""
    workdir = Path(tempfile.mkdtemp(prefix="sl-publish-"))
    config_path = workdir / "config.yaml"
    config_path.write_text(config_text)
    log_path = workdir / "publisher.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "spendledger.api", "publish", "--config", str(config_path)],
            cwd=PROJECT_ROOT,
            env={**os.environ, "DATABASE_URL": database_url, **env},
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        yield RunningPublisher(process, log_path)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# --- what Lago holds, against the ledger ---


@dataclass(frozen=True)
class LedgerUsage:
    call_id: str
    subscriber: str
    cost: Decimal
    ended_at: datetime
    input_tokens: int
    output_tokens: int
    total_tokens: int
    model: str


def ledger_usage(database_url: str, charge_field: str = "customer_id") -> dict[str, LedgerUsage]:
    """The ledger's UsageRecorded events that have a charge-by id, by call id."""
    rows = query(
        database_url,
        "select data from events where type = 'UsageRecorded' and data->>$1 is not null",
        charge_field,
    )
    usage = {}
    for row in rows:
        data = json.loads(row["data"], parse_float=Decimal)
        usage[data["call_id"]] = LedgerUsage(
            call_id=data["call_id"],
            subscriber=data[charge_field],
            cost=Decimal(data["cost"]),
            ended_at=datetime.fromisoformat(data["ended_at"]),
            input_tokens=data["input_tokens"],
            output_tokens=data["output_tokens"],
            total_tokens=data["total_tokens"],
            model=data["model_group"],
        )
    return usage


def frozen_timestamp(ended_at: datetime) -> Decimal:
    """Unix seconds of the recording, to the millisecond (how the event's timestamp is frozen)."""
    return Decimal(int(ended_at.timestamp() * 1000)) * Decimal("0.001")


def sent_copies(lago: RunningLago) -> dict[str, list[tuple[int | None, dict[str, Any]]]]:
    """Every copy of every event POSTed to the fake, by transaction_id: (the fake's answer, event)."""
    copies: dict[str, list[tuple[int | None, dict[str, Any]]]] = defaultdict(list)
    for request in lago.app.event_requests():
        events = request.json["events"] if request.path == BATCH_PATH else [request.json["event"]]
        for event in events:
            copies[event["transaction_id"]].append((request.status, event))
    return copies


def assert_lago_exactly_once(
    lago: RunningLago,
    database_url: str,
    charge_field: str = "customer_id",
    expected: int | None = None,
    api_key: str = LAGO_KEY,
) -> dict[str, LedgerUsage]:
    """Nothing lost, nothing billed twice: Lago accepted exactly the ledger's billable usage, each
    event once, with its exact cost, and every copy sent of one event is identical (frozen payload,
    timestamp included)."""
    ledger = ledger_usage(database_url, charge_field)
    if expected is not None:
        assert len(ledger) == expected
    accepted = dict(lago.app.accepted)
    accepted_ids = [tid for _, tid in accepted]
    assert len(accepted_ids) == len(set(accepted_ids))
    assert set(accepted_ids) == set(ledger), "Lago's events differ from the ledger's billable usage"
    copies = sent_copies(lago)
    accepted_answers = Counter(
        tid for tid, sent in copies.items() for status, _ in sent if status is not None and status < 300
    )
    assert set(accepted_answers) == set(ledger)
    assert set(accepted_answers.values()) == {1}, "an event was accepted (billed) more than once"
    for request in lago.app.event_requests():
        assert request.headers["authorization"] == f"Bearer {api_key}"
        if request.path == BATCH_PATH:
            assert 1 <= len(request.json["events"]) <= 100
    for tid, usage in ledger.items():
        event = accepted[(usage.subscriber, tid)]
        assert all(copy == event for _, copy in copies[tid]), f"{tid} was not sent identically every time"
        assert set(event) == EVENT_KEYS
        assert event["external_subscription_id"] == event["external_customer_id"] == usage.subscriber
        assert event["code"] == EVENT_CODE
        assert isinstance(event["timestamp"], Decimal)  # a JSON number, not a string
        assert event["timestamp"] == frozen_timestamp(usage.ended_at)
        properties = event["properties"]
        assert set(properties) == PROPERTY_KEYS
        assert isinstance(properties["response_cost"], Decimal | int)
        assert Decimal(properties["response_cost"]) == usage.cost
        assert (properties["input_tokens"], properties["output_tokens"], properties["total_tokens"]) == (
            usage.input_tokens,
            usage.output_tokens,
            usage.total_tokens,
        )
        assert properties["model"] == usage.model
    return ledger
