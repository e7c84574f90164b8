"""GET /audit/events end to end: a real server, requests by several customers, keys and models, then
the log read back as JSON pages and as NDJSON, filtered, by the master key and by a read-only key.

Expected results come from the database directly (the events table in (txid, position) order).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest

from tests.e2e.conftest import MASTER_KEY
from tests.support import RunningServer

AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
MESSAGES = [{"role": "user", "content": "audit me"}]
EVENT_FIELDS = {"position", "txid", "stream", "version", "type", "data", "metadata", "recorded_at"}
Params = list[tuple[str, str]]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def fetch(database_url: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(database_url)
        try:
            return [dict(row) for row in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    return asyncio.run(run())


def expected_positions(server: RunningServer, where: str = "true", *args: Any) -> list[int]:
    rows = fetch(
        server.database_url, f"select position from events where {where} order by txid, position", *args
    )
    return [row["position"] for row in rows]


def generate(server: RunningServer, **fields: Any) -> dict[str, Any]:
    response = httpx.post(f"{server.base_url}/key/generate", headers=AUTH, json=fields)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def chat(server: RunningServer, key: str, model: str, customer: str) -> httpx.Response:
    return httpx.post(
        f"{server.base_url}/chat/completions",
        headers=bearer(key),
        json={"model": model, "messages": MESSAGES, "user": customer},
        timeout=30,
    )


def audit(server: RunningServer, params: Params, key: str = MASTER_KEY) -> httpx.Response:
    return httpx.get(f"{server.base_url}/audit/events", params=tuple(params), headers=bearer(key), timeout=30)


def pages(
    server: RunningServer, params: Params, key: str = MASTER_KEY, limit: int = 3
) -> list[dict[str, Any]]:
    """Every page, each its own request, following next_cursor."""
    events: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(10_000):
        query = [*params, ("limit", str(limit))] + ([("cursor", cursor)] if cursor else [])
        response = audit(server, query, key)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/json")
        body = json.loads(response.text, parse_float=Decimal)
        assert set(body) == {"events", "next_cursor"}
        assert len(body["events"]) <= limit
        events.extend(body["events"])
        cursor = body["next_cursor"]
        if cursor is None:
            return events
        assert isinstance(cursor, str) and len(body["events"]) == limit
    raise AssertionError("the cursor never ended")


def ndjson(server: RunningServer, params: Params, key: str = MASTER_KEY) -> list[dict[str, Any]]:
    with httpx.stream(
        "GET",
        f"{server.base_url}/audit/events",
        params=(*params, ("format", "ndjson")),
        headers=bearer(key),
        timeout=30,
    ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = list(response.iter_lines())
    assert all(line for line in lines), "one JSON object per line, no blank lines"
    return [json.loads(line, parse_float=Decimal) for line in lines]


def positions(events: list[dict[str, Any]]) -> list[int]:
    return [event["position"] for event in events]


def assert_error(response: httpx.Response, status: int, type_: str, param: str | None = None) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == type_, error
    if param is not None:
        assert error["param"] == param, error


class World:
    """What the module's requests created: keys (plaintext, hash, alias), customers, a time mark."""

    def __init__(self) -> None:
        self.keys: dict[str, dict[str, Any]] = {}
        self.customers: dict[str, str] = {}
        self.mark: datetime = datetime.now(UTC)


