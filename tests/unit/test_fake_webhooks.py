"""Checks the fake webhook receiver: recording, failure modes, and Standard Webhooks verification."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.fakes.webhooks import FakeWebhookReceiver, RunningWebhookReceiver, run_fake_webhook_receiver

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()

PAYLOAD = (
    b'{"event": "spend_tracked", "event_group": "customer", "spend": 0.000032, "total_spend": 1.10,'
    b' "max_budget": 10, "customer_id": "cust-1", "token": "ab12"}'
)


def _signed_headers(
    body: bytes, secret: str = SECRET, msg_id: str | None = None, at: dt.datetime | None = None
) -> dict[str, str]:
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    at = at or dt.datetime.now(tz=dt.UTC)
    signature = Webhook(secret).sign(msg_id, at, body.decode())
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature,
    }


@pytest.fixture(scope="module")
def receiver() -> Iterator[RunningWebhookReceiver]:
    with run_fake_webhook_receiver() as running:
        yield running


@pytest.fixture
def client(receiver: RunningWebhookReceiver) -> Iterator[httpx.Client]:
    receiver.app.reset()
    with httpx.Client(base_url=receiver.base_url, timeout=5) as c:
        yield c


def test_records_posts_with_exact_decimals(receiver: RunningWebhookReceiver, client: httpx.Client) -> None:
    assert receiver.url == f"http://127.0.0.1:{receiver.port}/webhook"
    resp = client.post("/webhook", content=PAYLOAD, headers={"Webhook-ID": "msg_1", "X-Other": "v"})
    assert resp.status_code == 200
    [delivery] = receiver.app.deliveries
    assert delivery.method == "POST" and delivery.path == "/webhook"
    assert delivery.body == PAYLOAD
    assert delivery.headers["webhook-id"] == "msg_1" and delivery.headers["x-other"] == "v"
    assert delivery.webhook_id == "msg_1"
    assert delivery.json["spend"] == Decimal("0.000032")
    assert str(delivery.json["total_spend"]) == "1.10"
    assert delivery.json["max_budget"] == 10
    assert delivery.status == 200 and delivery.ok


def test_non_json_body_is_recorded_raw(receiver: RunningWebhookReceiver, client: httpx.Client) -> None:
    assert client.post("/other/path", content=b"not json").status_code == 200
    [delivery] = receiver.app.deliveries
    assert delivery.json is None and delivery.body == b"not json" and delivery.path == "/other/path"


def test_only_posts_are_recorded(receiver: RunningWebhookReceiver, client: httpx.Client) -> None:
    assert client.get("/webhook").status_code == 405
    assert receiver.app.deliveries == []


def test_fail_status(receiver: RunningWebhookReceiver, client: httpx.Client) -> None:
    receiver.app.fail_status = 503
    for _ in range(2):
        assert client.post("/webhook", content=PAYLOAD, headers={"webhook-id": "msg_1"}).status_code == 503
    assert [d.status for d in receiver.app.deliveries] == [503, 503]
    assert receiver.app.unique_ids() == []
    receiver.app.fail_status = None
    assert client.post("/webhook", content=PAYLOAD, headers={"webhook-id": "msg_1"}).status_code == 200
    assert receiver.app.unique_ids() == ["msg_1"]


def test_fail_next_then_succeed(receiver: RunningWebhookReceiver, client: httpx.Client) -> None:
    receiver.app.fail_next = 2
    statuses = [
        client.post("/webhook", content=PAYLOAD, headers={"webhook-id": "msg_1"}).status_code
        for _ in range(4)
    ]
    assert statuses == [500, 500, 200, 200]
    assert receiver.app.fail_next == 0
    assert receiver.app.unique_ids() == ["msg_1"]
    assert len(receiver.app.successful()) == 2
    assert receiver.app.delivered_payloads() == [json.loads(PAYLOAD, parse_float=Decimal)]


def test_unique_ids_and_payloads_by_event(receiver: RunningWebhookReceiver, client: httpx.Client) -> None:
    budget: dict[str, Any] = {"event": "budget_crossed", "spend": 10}
    for msg_id, body in [("a", PAYLOAD), ("b", json.dumps(budget).encode()), ("a", PAYLOAD)]:
        client.post("/webhook", content=body, headers={"webhook-id": msg_id})
    receiver.app.fail_status = 500
    client.post("/webhook", content=PAYLOAD, headers={"webhook-id": "c"})  # failed: not counted
    assert receiver.app.unique_ids() == ["a", "b"]
    assert [p["event"] for p in receiver.app.delivered_payloads()] == ["spend_tracked", "budget_crossed"]
    assert receiver.app.delivered_payloads("budget_crossed") == [budget]


def test_delay(receiver: RunningWebhookReceiver, client: httpx.Client) -> None:
    receiver.app.delay_s = 1.5
    with pytest.raises(httpx.ReadTimeout):
        client.post("/webhook", content=PAYLOAD, headers={"webhook-id": "slow"}, timeout=0.3)
    [delivery] = receiver.app.deliveries  # recorded, answered (late) with 200
    assert delivery.status == 200
    receiver.app.delay_s = 0.2
    started = time.monotonic()
    assert client.post("/webhook", content=PAYLOAD).status_code == 200
    assert time.monotonic() - started >= 0.2


def test_verify_signed_deliveries(receiver: RunningWebhookReceiver, client: httpx.Client) -> None:
    for body in (PAYLOAD, json.dumps({"event": "threshold_crossed", "spend": 8.5}).encode()):
        assert client.post("/webhook", content=body, headers=_signed_headers(body)).status_code == 200
    verified = receiver.app.verify(SECRET)
    assert [p["event"] for p in verified] == ["spend_tracked", "threshold_crossed"]
    assert verified[0]["spend"] == Decimal("0.000032")
    assert verified[1]["spend"] == Decimal("8.5")
    # a signature carrying several versions/keys still verifies when one matches
    other = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    headers = _signed_headers(PAYLOAD)
    foreign = _signed_headers(PAYLOAD, other, headers["webhook-id"])["webhook-signature"]
    headers["webhook-signature"] = f"v2,abc {foreign} {headers['webhook-signature']}"
    client.post("/webhook", content=PAYLOAD, headers=headers)
    assert len(receiver.app.verify(SECRET)) == 3


@pytest.mark.parametrize(
    "tamper",
    ["wrong_secret", "body_changed", "id_changed", "no_signature", "no_id", "too_old"],
)
def test_verify_rejects(receiver: RunningWebhookReceiver, client: httpx.Client, tamper: str) -> None:
    headers = _signed_headers(PAYLOAD)
    body = PAYLOAD
    if tamper == "wrong_secret":
        headers = _signed_headers(PAYLOAD, "whsec_" + base64.b64encode(os.urandom(32)).decode())
    elif tamper == "body_changed":
        body = PAYLOAD.replace(b"0.000032", b"0.000033")
    elif tamper == "id_changed":
        headers["webhook-id"] = "msg_other"
    elif tamper == "no_signature":
        del headers["webhook-signature"]
    elif tamper == "no_id":
        del headers["webhook-id"]
    elif tamper == "too_old":
        headers = _signed_headers(PAYLOAD, at=dt.datetime.now(tz=dt.UTC) - dt.timedelta(minutes=10))
    good = _signed_headers(PAYLOAD)
    client.post("/webhook", content=PAYLOAD, headers=good)
    client.post("/webhook", content=body, headers=headers)
    with pytest.raises(WebhookVerificationError, match="delivery 1"):
        receiver.app.verify(SECRET)
    assert len(receiver.app.verify(SECRET, receiver.app.deliveries[:1])) == 1


def test_reset(receiver: RunningWebhookReceiver, client: httpx.Client) -> None:
    app = receiver.app
    client.post("/webhook", content=PAYLOAD)
    deliveries = app.deliveries
    controls: dict[str, Any] = {"fail_status": 500, "fail_next": 3, "delay_s": 1.0, "success_status": 204}
    for name, value in controls.items():
        setattr(app, name, value)
    app.reset()
    assert (app.fail_status, app.fail_next, app.delay_s, app.success_status) == (None, 0, 0.0, 200)
    assert app.deliveries is deliveries and deliveries == []


def test_success_status_and_own_instance() -> None:
    app = FakeWebhookReceiver(success_status=204)
    with run_fake_webhook_receiver(app) as running:
        resp = httpx.post(running.url, content=PAYLOAD, headers=_signed_headers(PAYLOAD))
        assert resp.status_code == 204
    assert app.successful()[0].ok
    assert len(app.verify(SECRET)) == 1
