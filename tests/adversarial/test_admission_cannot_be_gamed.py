"""A hostile client against admission: every shape of request that cost more than its hold on
8e40733 now stays inside its budget, and the fields that got there are refused at the edge.

Each test fails on 8e40733: a negative `max_tokens` was admitted with a negative hold (and opened
the budget to everyone else); `n`, media parts, a reply longer than 4,096 tokens and a prompt list
all cost more than their hold, so concurrent requests overspent; a duplicated `model` reached the
provider unchecked; numbers, bytes and depth the proxy never looked at came back as 500s.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import INPUT_PRICE, MASTER_KEY, OUTPUT_PRICE
from tests.e2e.enforcement_support import query, wait_until
from tests.fakes.upstream import RunningUpstream, prompt_tokens_for_messages
from tests.support import PostgresForTests, RunningServer, run_server

AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
MESSAGES = [{"role": "user", "content": "what time is it"}]


def config(upstream_base_url: str) -> str:
    def model(name: str, upstream_model: str = "fake") -> str:
        return f"""
  - model_name: {name}
    litellm_params:
      model: openai/{upstream_model}
      api_key: upstream-secret-key
      api_base: {upstream_base_url}
    model_info:
      input_cost_per_token: {INPUT_PRICE}
      output_cost_per_token: {OUTPUT_PRICE}"""

    # "long-writer" is gpt-4 to the catalogue: an 8,192-token window, its only known output limit.
    return f"""
model_list:{model("priced")}{model("plain")}{model("long-writer", "gpt-4")}
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
def server(postgres: PostgresForTests, upstream: RunningUpstream) -> Iterator[RunningServer]:
    url = postgres.new_database()
    with run_server(config(upstream.base_url), url, env={"SPENDLEDGER_PROCESS_STALE_S": "2"}) as running:
        yield running
    postgres.drop_database(url)


def new_key(server: RunningServer, **fields: Any) -> str:
    response = httpx.post(f"{server.base_url}/key/generate", json=fields, headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    key: str = response.json()["key"]
    return key


def send(
    server: RunningServer,
    key: str,
    body: bytes | dict[str, Any],
    path: str = "/chat/completions",
    **headers: str,
) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{server.base_url}{path}",
        content=content,
        headers={"Authorization": f"Bearer {key}", "content-type": "application/json", **headers},
        timeout=60,
    )


def key_spend(server: RunningServer, key: str) -> Decimal:
    rows = query(
        server.database_url,
        "select spend from spend_totals where scope = 'key' and scope_id = "
        "encode(sha256(convert_to($1, 'utf8')), 'hex')",
        key,
    )
    return rows[0]["spend"] if rows else Decimal(0)


def held(server: RunningServer) -> Decimal:
    rows = query(server.database_url, "select coalesce(sum(amount), 0) as amount from holds")
    return Decimal(rows[0]["amount"])


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [-1_000_000, -1, 0])
def test_a_token_count_below_one_is_refused_before_anything_is_held(
    server: RunningServer, upstream: RunningUpstream, field: str, value: int
) -> None:
    response = send(server, MASTER_KEY, {"model": "priced", "messages": MESSAGES, field: value})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field
    assert upstream.app.requests == []


def test_a_negative_max_tokens_in_flight_does_not_open_a_budget(
    server: RunningServer, upstream: RunningUpstream
) -> None:
    """The probe: key max_budget 10 (here 20 requests' worth), one request with max_tokens
    -1,000,000 alongside 40 ordinary ones: on 8e40733 all 40 were served, 4× the budget."""
    one = prompt_tokens_for_messages(MESSAGES) * Decimal(INPUT_PRICE) + 12 * Decimal(OUTPUT_PRICE)
    budget = 20 * one
    key = new_key(server, max_budget=str(budget))
    upstream.app.delay_s = 0.3
    ordinary = {"model": "priced", "messages": MESSAGES, "max_tokens": 12}
    with ThreadPoolExecutor(max_workers=41) as pool:
        hostile = pool.submit(send, server, key, {**ordinary, "max_tokens": -1_000_000})
        answers = list(pool.map(lambda _: send(server, key, ordinary), range(40)))
    assert hostile.result().status_code == 400
    assert {r.status_code for r in answers} <= {200, 429}
    assert any(r.status_code == 429 for r in answers)
    assert key_spend(server, key) <= budget
    assert held(server) == 0


SHAPES = [
    # n=128: 128 × 12 reply tokens each, billed in full
    pytest.param(
        "priced", "/chat/completions", {"messages": MESSAGES, "max_tokens": 16, "n": 128}, {}, id="n"
    ),
    # 20 image parts, each 255 tokens at the provider; no model limit known: 4,096 held each
    pytest.param(
        "priced",
        "/chat/completions",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "describe"}]
                    + [
                        {"type": "image_url", "image_url": {"url": f"https://example.com/{i}.png"}}
                        for i in range(20)
                    ],
                }
            ],
            "max_tokens": 16,
        },
        {},
        id="images",
    ),
    # no max_tokens: the model writes 6,000 tokens, within its 8,192-token window (the catalogue's)
    pytest.param(
        "long-writer",
        "/chat/completions",
        {"messages": MESSAGES},
        {"reply_words": 6000, "context_window": 8192},
        id="no-max-tokens",
    ),
    # a list of 50 prompts, each answered (best_of: generated and billed 3 times)
    pytest.param(
        "priced",
        "/completions",
        {"prompt": [f"prompt {i}" for i in range(50)], "max_tokens": 12, "best_of": 3},
        {},
        id="prompt-list",
    ),
]