@pytest.fixture(scope="module")
def world(server: RunningServer) -> Iterator[World]:
    w = World()
    key_fields: dict[str, dict[str, Any]] = {
        "alpha": {"user_id": "audit-user-1", "team_id": "audit-team"},
        "beta": {"user_id": "audit-user-2"},
        "reader": {"metadata": {"role": "read_only"}},
        "auditor": {"metadata": {"role": "auditor"}},
        "plain": {"metadata": {"role": "developer"}},
        "gone": {},
    }
    for name, fields in key_fields.items():
        created = generate(server, key_alias=unique(f"audit-{name}"), **fields)
        w.keys[name] = {"key": created["key"], "hash": created["token"], "alias": created["key_alias"]}
    w.customers = {name: unique(f"audit-{name}") for name in ("a", "b", "blocked")}
    blocked = httpx.post(
        f"{server.base_url}/customer/new",
        headers=AUTH,
        json={"user_id": w.customers["blocked"], "blocked": True},
    )
    assert blocked.status_code == 200, blocked.text

    def run(key: str, model: str, customer: str, status: int = 200) -> None:
        response = chat(server, w.keys[key]["key"], model, w.customers[customer])
        assert response.status_code == status, response.text

    run("alpha", "fake-openai-endpoint", "a")
    run("alpha", "fake-openai-endpoint", "a")
    run("beta", "gpt-3.5-turbo", "b")
    run("reader", "fake-openai-endpoint", "b")
    run("gone", "gpt-3.5-turbo", "a")
    time.sleep(0.3)
    w.mark = datetime.now(UTC)
    time.sleep(0.3)
    run("alpha", "gpt-3.5-turbo", "b")
    run("beta", "fake-openai-endpoint", "a")
    run("reader", "gpt-3.5-turbo", "a")
    run("alpha", "fake-openai-endpoint", "blocked", status=403)
    run("beta", "gpt-3.5-turbo", "blocked", status=403)
    deleted = httpx.post(
        f"{server.base_url}/key/delete", headers=AUTH, json={"keys": [w.keys["gone"]["key"]]}
    )
    assert deleted.status_code == 200, deleted.text

    # Every committed event is readable once no older transaction is open (the server's own
    # background transactions are short): wait for the log to catch up with the table.
    total = len(expected_positions(server))
    deadline = time.monotonic() + 15
    while len(ndjson(server, [])) < total and time.monotonic() < deadline:
        time.sleep(0.1)
    yield w


# --- pages and the stream -------------------------------------------------------------------------


def test_json_pages_follow_the_cursor_across_requests_through_the_whole_log(
    server: RunningServer, world: World
) -> None:
    events = pages(server, [], limit=4)
    assert positions(events) == expected_positions(server)
    assert len(events) == 20  # 6 keys, 3 customers, 8 usages, 2 refusals, 1 deletion
    for event in events:
        assert set(event) == EVENT_FIELDS
        assert isinstance(event["txid"], str) and event["txid"].isdigit()
        assert isinstance(event["data"], dict) and event["data"]["type"] == event["type"]
        assert datetime.fromisoformat(event["recorded_at"]).tzinfo is not None
    # Pages of other sizes cut the same sequence.
    assert positions(pages(server, [], limit=1)) == positions(events)
    assert positions(pages(server, [], limit=1000)) == positions(events)

    # The data is the stored JSON with its exact digits: costs are the ledger's, to the last digit.
    stored = {
        row["position"]: row["cost"]
        for row in fetch(
            server.database_url,
            "select position, (data->>'cost') as cost from events where type = 'UsageRecorded'",
        )
    }
    usage = [e for e in events if e["type"] == "UsageRecorded"]
    assert len(usage) == len(stored) == 8
    for event in usage:
        assert isinstance(event["data"]["cost"], Decimal)
        assert str(event["data"]["cost"]) == stored[event["position"]]


def test_ndjson_streams_every_matching_event_as_the_pages_do(server: RunningServer, world: World) -> None:
    for params in (
        [],
        [("customer", world.customers["a"])],
        [("type", "UsageRecorded"), ("limit", "2")],  # the stream fetches pages of 2
        [("key", world.keys["beta"]["alias"]), ("limit", "1")],
    ):
        page_params = [p for p in params if p[0] != "limit"]
        streamed = ndjson(server, params)
        assert streamed == pages(server, page_params, limit=2), params
        assert streamed


def test_a_cursor_resumes_the_stream(server: RunningServer, world: World) -> None:
    first = audit(server, [("limit", "5")])
    cursor = first.json()["next_cursor"]
    rest = ndjson(server, [("cursor", cursor)])
    assert positions(first.json()["events"]) + positions(rest) == expected_positions(server)


