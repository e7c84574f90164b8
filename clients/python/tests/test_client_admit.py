"""Admission (holds and refusals), `ledger.call(...)` blocks, the async ledger, the wire's details."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from types import SimpleNamespace

import pytest
from conftest import FAST
from sl_client_fakes import FakeLedger, envelope
from spendledger_client import (
    AsyncSpendLedger,
    BudgetExceeded,
    CustomerBlocked,
    RateLimited,
    SpendLedger,
    Unreachable,
    normalize_usage,
)
from spendledger_client.delivery import parse_retry_after
from spendledger_client.records import encode_batch, make_record

USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def sync_ledger(server: FakeLedger) -> SpendLedger:
    return SpendLedger(server.url, server.api_key, **FAST)


def test_admit_returns_the_hold(ledger_server: FakeLedger) -> None:
    with sync_ledger(ledger_server) as ledger:
        hold = ledger.admit("gpt-4o", user="c1", max_tokens=100, messages=[{"role": "user", "content": "hi"}])
    assert hold.hold_id.startswith("hold-") and isinstance(hold.expires_at, datetime)
    assert ledger_server.admits == [
        {"model": "gpt-4o", "user": "c1", "prompt_tokens": None, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "n": None}
    ]


@pytest.mark.parametrize(
    ("status", "code", "exception"),
    [(429, "budget_exceeded", BudgetExceeded), (429, "rate_limit_exceeded", RateLimited), (403, "customer_blocked", CustomerBlocked)],
)
def test_refusals_are_typed(ledger_server: FakeLedger, status: int, code: str, exception: type[Exception]) -> None:
    ledger_server.admit_reply = envelope(status, code, f"refused: {code}", {"retry-after": "7"})
    with sync_ledger(ledger_server) as ledger, pytest.raises(exception) as raised:
        ledger.admit("gpt-4o", user="c1")
    assert raised.value.message == f"refused: {code}"  # type: ignore[attr-defined]
    assert raised.value.retry_after_s == 7  # type: ignore[attr-defined]


def test_a_call_block_records_with_its_hold(ledger_server: FakeLedger) -> None:
    with sync_ledger(ledger_server) as ledger:
        with ledger.call("gpt-4o", user="c1", max_tokens=50, metadata={"feature": "chat"}) as call:
            call.usage = SimpleNamespace(model_dump=lambda: USAGE)  # an SDK usage object
        ledger.flush(timeout_s=5)
    record = ledger_server.records[call.call_id]
    assert call.hold is not None and record["hold_id"] == call.hold.hold_id
    assert record["status"] == "success" and record["usage"] == USAGE and record["user"] == "c1"
    assert record["metadata"] == {"feature": "chat"} and record["start_time"] <= record["end_time"]


def test_a_call_block_that_raises_records_a_failure(ledger_server: FakeLedger) -> None:
    with sync_ledger(ledger_server) as ledger:
        with pytest.raises(ZeroDivisionError), ledger.call("gpt-4o", user="c1") as call:
            call.usage = USAGE
            1 / 0  # noqa: B018
        ledger.flush(timeout_s=5)
    record = ledger_server.records[call.call_id]
    assert record["status"] == "failure" and record["usage"] is None and record["hold_id"]


def test_a_refused_call_block_does_not_run(ledger_server: FakeLedger) -> None:
    ledger_server.admit_reply = envelope(429, "budget_exceeded", "over budget")
    ran = False
    with sync_ledger(ledger_server) as ledger:
        with pytest.raises(BudgetExceeded), ledger.call("gpt-4o", user="c1"):
            ran = True
        ledger.flush(timeout_s=5)
    assert not ran and ledger_server.records == {}


def test_fail_open_goes_ahead_without_a_hold(ledger_server: FakeLedger) -> None:
    ledger_server.admit_reply = envelope(503, "unavailable", "later")
    with sync_ledger(ledger_server) as ledger:
        with ledger.call("gpt-4o", fail_open=True) as call:
            call.usage = USAGE
        ledger.flush(timeout_s=5)
    assert ledger_server.records[call.call_id]["hold_id"] is None


async def test_the_async_ledger(ledger_server: FakeLedger) -> None:
    async with AsyncSpendLedger(ledger_server.url, ledger_server.api_key, **FAST) as ledger:
        hold = await ledger.admit("gpt-4o", user="c1")
        async with ledger.call("gpt-4o", user="c1") as call:
            call.usage = USAGE
        with pytest.raises(ValueError):
            async with ledger.call("gpt-4o", user="c1") as failed:
                raise ValueError("upstream said no")
        result = await ledger.record_now(model="gpt-4o", usage=USAGE, hold_id=hold.hold_id, call_id="now")
        assert result.outcome == "recorded" and result.cost == Decimal("0.25")
        ledger.record(model="gpt-4o", usage=USAGE, call_id="queued")
        assert await ledger.flush(timeout_s=5)
        ledger_server.admit_reply = envelope(403, "customer_blocked", "blocked")
        with pytest.raises(CustomerBlocked):
            await ledger.admit("gpt-4o", user="c1")
    assert ledger_server.records[call.call_id]["status"] == "success"
    assert ledger_server.records[failed.call_id]["status"] == "failure"
    assert {"now", "queued"} <= set(ledger_server.records)


async def test_async_admit_on_a_server_that_is_down(ledger_server: FakeLedger) -> None:
    ledger_server.down()
    async with AsyncSpendLedger(ledger_server.url, "sk-test", **{**FAST, "close_timeout_s": 0}) as ledger:
        with pytest.raises(Unreachable):
            await ledger.admit("gpt-4o")


def test_usage_is_normalized_to_openais_shape() -> None:
    litellm_like = {
        "prompt_tokens": 10,
        "completion_tokens": None,
        "total_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 4, "text_tokens": None, "audio_tokens": 0},
        "completion_tokens_details": None,
        "cache_read_input_tokens": 4,
    }
    assert normalize_usage(litellm_like) == {
        "prompt_tokens": 10,
        "completion_tokens": 0,
        "total_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 4, "audio_tokens": 0},
    }
    responses_api = {"input_tokens": 5, "output_tokens": 6, "output_tokens_details": {"reasoning_tokens": 2}}
    assert normalize_usage(responses_api) == {
        "prompt_tokens": 5,
        "completion_tokens": 6,
        "total_tokens": 11,
        "completion_tokens_details": {"reasoning_tokens": 2},
    }


def test_records_are_checked_where_they_are_made() -> None:
    with pytest.raises(ValueError):
        make_record(model="m", call_id="")
    with pytest.raises(ValueError):
        make_record(model="m", call_id="x" * 257)
    with pytest.raises(ValueError):
        make_record(model="m", cost="NaN")
    with pytest.raises(TypeError):
        make_record(model="m", metadata={"when": datetime.now()})


def test_cost_is_written_as_the_decimals_digits() -> None:
    body = encode_batch([make_record(model="m", call_id="a", cost=Decimal("1E-7")), make_record(model="m", call_id="b", cost=0.1)])
    assert b'"call_id":"a"' in body and b'"cost":0.0000001}' in body and b'"cost":0.1}' in body


def test_retry_after_takes_seconds_and_dates() -> None:
    assert parse_retry_after("3") == 3
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0
    assert parse_retry_after("soon") is None
