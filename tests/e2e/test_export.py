"""The reconciliation export and `spendledger reconcile` end to end (CONTRACT §7): a real server,
real requests, a fake Lago that acknowledges them; then `GET /export/reconciliation` (JSON, CSV,
Parquet) and the CLI (`python -m spendledger.api export|reconcile`, and `scripts/export.py`) on the server's
database, checked against the ledger's own events summed here with Python Decimal."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spendledger.ledger.tokens import PART_FIELDS
from tests.e2e.conftest import MASTER_KEY, proxy_config
from tests.e2e.enforcement_support import AUTH, decimal_json, post, query, wait_until
from tests.e2e.outbox_support import (
    chat_ok,
    chat_without_customer,
    chats,
    lago_env,
    outbox_config,
)
from tests.fakes.lago import FakeLago, RunningLago, run_fake_lago
from tests.fakes.upstream import RunningUpstream
from tests.support import PROJECT_ROOT, RunningServer, run_server

COLUMNS = [
    "customer_id",
    "period",
    "requests",
    "input_tokens",
    "output_tokens",
    *PART_FIELDS,
    "spend",
    "delivered",
    "pending",
    "dead_lettered",
    "unbillable",
    "not_sent",
    "rejected_by_lago",
]
SPEND = COLUMNS.index("spend")
CUSTOMERS = ["exp-a", "exp-b", "exp-c"]


@pytest.fixture
def lago() -> Iterator[RunningLago]:
    with run_fake_lago(FakeLago()) as running:
        yield running


def export(base_url: str, **params: str) -> httpx.Response:
    return httpx.get(f"{base_url}/export/reconciliation", params=params, headers=AUTH, timeout=30)


def ledger_rows(database_url: str) -> dict[str | None, dict[str, Any]]:
    """Per customer (today, UTC), from the events and the outbox, added up here."""
    events = query(database_url, "select data::text as data from events where type = 'UsageRecorded'")
    rejected = {
        r["call_id"]
        for r in query(database_url, "select data->>'transaction_id' as call_id from events where type = 'LagoEventRejected'")
    }
    states = {
        r["dedupe_key"]: r["state"]
        for r in query(database_url, "select dedupe_key, state from outbox where sink = 'lago'")
    }
    rows: dict[str | None, dict[str, Any]] = defaultdict(
        lambda: {c: 0 for c in COLUMNS[2:]} | {"spend": Decimal(0)}
    )
    column = {
        "delivered": "delivered",
        "pending": "pending",
        "dead": "dead_lettered",
        "unbillable": "unbillable",
    }
    for event in events:
        data = json.loads(event["data"], parse_float=Decimal)
        row = rows[data["customer_id"]]
        row["requests"] += 1
        row["input_tokens"] += data["input_tokens"]
        row["output_tokens"] += data["output_tokens"]
        for part in PART_FIELDS:
            row[part] += data.get(part, 0)
        row["spend"] += Decimal(data["cost"])  # a handful of 7-decimal costs: no rounding at 28 digits
        row[column.get(states.get(data["call_id"], ""), "not_sent")] += 1
        row["rejected_by_lago"] += data["call_id"] in rejected
    return dict(rows)


def cli(
    *args: str, database_url: str, env: dict[str, str], script: bool = False
) -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "scripts/export.py", *args] if script else [sys.executable, "-m", "spendledger.api", *args]
    return subprocess.run(
        command,
        cwd=PROJECT_ROOT,
        env={**os.environ, "DATABASE_URL": database_url, **env},
        capture_output=True,
        timeout=120,
    )


def today() -> str:
    return datetime.now(UTC).date().isoformat()


def rows_without_period(rows: list[dict[str, Any]]) -> dict[str | None, dict[str, Any]]:
    assert all(row["period"] == today() for row in rows)
    return {row["customer_id"]: {c: row[c] for c in COLUMNS[2:]} for row in rows}


def served(upstream: RunningUpstream, lago: RunningLago, database_url: str, tmp_path: Path) -> Any:
    config_text = outbox_config(upstream.base_url, lago=True)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(config_text)
    return config_path, run_server(config_text, database_url, env=lago_env(lago.base_url))


def make_traffic(server: RunningServer, lago: RunningLago) -> None:
    chats(server.base_url, [CUSTOMERS[i % 3] for i in range(9)])
    chat_without_customer(server.base_url)
    assert wait_until(lambda: len(lago.app.accepted) == 9, 30)
    assert wait_until(
        lambda: (
            query(server.database_url, "select count(*) as n from outbox where state = 'delivered'")[0]["n"]
            == 9
        ),
        15,
    )


def test_the_route_exports_the_ledger_exactly_as_json_csv_and_parquet(
    upstream: RunningUpstream, lago: RunningLago, database_url: str, tmp_path: Path
) -> None:
    _, running = served(upstream, lago, database_url, tmp_path)
    with running as server:
        make_traffic(server, lago)
        expected = ledger_rows(database_url)
        assert set(expected) == {*CUSTOMERS, None}
        assert expected[None]["unbillable"] == 1
        assert all(expected[c]["delivered"] == 3 for c in CUSTOMERS)

        response = export(server.base_url)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/json")
        body = decimal_json(response)
        assert [row["customer_id"] for row in body["rows"]] == [*CUSTOMERS, None]
        assert rows_without_period(body["rows"]) == expected
        summary = body["summary"]
        assert summary["spend"] == sum((r["spend"] for r in expected.values()), Decimal(0))
        assert summary["requests"] == 10 and summary["delivered"] == 9 and summary["unbillable"] == 1
        assert isinstance(summary["spend"], Decimal)  # a JSON number, with its exact digits
        assert body["by"] == "customer" and body["period"] == "day"

        month = decimal_json(export(server.base_url, period="month", **{"from": today(), "to": today()}))
        assert [row["period"] for row in month["rows"]] == [today()[:7]] * 4
        assert month["summary"] == summary
        assert month["start"] == f"{today()}T00:00:00+00:00" and body["start"] is None

        csv_response = export(server.base_url, format="csv", **{"from": today(), "to": today()})
        assert csv_response.status_code == 200, csv_response.text
        assert csv_response.headers["content-type"].startswith("text/csv")
        disposition = csv_response.headers["content-disposition"]
        assert disposition == f'attachment; filename="reconciliation-customer-day-{today()}_{today()}.csv"'
        lines = list(csv.reader(io.StringIO(csv_response.text)))
        assert lines[0] == COLUMNS
        assert lines[-1][:2] == ["TOTAL", ""]
        assert Decimal(lines[-1][SPEND]) == summary["spend"] and lines[-1][SPEND] == format(summary["spend"], "f")
        for line in lines[1:-1]:
            row = expected[line[0] or None]
            assert Decimal(line[SPEND]) == row["spend"]
            assert [int(v) for v in line[2:SPEND] + line[SPEND + 1 :]] == [row[c] for c in COLUMNS[2:] if c != "spend"]

        parquet_response = export(server.base_url, format="parquet", by="team")
        assert parquet_response.status_code == 200, parquet_response.text
        assert parquet_response.headers["content-type"] == "application/vnd.apache.parquet"
        assert parquet_response.headers["content-disposition"].endswith('-team-day-start_now.parquet"')
        table = pq.read_table(io.BytesIO(parquet_response.content))
        assert table.schema.field("spend").type == pa.decimal128(38, 18)
        [team_row] = table.to_pylist()  # the master key has no team: one row, no id
        assert team_row["team_id"] is None and team_row["spend"] == summary["spend"]
        metadata = table.schema.metadata or {}
        assert metadata[b"spendledger.summary.spend"].decode() == format(summary["spend"], "f")
        assert metadata[b"spendledger.by"] == b"team"

        # Admins (and admin viewers) only; bad parameters are 400s in the OpenAI error shape.
        generated = post(server.base_url, "/key/generate", {})
        assert generated.status_code == 200, generated.text
        other = {"Authorization": f"Bearer {generated.json()['key']}"}
        refused = httpx.get(f"{server.base_url}/export/reconciliation", headers=other, timeout=10)
        assert refused.status_code == 403  # a key of no internal user: no role that reads everything
        assert httpx.get(f"{server.base_url}/export/reconciliation", timeout=10).status_code == 401
        for params in ({"by": "model"}, {"period": "week"}, {"format": "xml"}, {"from": "yesterday"}):
            bad = export(server.base_url, **params)
            assert bad.status_code == 400, (params, bad.text)
            assert bad.json()["error"]["type"] == "invalid_request_error"
        assert export(server.base_url, **{"from": "2026-02-02", "to": "2026-02-01"}).status_code == 400


def test_the_cli_exports_and_reconciles_the_servers_database(
    upstream: RunningUpstream, lago: RunningLago, database_url: str, tmp_path: Path
) -> None:
    config_path, running = served(upstream, lago, database_url, tmp_path)
    env = lago_env(lago.base_url)
    with running as server:
        make_traffic(server, lago)
        route_csv = export(server.base_url, format="csv").content

        result = cli("export", "--config", str(config_path), database_url=database_url, env=env)
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout == route_csv  # the same code, the same bytes

        script = cli("--config", str(config_path), database_url=database_url, env=env, script=True)
        assert script.returncode == 0, script.stderr.decode()
        assert script.stdout == route_csv

        output = tmp_path / "export.parquet"
        args = ["export", "--config", str(config_path), "--format", "parquet", "--output", str(output)]
        result = cli(*args, "--by", "user", "--period", "month", database_url=database_url, env=env)
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout == b""
        table = pq.read_table(output)
        assert table.column_names[0] == "user_id"
        [row] = table.to_pylist()
        expected = ledger_rows(database_url)
        assert row["spend"] == sum((r["spend"] for r in expected.values()), Decimal(0))
        assert row["period"] == today()[:7] and row["requests"] == 10

        bad = cli(
            "export", "--config", str(config_path), "--from", "2026-13-01", database_url=database_url, env=env
        )
        assert bad.returncode == 2 and b"not a day" in bad.stderr

        clean = cli("reconcile", "--config", str(config_path), database_url=database_url, env=env)
        assert clean.returncode == 0, clean.stderr.decode()
        assert clean.stdout == b""

        # Plant differences the publisher will not undo: a lost Lago row and a dead letter.
        call_ids = sorted(
            r["dedupe_key"]
            for r in query(
                database_url, "select dedupe_key from outbox where sink = 'lago' and state = 'delivered'"
            )
        )
        query(
            database_url,
            "delete from outbox where sink = 'lago' and dedupe_key = $1 returning id",
            call_ids[0],
        )
        query(
            database_url,
            "update outbox set state = 'dead', last_error = 'lago 422: poison' where dedupe_key = $1 returning id",
            call_ids[1],
        )
        dirty = cli("reconcile", "--config", str(config_path), database_url=database_url, env=env)
        assert dirty.returncode == 1, dirty.stderr.decode()
        lines = [json.loads(line, parse_float=Decimal) for line in dirty.stdout.decode().splitlines()]
        assert sorted((d["call_id"], d["kind"]) for d in lines) == [
            (call_ids[0], "missing_in_lago"),
            (call_ids[1], "dead"),
        ]
        dead = next(d for d in lines if d["kind"] == "dead")
        assert dead["lago"]["last_error"] == "lago 422: poison"
        assert b"2 difference(s)" in dirty.stderr

        after = decimal_json(export(server.base_url))["summary"]
        assert (after["delivered"], after["dead_lettered"], after["not_sent"]) == (7, 1, 1)


def test_without_lago_every_request_is_not_sent_and_reconcile_says_there_is_nothing_to_do(
    upstream: RunningUpstream, database_url: str, tmp_path: Path
) -> None:
    config_text = proxy_config(upstream.base_url)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(config_text)
    with run_server(config_text, database_url) as server:
        for customer in ("nolago-1", "nolago-1", "nolago-2"):
            chat_ok(server.base_url, customer, MASTER_KEY)
        body = decimal_json(export(server.base_url))
        assert {row["customer_id"]: row["not_sent"] for row in body["rows"]} == {"nolago-1": 2, "nolago-2": 1}
        assert body["summary"]["not_sent"] == 3 and body["summary"]["delivered"] == 0
    result = cli("reconcile", "--config", str(config_path), database_url=database_url, env={})
    assert result.returncode == 2
    assert b"Lago is not configured" in result.stderr
    assert b"Traceback" not in result.stderr