# --- filters --------------------------------------------------------------------------------------


def test_filter_by_key_alias_plaintext_or_hash(server: RunningServer, world: World) -> None:
    alpha = world.keys["alpha"]
    expected = expected_positions(
        server, "data->>'key_hash' = $1 or stream = $2", alpha["hash"], f"key:{alpha['hash']}"
    )
    for value in (alpha["alias"], alpha["key"], alpha["hash"]):
        assert positions(pages(server, [("key", value)])) == expected, value
    types = [e["type"] for e in pages(server, [("key", alpha["alias"])], limit=100)]
    assert types.count("UsageRecorded") == 3 and types.count("RequestRefused") == 1
    assert "KeyGenerated" in types


def test_a_deleted_keys_alias_still_finds_its_events(server: RunningServer, world: World) -> None:
    gone = world.keys["gone"]
    assert not fetch(server.database_url, "select 1 from keys where key_hash = $1", gone["hash"])
    events = pages(server, [("key", gone["alias"])])
    assert [e["type"] for e in events] == ["KeyGenerated", "UsageRecorded", "KeyDeleted"]
    assert_error(audit(server, [("key", unique("no-such-alias"))]), 404, "not_found_error", "key")


def test_filter_by_customer(server: RunningServer, world: World) -> None:
    for name in ("a", "b", "blocked"):
        customer = world.customers[name]
        events = pages(server, [("customer", customer)])
        expected = expected_positions(
            server, "data->>'customer_id' = $1 or stream = $2", customer, f"customer:{customer}"
        )
        assert positions(events) == expected and events
        assert any(e["stream"] == f"customer:{customer}" for e in events)  # CustomerCreated
    assert pages(server, [("customer", unique("nobody"))]) == []


def test_filter_by_type_one_or_several(server: RunningServer, world: World) -> None:
    for type_ in ("UsageRecorded", "RequestRefused", "KeyGenerated"):
        events = pages(server, [("type", type_)])
        assert positions(events) == expected_positions(server, "type = $1", type_)
        assert {e["type"] for e in events} == {type_}
    assert len(pages(server, [("type", "RequestRefused")])) == 2
    assert len(pages(server, [("type", "KeyGenerated")])) == 6
    both = expected_positions(server, "type in ('UsageRecorded', 'RequestRefused')")
    assert positions(pages(server, [("type", "UsageRecorded,RequestRefused")])) == both
    assert positions(pages(server, [("type", "UsageRecorded"), ("type", "RequestRefused")])) == both
    refused = pages(server, [("type", "RequestRefused"), ("customer", world.customers["blocked"])])
    assert {e["data"]["reason"] for e in refused} == {"customer_blocked"}


def test_filter_by_model_and_user_and_team(server: RunningServer, world: World) -> None:
    assert positions(pages(server, [("model", "gpt-3.5-turbo")])) == expected_positions(
        server, "data->>'model_group' = 'gpt-3.5-turbo'"
    )
    user = pages(server, [("user", "audit-user-2")])
    assert positions(user) == expected_positions(server, "data->>'user_id' = 'audit-user-2'")
    assert {e["type"] for e in user} == {"KeyGenerated", "UsageRecorded", "RequestRefused"}
    team = pages(server, [("team", "audit-team"), ("model", "fake-openai-endpoint")])
    assert positions(team) == expected_positions(
        server, "data->>'team_id' = 'audit-team' and data->>'model_group' = 'fake-openai-endpoint'"
    )
    assert len(team) == 3  # two requests and the refusal; the KeyGenerated names no model


