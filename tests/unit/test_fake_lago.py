"""Checks that the fake Lago answers like Lago's events API: auth, validation, dedupe, all-or-nothing batches."""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest

from tests.fakes.lago import (
    BATCH_PATH,
    DEFAULT_API_KEY,
    DOWN_BODY,
    EVENTS_PATH,
    FakeLago,
    RunningLago,
    parse_json,
    run_fake_lago,
)

SUB = "team-a"


def _event(tid: str, sub: str = SUB, **overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "transaction_id": tid,
        "external_subscription_id": sub,
        "external_customer_id": sub,
        "code": "openai_tokens",
        "timestamp": 1732250000.123,
        "properties": {
            "input_tokens": 12,
            "output_tokens": 7,
            "total_tokens": 19,
            "model": "fake-openai-endpoint",
            "response_cost": 0.000032,
        },
    }
    event.update(overrides)
    return event


def _unprocessable(error_details: dict[str, Any]) -> dict[str, Any]:
    return {
        "status": 422,
        "error": "Unprocessable Entity",
        "code": "validation_errors",
        "error_details": error_details,
    }


@pytest.fixture(scope="module")
def lago() -> Iterator[RunningLago]:
    with run_fake_lago() as running:
        yield running


@pytest.fixture
def client(lago: RunningLago) -> Iterator[httpx.Client]:
    lago.app.reset()
    headers = {"Authorization": f"Bearer {DEFAULT_API_KEY}"}
    with httpx.Client(base_url=lago.base_url, headers=headers, timeout=5) as c:
        yield c


def test_runner_handle(lago: RunningLago) -> None:
    assert lago.base_url == f"http://127.0.0.1:{lago.port}"
    assert isinstance(lago.app, FakeLago)