@pytest.mark.parametrize(("model", "path", "body", "fake"), SHAPES)
def test_requests_that_cost_more_than_they_look_stay_inside_the_budget(
    server: RunningServer,
    upstream: RunningUpstream,
    model: str,
    path: str,
    body: dict[str, Any],
    fake: dict[str, Any],
) -> None:
    for name, value in fake.items():
        setattr(upstream.app, name, value)
    upstream.app.delay_s = 0.2
    probe = send(server, MASTER_KEY, {"model": model, **body}, path)
    assert probe.status_code == 200, probe.text
    one = Decimal(probe.headers["x-litellm-response-cost"])
    # Room for four such requests (at least one worst case), and 20 arrive at once.
    budget = max(4 * one, hold_of(server, model, path, body) * Decimal("1.5"))
    key = new_key(server, max_budget=str(budget))
    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(lambda _: send(server, key, {"model": model, **body}, path), range(20)))
    assert {r.status_code for r in answers} <= {200, 429}, [
        r.text for r in answers if r.status_code not in (200, 429)
    ]
    assert any(r.status_code == 200 for r in answers)
    assert key_spend(server, key) <= budget
    assert held(server) == 0


def hold_of(server: RunningServer, model: str, path: str, body: dict[str, Any]) -> Decimal:
    """The hold of a request, as the refusal of a budget too small for it states it."""
    key = new_key(server, max_budget="0.000000001")
    refused = send(server, key, {"model": model, **body}, path)
    assert refused.status_code == 429, refused.text
    return Decimal(refused.json()["error"]["message"].rpartition("may cost up to ")[2])


def test_a_model_named_twice_is_refused_and_never_forwarded(
    server: RunningServer, upstream: RunningUpstream
) -> None:
    key = new_key(server, models=["plain"])
    compact = b'{"model":"long-writer","max_tokens":100000,"messages":[{"role":"user","content":"hi"}],"model":"plain","max_tokens":1}'
    spaced = b'{"model": "long-writer", "messages": [{"role": "user", "content": "hi"}],\n "model": "plain"}'
    for body in (compact, spaced):
        response = send(server, key, body)
        assert response.status_code == 400, response.text
        assert "more than once" in response.json()["error"]["message"]
    assert upstream.app.requests == []
    # A key that differs only by escapes is the same key to every JSON parser.
    escaped = b'{"model":"plain","mod\\u0065l":"long-writer","messages":[{"role":"user","content":"hi"}]}'
    assert send(server, key, escaped).status_code == 400


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            b'{"model":"mock-model","n":1e309,"messages":[{"role":"user","content":"hi"}]}', id="n-1e309"
        ),
        pytest.param(
            b'{"model":"mock-model","temperature":1e309,"messages":[{"role":"user","content":"hi"}]}',
            id="temperature-1e309",
        ),
        pytest.param(
            b'{"model":"mock-model","n":1.5,"messages":[{"role":"user","content":"hi"}]}', id="n-fraction"
        ),
        pytest.param(
            b'{"model":"mock-model","n":129,"messages":[{"role":"user","content":"hi"}]}', id="n-129"
        ),
        pytest.param(
            b'{"model":"priced","messages":[{"role":"user","content":"hi \xff\xfe"}]}', id="invalid-utf8"
        ),
        pytest.param(
            b'{"model":"priced","messages":[{"role":"user","content":"hi"}],"metadata":'
            + b"[" * 1000
            + b"]" * 1000
            + b"}",
            id="nested-1000",
        ),
        pytest.param(
            b'{"model":"priced","messages":[{"role":"user","content":"hi"}],"user":"' + b"a" * 3000 + b'"}',
            id="user-3000",
        ),
        pytest.param(
            b'{"model":"priced","messages":[{"role":"user","content":"hi"}],"user":"evil\\r\\nX-Injected: yes"}',
            id="user-crlf",
        ),
        pytest.param(b'{"model":"priced","messages":"hi"}', id="messages-not-a-list"),
    ],
)
def test_bad_fields_are_a_400_before_anything_is_sent(
    server: RunningServer, upstream: RunningUpstream, body: bytes
) -> None:
    response = send(server, MASTER_KEY, body)
    assert response.status_code == 400, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert upstream.app.requests == []


def test_a_customer_header_that_is_no_id_is_refused(server: RunningServer, upstream: RunningUpstream) -> None:
    body = {"model": "priced", "messages": MESSAGES}
    response = send(server, MASTER_KEY, body, **{"x-litellm-customer-id": "c" * 300})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "x-litellm-customer-id"
    assert upstream.app.requests == []