def test_filter_by_time_range(server: RunningServer, world: World) -> None:
    mark = world.mark
    after = expected_positions(server, "recorded_at >= $1", mark)
    before = expected_positions(server, "recorded_at < $1", mark)
    assert after and before
    for text in (mark.isoformat(), mark.isoformat().replace("+00:00", "Z")):
        assert positions(pages(server, [("start", text)])) == after
        assert positions(pages(server, [("end", text)])) == before
    naive = mark.replace(tzinfo=None).isoformat()  # read as UTC
    assert positions(pages(server, [("start", naive)])) == after
    both = pages(server, [("start", "2020-01-01"), ("end", mark.isoformat()), ("type", "UsageRecorded")])
    assert positions(both) == expected_positions(server, "recorded_at < $1 and type = 'UsageRecorded'", mark)
    assert len(both) == 5
    assert pages(server, [("start", "2999-01-01T00:00:00+00:00")]) == []


# --- who may read ---------------------------------------------------------------------------------


def test_a_read_only_key_sees_only_its_own_events_and_cannot_widen(
    server: RunningServer, world: World
) -> None:
    for role in ("reader", "auditor"):
        own = world.keys[role]
        key = own["key"]
        expected = expected_positions(
            server, "data->>'key_hash' = $1 or stream = $2", own["hash"], f"key:{own['hash']}"
        )
        events = pages(server, [], key=key)
        assert positions(events) == expected and events
        assert ndjson(server, [], key=key) == events
        assert all(e["data"].get("key_hash") == own["hash"] for e in events)
        # Naming itself changes nothing; naming anything else never widens the view.
        for value in (key, own["hash"], own["alias"]):
            assert positions(pages(server, [("key", value)], key=key)) == expected
        for other in ("alpha", "beta", "plain"):
            for value in (world.keys[other]["alias"], world.keys[other]["key"], world.keys[other]["hash"]):
                assert pages(server, [("key", value)], key=key) == []
        assert pages(server, [("key", unique("no-such-alias"))], key=key) == []
        assert pages(server, [("customer", world.customers["blocked"])], key=key) == []
        assert pages(server, [("type", "RequestRefused")], key=key) == []

    reader = world.keys["reader"]
    narrowed = pages(
        server, [("customer", world.customers["a"]), ("type", "UsageRecorded")], key=reader["key"]
    )
    assert len(narrowed) == 1 and narrowed[0]["data"]["model_group"] == "gpt-3.5-turbo"


def test_other_keys_are_refused(server: RunningServer, world: World) -> None:
    for key in (world.keys["plain"]["key"], world.keys["alpha"]["key"]):  # known keys, no reading role
        assert_error(audit(server, [], key=key), 403, "permission_denied")
        assert_error(audit(server, [("format", "ndjson")], key=key), 403, "permission_denied")
    assert_error(audit(server, [], key="sk-not-a-key"), 401, "auth_error")
    assert_error(audit(server, [("format", "ndjson")], key="sk-not-a-key"), 401, "auth_error")
    assert_error(httpx.get(f"{server.base_url}/audit/events"), 401, "auth_error")
    assert_error(audit(server, [], key=world.keys["gone"]["key"]), 401, "auth_error")  # deleted


def test_bad_params_get_400_envelopes(server: RunningServer, world: World) -> None:
    for params, param in (
        ([("cursor", "not a cursor")], "cursor"),
        ([("cursor", "djE6eDox")], "cursor"),
        ([("start", "yesterday")], "start"),
        ([("end", "2026-13-45")], "end"),
        ([("start", "2026-11-30"), ("end", "2026-11-01")], "end"),
        ([("limit", "0")], "limit"),
        ([("limit", "1001")], "limit"),
        ([("limit", "many")], "limit"),
        ([("type", "UsageRecorded,NoSuchEvent")], "type"),
        ([("format", "xml")], "format"),
        ([("customer", "nul\x00byte")], "customer"),  # PostgreSQL text holds no NUL
        ([("key", "nul\x00alias")], "key"),
    ):
        assert_error(audit(server, params), 400, "invalid_request_error", param)
        if param != "format":
            assert_error(audit(server, [*params, ("format", "ndjson")]), 400, "invalid_request_error", param)
    assert_error(
        audit(server, [("cursor", "garbage")], key=world.keys["reader"]["key"]), 400, "invalid_request_error"
    )