def test_auth_missing_wrong_and_revoked_key(lago: RunningLago, client: httpx.Client) -> None:
    anonymous = httpx.post(f"{lago.base_url}{EVENTS_PATH}", json={"event": _event("t1")})
    assert anonymous.status_code == 401
    assert anonymous.json() == {"status": 401, "error": "Unauthorized"}
    wrong = client.post(EVENTS_PATH, json={"event": _event("t1")}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    not_bearer = client.post(
        EVENTS_PATH, json={"event": _event("t1")}, headers={"Authorization": DEFAULT_API_KEY}
    )
    assert not_bearer.status_code == 401
    assert lago.app.accepted == {}

    lago.app.api_key = "rotated"  # the old key is revoked at run time
    assert client.post(BATCH_PATH, json={"events": [_event("t1")]}).status_code == 401
    ok = client.post(EVENTS_PATH, json={"event": _event("t1")}, headers={"Authorization": "Bearer rotated"})
    assert ok.status_code == 200
    lago.app.reset()
    assert lago.app.api_key == DEFAULT_API_KEY


def test_single_event_accepted_with_exact_decimals(lago: RunningLago, client: httpx.Client) -> None:
    content = (
        b'{"event": {"transaction_id": "t1", "external_subscription_id": "team-a", "code": "openai_tokens",'
        b' "timestamp": 1732250000.123, "properties": {"input_tokens": 12, "response_cost": 0.000032,'
        b' "big": 0.10000000000000000001}}}'
    )
    resp = client.post(EVENTS_PATH, content=content, headers={"content-type": "application/json"})
    assert resp.status_code == 200, resp.text
    event = resp.json()["event"]
    assert event["transaction_id"] == "t1"
    assert event["external_subscription_id"] == "team-a"
    assert event["code"] == "openai_tokens"
    assert event["lago_customer_id"] is None
    assert event["timestamp"] == "2024-11-22T04:33:20.123Z"
    assert isinstance(event["lago_id"], str)
    # the answer keeps the properties as JSON numbers with their exact digits
    answered = parse_json(resp.content)["event"]["properties"]
    assert answered["response_cost"] == Decimal("0.000032")
    assert answered["big"] == Decimal("0.10000000000000000001")

    stored = lago.app.accepted[("team-a", "t1")]
    assert stored["properties"]["response_cost"] == Decimal("0.000032")
    assert str(stored["properties"]["big"]) == "0.10000000000000000001"
    assert stored["properties"]["input_tokens"] == 12 and isinstance(
        stored["properties"]["input_tokens"], int
    )
    assert stored["timestamp"] == Decimal("1732250000.123")
    assert lago.app.accepted_transaction_ids() == ["t1"]
    assert lago.app.events_for("team-a") == [stored]
    assert lago.app.events_for("other") == []

    [req] = lago.app.requests
    assert (req.method, req.path, req.status) == ("POST", EVENTS_PATH, 200)
    assert req.headers["authorization"] == f"Bearer {DEFAULT_API_KEY}"
    assert req.json["event"]["properties"]["response_cost"] == Decimal("0.000032")
    assert req.body == content


def test_integer_and_decimal_property_values_and_timestamps(lago: RunningLago, client: httpx.Client) -> None:
    events = [
        _event("int", properties={"input_tokens": 1, "response_cost": 0}),
        _event("dec", properties={"input_tokens": 1.0, "response_cost": 1.5}),
        _event("str", properties={"response_cost": "0.25"}, timestamp="1732250000.5"),
        _event("intts", timestamp=1732250000),
        _event("nots", properties=None, timestamp=None),
    ]
    resp = client.post(BATCH_PATH, json={"events": events})
    assert resp.status_code == 200, resp.text
    answered = resp.json()["events"]
    assert [e["transaction_id"] for e in answered] == ["int", "dec", "str", "intts", "nots"]
    assert answered[2]["timestamp"] == "2024-11-22T04:33:20.500Z"
    assert answered[3]["timestamp"] == "2024-11-22T04:33:20.000Z"
    assert answered[4]["properties"] == {}
    assert lago.app.accepted[(SUB, "int")]["properties"]["response_cost"] == 0
    assert lago.app.accepted[(SUB, "dec")]["properties"]["response_cost"] == Decimal("1.5")


def test_single_invalid_event(lago: RunningLago, client: httpx.Client) -> None:
    bad = {"transaction_id": "", "external_subscription_id": 7, "timestamp": "yesterday", "properties": [1]}
    resp = client.post(EVENTS_PATH, json={"event": bad})
    assert resp.status_code == 422
    assert resp.json() == _unprocessable(
        {
            "transaction_id": ["value_is_mandatory"],
            "external_subscription_id": ["value_is_invalid"],
            "code": ["value_is_mandatory"],
            "timestamp": ["invalid_format"],
            "properties": ["value_is_invalid"],
        }
    )
    nested = client.post(EVENTS_PATH, json={"event": _event("t1", properties={"x": {"y": 1}})})
    assert nested.status_code == 422
    assert nested.json()["error_details"] == {"properties": ["value_is_invalid"]}
    boolean = client.post(EVENTS_PATH, json={"event": _event("t1", properties={"x": True})})
    assert boolean.status_code == 422
    assert lago.app.accepted == {}


def test_bad_requests_and_unknown_paths(lago: RunningLago, client: httpx.Client) -> None:
    not_json = client.post(EVENTS_PATH, content=b"{nope", headers={"content-type": "application/json"})
    assert not_json.status_code == 400
    assert not_json.json()["status"] == 400
    assert not_json.json()["error"].startswith("BadRequest: ")
    missing = client.post(EVENTS_PATH, json={"events": [_event("t1")]})
    assert missing.status_code == 400
    assert missing.json() == {
        "status": 400,
        "error": "BadRequest: param is missing or the value is empty: event",
    }
    assert client.post("/api/v1/nope", json={}).status_code == 404
    assert client.get("/api/v1/nope").status_code == 404
    assert [r.status for r in lago.app.requests] == [400, 400, 404, 404]


def test_single_duplicate_is_value_already_exist(lago: RunningLago, client: httpx.Client) -> None:
    assert client.post(EVENTS_PATH, json={"event": _event("t1")}).status_code == 200
    again = client.post(EVENTS_PATH, json={"event": _event("t1", properties={"input_tokens": 99})})
    assert again.status_code == 422
    assert again.json() == _unprocessable({"transaction_id": ["value_already_exist"]})
    assert lago.app.accepted[(SUB, "t1")]["properties"]["input_tokens"] == 12  # first one kept
    # the same transaction_id under another subscription is a different event
    assert client.post(EVENTS_PATH, json={"event": _event("t1", sub="team-b")}).status_code == 200
    assert lago.app.accepted_transaction_ids() == ["t1", "t1"]
    assert len(lago.app.events_for("team-b")) == 1


def test_batch_accept_in_order(lago: RunningLago, client: httpx.Client) -> None:
    events = [_event(f"t{i}", sub="team-b" if i % 2 else SUB) for i in range(100)]
    resp = client.post(BATCH_PATH, json={"events": events})
    assert resp.status_code == 200, resp.text
    assert [e["transaction_id"] for e in resp.json()["events"]] == [f"t{i}" for i in range(100)]
    assert lago.app.accepted_transaction_ids() == [f"t{i}" for i in range(100)]
    assert [e["transaction_id"] for e in lago.app.events_for(SUB)] == [f"t{i}" for i in range(0, 100, 2)]


def test_batch_too_many_and_empty(lago: RunningLago, client: httpx.Client) -> None:
    too_many = client.post(BATCH_PATH, json={"events": [_event(f"t{i}") for i in range(101)]})
    assert too_many.status_code == 422
    assert too_many.json() == _unprocessable({"events": ["too_many_events"]})
    empty = client.post(BATCH_PATH, json={"events": []})
    assert empty.status_code == 422
    assert empty.json() == _unprocessable({"events": ["no_events"]})
    assert lago.app.accepted == {}


def test_batch_with_a_duplicate_stores_nothing(lago: RunningLago, client: httpx.Client) -> None:
    assert client.post(EVENTS_PATH, json={"event": _event("old")}).status_code == 200
    resp = client.post(BATCH_PATH, json={"events": [_event("new1"), _event("old"), _event("new2")]})
    assert resp.status_code == 422
    assert resp.json() == _unprocessable({"1": {"transaction_id": ["value_already_exist"]}})
    assert lago.app.accepted_transaction_ids() == ["old"]
    # the client re-sends the rest: accepted
    rest = client.post(BATCH_PATH, json={"events": [_event("new1"), _event("new2")]})
    assert rest.status_code == 200
    assert lago.app.accepted_transaction_ids() == ["old", "new1", "new2"]


def test_batch_duplicates_within_and_across(lago: RunningLago, client: httpx.Client) -> None:
    assert client.post(EVENTS_PATH, json={"event": _event("old")}).status_code == 200
    events = [_event("old"), _event("x"), _event("x"), _event("y")]
    resp = client.post(BATCH_PATH, json={"events": events})
    assert resp.json() == _unprocessable(
        {"0": {"transaction_id": ["value_already_exist"]}, "2": {"transaction_id": ["value_already_exist"]}}
    )
    lago.app.report_all_duplicates = False  # like Postgres aborting at the first unique violation
    assert client.post(BATCH_PATH, json={"events": events}).json()["error_details"] == {
        "0": {"transaction_id": ["value_already_exist"]}
    }
    assert lago.app.accepted_transaction_ids() == ["old"]


def test_batch_invalid_items_keyed_by_index_hide_duplicates(lago: RunningLago, client: httpx.Client) -> None:
    assert client.post(EVENTS_PATH, json={"event": _event("old")}).status_code == 200
    events = [
        _event("old"),
        _event("ok"),
        _event("bad-ts", timestamp="soon"),
        {"transaction_id": "no-code", "external_subscription_id": SUB},
        "not an object",
    ]
    resp = client.post(BATCH_PATH, json={"events": events})
    assert resp.status_code == 422
    # validation runs first over every item; the duplicate at 0 is only reported once the rest is valid
    assert resp.json() == _unprocessable(
        {
            "2": {"timestamp": ["invalid_format"]},
            "3": {"code": ["value_is_mandatory"]},
            "4": {
                "transaction_id": ["value_is_mandatory"],
                "external_subscription_id": ["value_is_mandatory"],
                "code": ["value_is_mandatory"],
            },
        }
    )
    assert lago.app.accepted_transaction_ids() == ["old"]


def test_poison_transaction_ids(lago: RunningLago, client: httpx.Client) -> None:
    lago.app.reject_transaction_ids = {"poison"}
    single = client.post(EVENTS_PATH, json={"event": _event("poison")})
    assert single.status_code == 422
    assert single.json() == _unprocessable({"properties": ["value_is_invalid"]})
    batch = client.post(BATCH_PATH, json={"events": [_event("a"), _event("poison"), _event("b")]})
    assert batch.status_code == 422
    details = batch.json()["error_details"]
    assert details == {"1": {"properties": ["value_is_invalid"]}}
    assert "value_already_exist" not in str(details)
    assert lago.app.accepted == {}
    # set the poison item aside, re-send the rest
    assert client.post(BATCH_PATH, json={"events": [_event("a"), _event("b")]}).status_code == 200
    assert lago.app.accepted_transaction_ids() == ["a", "b"]


def test_down_answers_503_html_and_stores_nothing(lago: RunningLago, client: httpx.Client) -> None:
    lago.app.down = True
    resp = client.post(BATCH_PATH, json={"events": [_event("t1")]})
    assert resp.status_code == 503
    assert resp.headers["content-type"].startswith("text/html")
    assert resp.content == DOWN_BODY
    # even without credentials: the load balancer answers, not Lago
    assert httpx.post(f"{lago.base_url}{EVENTS_PATH}", json={}).status_code == 503
    assert lago.app.accepted == {}
    lago.app.down = False
    assert client.post(BATCH_PATH, json={"events": [_event("t1")]}).status_code == 200


@pytest.mark.parametrize("status", [500, 502, 429])
def test_fail_status(lago: RunningLago, client: httpx.Client, status: int) -> None:
    lago.app.fail_status = status
    lago.app.retry_after_s = 3
    resp = client.post(BATCH_PATH, json={"events": [_event("t1")]})
    assert resp.status_code == status
    assert resp.json()["status"] == status
    if status == 429:
        assert resp.headers["retry-after"] == "3"
        assert resp.json() == {"status": 429, "error": "Too Many Requests"}
    else:
        assert "retry-after" not in resp.headers
    assert lago.app.accepted == {}
    assert lago.app.requests[-1].status == status
    lago.app.fail_status = None
    assert client.post(BATCH_PATH, json={"events": [_event("t1")]}).status_code == 200


def test_delay_stores_before_answering(lago: RunningLago, client: httpx.Client) -> None:
    lago.app.delay_s = 1.5
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        client.post(BATCH_PATH, json={"events": [_event("t1"), _event("t2")]}, timeout=0.3)
    assert time.monotonic() - started < 1.2
    # sent but not acknowledged: Lago did the work
    assert lago.app.accepted_transaction_ids() == ["t1", "t2"]
    assert lago.app.requests[-1].status == 200
    lago.app.delay_s = 0.0
    retry = client.post(BATCH_PATH, json={"events": [_event("t1"), _event("t2")]})
    assert retry.status_code == 422
    assert retry.json()["error_details"] == {
        "0": {"transaction_id": ["value_already_exist"]},
        "1": {"transaction_id": ["value_already_exist"]},
    }
    assert lago.app.accepted_transaction_ids() == ["t1", "t2"]


def test_delay_answers_late_when_client_waits(lago: RunningLago, client: httpx.Client) -> None:
    lago.app.delay_s = 0.3
    started = time.monotonic()
    resp = client.post(EVENTS_PATH, json={"event": _event("t1")})
    assert resp.status_code == 200
    assert time.monotonic() - started >= 0.3


def test_reset_restores_defaults(lago: RunningLago, client: httpx.Client) -> None:
    app = lago.app
    client.post(EVENTS_PATH, json={"event": _event("t1")})
    accepted, requests = app.accepted, app.requests
    controls: dict[str, Any] = {"down": True, "fail_status": 500, "delay_s": 2.0, "api_key": "x"}
    for name, value in controls.items():
        setattr(app, name, value)
    app.reject_transaction_ids.add("p")
    app.reset()
    assert (app.down, app.fail_status, app.delay_s, app.api_key) == (False, None, 0.0, DEFAULT_API_KEY)
    assert app.reject_transaction_ids == set()
    assert app.accepted is accepted and accepted == {}
    assert app.requests is requests and requests == []


def test_own_instance_with_custom_key() -> None:
    app = FakeLago(api_key="custom")
    with run_fake_lago(app) as running:
        resp = httpx.post(
            f"{running.base_url}{EVENTS_PATH}",
            json={"event": _event("t1")},
            headers={"Authorization": "Bearer custom"},
        )
        assert resp.status_code == 200
    assert app.accepted_transaction_ids() == ["t1"]
