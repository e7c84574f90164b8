"""Lago's webhook signatures, checked as Lago signs them, and its events.errors read as rejections."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest

from spendledger.ledger.lago_webhooks import WebhookRefused, public_key_of, rejections, verify
from tests.fakes.lago import FakeLago

LAGO = FakeLago()
OTHER = FakeLago()  # another organization: other keys
NOW = datetime(2026, 12, 7, tzinfo=UTC)


async def lago_public_key() -> bytes:
    return public_key_of(LAGO.public_key_base64())


async def checked(body: bytes, headers: dict[str, str], hmac_key: str | None = LAGO.hmac_key) -> str:
    return await verify({k.lower(): v for k, v in headers.items()}, body, hmac_key, lago_public_key)


@pytest.mark.parametrize("algorithm", ["hmac", "jwt"])
async def test_a_webhook_lago_signed_is_taken_and_named_by_its_unique_key(algorithm: str) -> None:
    body, headers = LAGO.events_errors_webhook({"invalid_code": ["c-1"]}, algorithm, unique_key="w-1")
    assert await checked(body, headers) == "w-1"


@pytest.mark.parametrize("algorithm", ["hmac", "jwt"])
async def test_another_key_or_another_body_is_refused(algorithm: str) -> None:
    body, headers = OTHER.events_errors_webhook({"invalid_code": ["c-1"]}, algorithm)
    with pytest.raises(WebhookRefused) as refused:
        await checked(body, headers)
    assert refused.value.status == 401
    body, headers = LAGO.events_errors_webhook({"invalid_code": ["c-1"]}, algorithm)
    with pytest.raises(WebhookRefused):
        await checked(body.replace(b"c-1", b"c-2"), headers)


async def test_hmac_without_the_token_configured_says_what_to_set() -> None:
    body, headers = LAGO.events_errors_webhook({}, "hmac")
    with pytest.raises(WebhookRefused, match="LAGO_WEBHOOK_HMAC_KEY"):
        await checked(body, headers, hmac_key=None)


@pytest.mark.parametrize(
    ("change", "status"),
    [
        ({"X-Lago-Signature-Algorithm": "none"}, 400),
        ({"X-Lago-Signature": ""}, 401),
        ({"X-Lago-Unique-Key": ""}, 400),
        ({"X-Lago-Unique-Key": "x" * 300}, 400),
    ],
)
async def test_headers_not_in_lago_s_shape_are_refused(change: dict[str, str], status: int) -> None:
    body, headers = LAGO.events_errors_webhook({}, "hmac")
    with pytest.raises(WebhookRefused) as refused:
        await checked(body, headers | change)
    assert refused.value.status == status


def test_events_errors_become_one_rejection_per_transaction_and_error() -> None:
    body, _ = LAGO.events_errors_webhook({"invalid_code": ["a", "b", "a"], "missing_group_key": ["c"]})
    found = rejections(body, "w-1", NOW)
    assert [(r.transaction_id, r.error) for r in found] == [("a", "invalid_code"), ("b", "invalid_code"), ("c", "missing_group_key")]
    assert {r.webhook_id for r in found} == {"w-1"} and {r.received_at for r in found} == {NOW}


@pytest.mark.parametrize(
    "document",
    [
        [1],
        {"object_type": "events_errors"},
        {"webhook_type": "events.errors"},
        {"webhook_type": "events.errors", "events_errors": {"invalid_code": "c-1"}},
        {"webhook_type": "events.errors", "events_errors": {"invalid_code": [7]}},
        {"webhook_type": "events.errors", "events_errors": {"invalid_code": ["\x00"]}},
    ],
)
def test_a_body_not_in_lago_s_shape_is_a_400(document: object) -> None:
    with pytest.raises(WebhookRefused) as refused:
        rejections(json.dumps(document).encode(), "w", NOW)
    assert refused.value.status == 400


def test_other_webhook_types_record_nothing() -> None:
    assert rejections(b'{"webhook_type": "invoice.created", "invoice": {}}', "w", NOW) == []


def test_lago_s_public_key_is_read_as_it_serves_it() -> None:
    pem = public_key_of(LAGO.public_key_base64())  # base64 of the PEM, wrapped at 60 columns
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    der = base64.b64decode(pem.split(b"-----")[2])
    assert public_key_of(base64.b64encode(der).decode()) == pem  # a bare DER key
    for bad in ("not base64!", base64.b64encode(b"hello").decode(), 5):
        with pytest.raises(ValueError):
            public_key_of(bad)
