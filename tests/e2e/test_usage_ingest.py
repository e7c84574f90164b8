"""`POST /usage` end to end (seed 003's SDK tab, server side): calls made outside the gateway are
billed like proxied ones — one UsageRecorded and one Lago event each, with the customer and the
exact cost — exactly once whatever is resent, with each bad record refused on its own."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import INPUT_PRICE, MASTER_KEY, OUTPUT_PRICE
from tests.e2e.enforcement_support import wait_until
from tests.e2e.outbox_support import lago_env, outbox_config
from tests.e2e.test_admin_ui import api, user_key
from tests.e2e.test_roles import fetch
from tests.fakes.lago import FakeLago, RunningLago, run_fake_lago
from tests.fakes.upstream import RunningUpstream
from tests.support import PostgresForTests, RunningServer, run_server

ADMIN = {"Authorization": f"Bearer {MASTER_KEY}"}


@pytest.fixture(scope="module")
def lago() -> Iterator[RunningLago]:
    with run_fake_lago(FakeLago()) as running:
        yield running


@pytest.fixture(scope="module")
def server(postgres: PostgresForTests, upstream: RunningUpstream, lago: RunningLago) -> Iterator[RunningServer]:
    """A server with Lago on: ingested usage goes to Lago as proxied usage does."""
    url = postgres.new_database()
    with run_server(outbox_config(upstream.base_url, lago=True), url, env=lago_env(lago.base_url)) as running:
        yield running
    postgres.drop_database(url)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def record(**fields: Any) -> dict[str, Any]:
    return {
        "call_id": unique("sdk-call"),
        "model": "fake-openai-endpoint",
        "usage": {"prompt_tokens": 1200, "completion_tokens": 345, "total_tokens": 1545},
        "user": "sdk-customer",
        **fields,
    }


def send(server: RunningServer, records: list[dict[str, Any]], key: str = MASTER_KEY) -> httpx.Response:
    return httpx.post(f"{server.base_url}/usage", json={"records": records},
                      headers={"Authorization": f"Bearer {key}"}, timeout=30)


def results(answer: httpx.Response) -> list[dict[str, Any]]:
    assert answer.status_code == 200, answer.text
    found: list[dict[str, Any]] = answer.json()["results"]
    return found


EXPECTED = Decimal(INPUT_PRICE) * 1200 + Decimal(OUTPUT_PRICE) * 345


def test_each_record_is_one_usage_event_and_one_lago_event_with_the_exact_cost(
    server: RunningServer, lago: RunningLago
) -> None:
    customer = unique("sdk-customer")
    sent = [record(user=customer) for _ in range(3)]
    answered = results(send(server, sent))
    assert [r["outcome"] for r in answered] == ["recorded"] * 3
    assert [r["call_id"] for r in answered] == [r["call_id"] for r in sent]
    assert all(Decimal(str(r["cost"])) == EXPECTED for r in answered)
    rows = fetch(server.database_url, "select data->>'customer_id' as customer, (data->>'cost')::numeric as cost, "
                 "metadata->>'source' as source, metadata->>'actor' as actor from events where type = 'UsageRecorded' "
                 "and data->>'call_id' = any($1::text[])", [r["call_id"] for r in sent])
    assert len(rows) == 3
    assert all(r["customer"] == customer and r["cost"] == EXPECTED and r["source"] == "ingest" for r in rows)
    assert all(r["actor"] == "master_key" for r in rows)
    info = httpx.get(f"{server.base_url}/customer/info", params={"end_user_id": customer}, headers=ADMIN).json()
    assert Decimal(str(info["spend"])) == EXPECTED * 3
    ids = {r["call_id"] for r in sent}
    assert wait_until(lambda: ids <= {tid for _, tid in dict(lago.app.accepted)}, 30)


def test_a_resend_is_a_duplicate_with_its_first_outcome_and_another_record_on_the_id_a_conflict(
    server: RunningServer,
) -> None:
    first = record(user=unique("dup-customer"))
    assert results(send(server, [first]))[0]["outcome"] == "recorded"
    again = results(send(server, [first, dict(first, usage={"prompt_tokens": 1, "completion_tokens": 1})]))
    assert again[0]["outcome"] == "duplicate" and Decimal(str(again[0]["cost"])) == EXPECTED
    assert again[1]["outcome"] == "error" and again[1]["error"]["code"] == "conflict"
    twice_in_one = record(user=unique("dup-customer"))
    both = results(send(server, [twice_in_one, twice_in_one]))
    assert [r["outcome"] for r in both] == ["recorded", "duplicate"]
    count = fetch(server.database_url, "select count(*) as n from events where data->>'call_id' = any($1::text[])",
                  [first["call_id"], twice_in_one["call_id"]])
    assert count[0]["n"] == 2


def test_senders_racing_with_the_same_records_bill_each_call_once(server: RunningServer) -> None:
    customer = unique("race-customer")
    batch = [record(user=customer) for _ in range(20)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(lambda _: send(server, batch), range(6)))
    outcomes = [r["outcome"] for answer in answers for r in results(answer)]
    assert outcomes.count("recorded") == 20 and outcomes.count("duplicate") == 100
    info = httpx.get(f"{server.base_url}/customer/info", params={"end_user_id": customer}, headers=ADMIN).json()
    assert Decimal(str(info["spend"])) == EXPECTED * 20


def test_a_bad_record_fails_alone(server: RunningServer) -> None:
    customer = unique("mixed-customer")
    good = record(user=customer)
    bad = [
        record(user=customer, model="no-such-model"),
        record(user=customer, usage={"prompt_tokens": -5, "completion_tokens": 1}),
        record(user=customer, usage={"prompt_tokens": 1.5, "completion_tokens": 1}),
        {"model": "fake-openai-endpoint", "user": customer},  # no call_id
        record(user=customer, end_time="2999-01-01T00:00:00Z"),
        record(user=customer, start_time="2026-12-07T12:00:00Z", end_time="2026-12-07T11:00:00Z"),
        record(user=customer, surprise=1),
        record(user=customer, metadata=_nested(70)),  # the one free-form field, nested too deep
    ]
    answered = results(send(server, [good, *bad]))
    assert answered[0]["outcome"] == "recorded"
    assert [r["outcome"] for r in answered[1:]] == ["error"] * len(bad)
    assert "neither a model group" in answered[1]["error"]["message"] and answered[1]["error"]["param"] == "model"
    assert answered[4]["call_id"] is None and answered[4]["error"]["param"] == "call_id"
    assert answered[2]["error"]["param"] == "usage.prompt_tokens" and answered[7]["error"]["param"] is None
    assert answered[8]["error"]["param"] == "metadata" and "levels deep" in answered[8]["error"]["message"]
    rows = fetch(server.database_url, "select count(*) as n from events where data->>'customer_id' = $1", customer)
    assert rows[0]["n"] == 1


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def test_a_model_outside_the_config_is_priced_from_the_catalogue(server: RunningServer) -> None:
    catalogued = [record(model="gpt-4o-mini"), record(model="anthropic/claude-3-5-sonnet-20241022")]
    answered = results(send(server, catalogued))
    assert [r["outcome"] for r in answered] == ["recorded", "recorded"]
    # genai-prices: gpt-4o-mini $0.15 / $0.60 per million tokens, Claude 3.5 Sonnet $3 / $15
    assert Decimal(str(answered[0]["cost"])) == Decimal("0.15") * 1200 / 10**6 + Decimal("0.60") * 345 / 10**6
    assert Decimal(str(answered[1]["cost"])) == Decimal(3) * 1200 / 10**6 + Decimal(15) * 345 / 10**6
    rows = fetch(server.database_url, "select data->>'deployment_id' as d, metadata->>'cost_source' as s from events "
                 "where data->>'call_id' = $1", catalogued[0]["call_id"])
    assert rows == [{"d": "catalogue:openai/gpt-4o-mini", "s": "catalogue"}]


def test_whole_requests_that_break_the_rules_are_refused_with_the_envelope(server: RunningServer) -> None:
    too_many = send(server, [record() for _ in range(1001)])
    assert too_many.status_code == 400 and too_many.json()["error"]["type"] == "invalid_request_error"
    assert send(server, []).status_code == 400
    for body in (b'{"records": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}", b'{"records": [{"call_id": }]}'):
        refused = httpx.post(f"{server.base_url}/usage", content=body, headers=ADMIN | {"Content-Type": "application/json"})
        assert refused.status_code == 400 and refused.json()["error"]["type"] == "invalid_request_error", refused.text
    assert httpx.post(f"{server.base_url}/usage", json={"records": [record()]}).status_code == 401
    viewer = user_key(server, "proxy_admin_viewer")
    assert send(server, [record()], key=viewer).status_code == 403  # a viewer reads; it never spends


def test_only_admins_send_a_cost_or_bill_another_users_scope(server: RunningServer) -> None:
    member = user_key(server, "internal_user")
    answered = results(send(server, [
        record(cost=0.5), record(user_id="someone-else"), record(team_id="another-team"), record(),
    ], key=member))
    assert [r["outcome"] for r in answered] == ["error", "error", "error", "recorded"]
    assert [r["error"]["param"] for r in answered[:3]] == ["cost", "user_id", "team_id"]
    by_admin = record(model="a-model-priced-elsewhere", cost="0.0011120000000000001")
    answered = results(send(server, [by_admin]))
    assert answered[0]["outcome"] == "recorded"
    row = fetch(server.database_url, "select data->>'cost' as cost, metadata->>'cost_source' as source "
                "from events where data->>'call_id' = $1", by_admin["call_id"])[0]
    assert row == {"cost": "0.0011120000000000001", "source": "caller"}


def test_a_key_pinned_to_customers_ingests_only_theirs(server: RunningServer) -> None:
    mine = unique("pinned")
    key = api(server, "/key/generate", {"allowed_customers": [mine]})["key"]
    answered = results(send(server, [record(user=mine), record(user=unique("not-mine")), record(user=None)], key=key))
    assert [r["outcome"] for r in answered] == ["recorded", "error", "recorded"]
    rows = fetch(server.database_url, "select data->>'customer_id' as c from events where data->>'call_id' = $1",
                 answered[2]["call_id"])
    assert rows == [{"c": mine}]  # naming nobody: billed to its one customer


# --- holds for calls made elsewhere: POST /usage/admit ------------------------------------------------

HOLD = Decimal(INPUT_PRICE) * 1000 + Decimal(OUTPUT_PRICE) * 500  # prompt_tokens 1000, max_tokens 500


def admit(server: RunningServer, key: str = MASTER_KEY, **fields: Any) -> httpx.Response:
    body = {"model": "fake-openai-endpoint", "prompt_tokens": 1000, "max_tokens": 500, **fields}
    return httpx.post(f"{server.base_url}/usage/admit", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def test_a_held_call_recorded_under_its_hold_id_releases_the_hold(server: RunningServer) -> None:
    customer = unique("held")
    api(server, "/customer/new", {"user_id": customer, "max_budget": "1"})  # a budget: something to hold
    answer = admit(server, user=customer)
    assert answer.status_code == 200, answer.text
    hold = answer.json()
    assert Decimal(str(hold["hold"])) == HOLD
    assert fetch(server.database_url, "select amount from holds where call_id = $1", hold["hold_id"]) == [{"amount": HOLD}]
    again = admit(server, user=customer, call_id=hold["hold_id"])
    assert again.status_code == 409 and again.json()["error"]["param"] == "call_id"
    used = {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100}
    done = results(send(server, [record(call_id=hold["hold_id"], hold_id=hold["hold_id"], user=customer, usage=used)]))
    assert done[0]["outcome"] == "recorded"
    assert fetch(server.database_url, "select 1 from holds where call_id = $1", hold["hold_id"]) == []
    mismatched = results(send(server, [record(hold_id="another-call", user=customer)]))
    assert mismatched[0]["outcome"] == "error" and mismatched[0]["error"]["param"] == "call_id"


def test_admit_refuses_as_the_proxy_does(server: RunningServer) -> None:
    blocked = unique("blocked-sdk")
    api(server, "/customer/new", {"user_id": blocked, "blocked": True})
    refused = admit(server, user=blocked)
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "customer_blocked"
    assert admit(server, user=unique("c"), model="no-such-model").status_code == 400
    no_prompt = httpx.post(f"{server.base_url}/usage/admit", headers=ADMIN, json={"model": "fake-openai-endpoint"})
    assert no_prompt.status_code == 400 and no_prompt.json()["error"]["param"] == "messages"
    assert admit(server, user=unique("c"), max_tokens=-1).status_code == 400


def test_admits_from_many_senders_over_two_processes_never_overspend_a_budget(
    postgres: PostgresForTests, upstream: RunningUpstream
) -> None:
    url = postgres.new_database()
    try:
        with run_server(outbox_config(upstream.base_url), url, workers=2) as two:
            customer = unique("tight")
            budget = HOLD * 4
            api(two, "/customer/new", {"user_id": customer, "max_budget": str(budget)})
            with ThreadPoolExecutor(max_workers=12) as pool:
                answers = list(pool.map(lambda _: admit(two, user=customer), range(24)))
            admitted = [a.json()["hold_id"] for a in answers if a.status_code == 200]
            refused = [a for a in answers if a.status_code != 200]
            assert 1 <= len(admitted) <= 4
            assert all(a.status_code == 429 and a.json()["error"]["type"] == "budget_exceeded" for a in refused)
            worst = {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}  # as much as held
            done = results(send(two, [record(call_id=c, hold_id=c, user=customer, usage=worst) for c in admitted]))
            assert [r["outcome"] for r in done] == ["recorded"] * len(admitted)
            info = httpx.get(f"{two.base_url}/customer/info", params={"end_user_id": customer}, headers=ADMIN).json()
            assert Decimal(str(info["spend"])) == HOLD * len(admitted) <= budget
    finally:
        postgres.drop_database(url)


def test_ingested_cost_counts_in_each_budgets_current_period(server: RunningServer) -> None:
    """The periods are computed once per duration and anchor class for a batch: each customer's
    own view (its period computed for it alone) must show the cost."""
    tier = unique("three-day")
    api(server, "/budget/new", {"budget_id": tier, "max_budget": 100, "budget_duration": "3d"})
    customers = [unique("periodic") for _ in range(3)]
    for customer in customers:
        api(server, "/customer/new", {"user_id": customer, "budget_id": tier})
    api(server, "/customer/new", {"user_id": customers[0] + "-own", "max_budget": "5", "budget_duration": "1mo"})
    answered = results(send(server, [record(user=c) for c in [*customers, customers[0] + "-own"]]))
    assert [r["outcome"] for r in answered] == ["recorded"] * 4
    for customer in [*customers, customers[0] + "-own"]:
        info = httpx.get(f"{server.base_url}/customer/info", params={"end_user_id": customer}, headers=ADMIN).json()
        assert Decimal(str(info["spend"])) == EXPECTED, customer