def test_a_stream_without_usage_is_billed_from_its_text(
    server: RunningServer, upstream: RunningUpstream
) -> None:
    """The provider ignores include_usage and sends ten words a chunk: 8e40733 billed one token per
    chunk (6 for 50 words); the text's bytes say at least the words it carried."""
    upstream.app.ignores_include_usage, upstream.app.words_per_chunk, upstream.app.reply_words = True, 10, 50
    customer = "stream-without-usage"
    body = {"model": "priced", "messages": MESSAGES, "stream": True, "user": customer}
    with httpx.stream(
        "POST", f"{server.base_url}/chat/completions", json=body, headers=AUTH, timeout=30
    ) as response:
        assert response.status_code == 200
        text = "".join(response.iter_text())
    assert "[DONE]" in text
    (event,) = query(
        server.database_url,
        "select data from events where type = 'UsageRecorded' and data->>'customer_id' = $1",
        customer,
    )
    data = json.loads(event["data"])
    assert data["usage_estimated"] is True
    assert data["output_tokens"] >= 50


def test_a_providers_error_never_shows_the_caller_our_key(
    server: RunningServer, upstream: RunningUpstream
) -> None:
    upstream.app.fail_status, upstream.app.echo_headers_in_errors = 400, True
    response = send(server, MASTER_KEY, {"model": "priced", "messages": MESSAGES})
    assert response.status_code == 400
    assert "upstream-secret-key" not in response.text
    assert "[redacted]" in response.json()["error"]["message"]
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_a_request_that_costs_more_than_its_hold_is_billed_in_full_and_flagged(
    server: RunningServer, upstream: RunningUpstream
) -> None:
    """A provider that reports more than it could have generated (a bug): the usage is recorded
    whole, `HoldExceeded` says by how much, and the budget's held total is not robbed."""
    upstream.app.overbill_tokens = 10_000
    customer = "overbilled"
    created = httpx.post(
        f"{server.base_url}/customer/new",
        json={"user_id": customer, "max_budget": 1},
        headers=AUTH,
        timeout=30,
    )
    assert created.status_code == 200
    response = send(
        server, MASTER_KEY, {"model": "priced", "messages": MESSAGES, "max_tokens": 12, "user": customer}
    )
    assert response.status_code == 200
    cost = Decimal(response.headers["x-litellm-response-cost"])
    assert cost == prompt_tokens_for_messages(MESSAGES) * Decimal(INPUT_PRICE) + (12 + 10_000) * Decimal(
        OUTPUT_PRICE
    )

    def flagged() -> list[Any]:
        return query(
            server.database_url,
            "select data from events where type = 'HoldExceeded' and data->>'customer_id' = $1",
            customer,
        )

    assert wait_until(lambda: bool(flagged()), timeout_s=10)
    flag = json.loads(flagged()[0]["data"])
    assert Decimal(str(flag["cost"])) == cost and Decimal(str(flag["excess"])) == cost - Decimal(
        str(flag["hold"])
    )
    (row,) = query(
        server.database_url,
        "select spent, held from budget_usage where scope = 'customer' and scope_id = $1",
        customer,
    )
    assert row["spent"] == cost
    assert held(server) >= 0 and row["held"] == held_on(server, customer)


def held_on(server: RunningServer, customer: str) -> Decimal:
    """What holds and leases still hold on the customer's budget (a lease may sit on some)."""
    rows = query(
        server.database_url,
        "select coalesce(sum(amount), 0) as amount from holds, jsonb_array_elements(budget_rows) r "
        "where r->>0 = 'customer' and r->>1 = $1",
        customer,
    )
    return Decimal(rows[0]["amount"])


@pytest.fixture(scope="module")
def strict_server(postgres: PostgresForTests, upstream: RunningUpstream) -> Iterator[RunningServer]:
    url = postgres.new_database()
    with run_server(config(upstream.base_url) + "  reject_unbounded_requests: true\n", url) as running:
        yield running
    postgres.drop_database(url)


IMAGE = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}


@pytest.mark.parametrize(
    ("body", "status"),
    [
        pytest.param({"model": "priced", "messages": MESSAGES}, 400, id="no-max-tokens-no-limit"),
        pytest.param({"model": "priced", "messages": MESSAGES, "max_tokens": 12}, 200, id="max-tokens"),
        pytest.param({"model": "long-writer", "messages": MESSAGES}, 200, id="the-models-limit"),
        pytest.param({"model": "priced", "messages": [IMAGE], "max_tokens": 12}, 400, id="image-no-input-limit"),
    ],
)
def test_reject_unbounded_requests_refuses_what_the_hold_could_only_assume(
    strict_server: RunningServer, body: dict[str, Any], status: int
) -> None:
    response = send(strict_server, MASTER_KEY, body)
    assert response.status_code == status, response.text
    if status == 400:
        assert response.json()["error"]["code"] == "unbounded_request"
