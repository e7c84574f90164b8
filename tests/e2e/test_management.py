"""Budgets, teams and internal users end to end: LiteLLM's `/budget/*`, `/team/*` and `/user/*` routes.

Raw HTTP against a real `spendledger serve`; the database is read directly to check that every
change appended its event to the entity's stream (versions 1..n) and that a refused command
appended none.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import threading
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest

from tests.e2e.conftest import INPUT_PRICE, MASTER_KEY, OUTPUT_PRICE
from tests.fakes.upstream import REPLY_WORDS, prompt_tokens_for_messages
from tests.support import RunningServer

AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
MESSAGES = [{"role": "user", "content": "how much did this cost"}]
EXPECTED_COST = prompt_tokens_for_messages(MESSAGES) * Decimal(INPUT_PRICE) + REPLY_WORDS * Decimal(
    OUTPUT_PRICE
)

BUDGET_FIELDS = {
    "budget_id",
    "max_budget",
    "soft_budget",
    "rpm_limit",
    "tpm_limit",
    "max_parallel_requests",
    "budget_duration",
    "created_at",
    "updated_at",
}
LIMIT_FIELDS = {
    "max_budget",
    "soft_budget",
    "spend",
    "budget_duration",
    "budget_reset_at",
    "rpm_limit",
    "tpm_limit",
    "max_parallel_requests",
    "models",
    "metadata",
    "created_at",
    "updated_at",
}
TEAM_FIELDS = {"team_id", "team_alias", "blocked"} | LIMIT_FIELDS
USER_FIELDS = {"user_id", "user_email", "user_alias", "user_role"} | LIMIT_FIELDS


# --- helpers -----------------------------------------------------------------------------------------


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def fetch(database_url: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(database_url)
        try:
            return [dict(row) for row in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    return asyncio.run(run())


def event_count(server: RunningServer) -> int:
    return int(fetch(server.database_url, "select count(*) as n from events")[0]["n"])


def stream(server: RunningServer, name: str) -> list[tuple[int, str]]:
    rows = fetch(
        server.database_url, "select version, type from events where stream = $1 order by version", name
    )
    return [(row["version"], row["type"]) for row in rows]


def parse(response: httpx.Response) -> Any:
    return json.loads(response.text, parse_float=Decimal)


def post(server: RunningServer, path: str, body: Any = None, *, raw: str | None = None) -> httpx.Response:
    if raw is not None:
        return httpx.post(
            f"{server.base_url}{path}", headers={**AUTH, "Content-Type": "application/json"}, content=raw
        )
    return httpx.post(f"{server.base_url}{path}", headers=AUTH, json=body)


def get(server: RunningServer, path: str, **params: Any) -> httpx.Response:
    return httpx.get(f"{server.base_url}{path}", headers=AUTH, params=params)


def ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, (response.status_code, response.text)
    return parse(response)


def assert_error(response: httpx.Response, status: int, type_: str) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == type_, error
    assert isinstance(error["message"], str) and error["message"]
    return dict(error)


def chat(server: RunningServer, key: str, model: str = "fake-openai-endpoint") -> httpx.Response:
    return httpx.post(
        f"{server.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": model, "messages": MESSAGES},
    )


def generate_key(server: RunningServer, **fields: Any) -> str:
    key: str = ok(post(server, "/key/generate", fields))["key"]
    return key


@pytest.fixture(scope="module")
def existing(server: RunningServer) -> Iterator[dict[str, str]]:
    """A budget, a team and a user that the refused commands below name."""
    ids = {"budget": unique("tier"), "team": unique("team"), "user": unique("user")}
    ok(post(server, "/budget/new", {"budget_id": ids["budget"], "max_budget": 4}))
    ok(post(server, "/team/new", {"team_id": ids["team"], "max_budget": 5}))
    ok(post(server, "/user/new", {"user_id": ids["user"], "max_budget": 6}))
    yield ids


# --- budgets -----------------------------------------------------------------------------------------


def test_budget_new_info_update_list_delete(server: RunningServer) -> None:
    budget_id = unique("my-free-tier")
    raw = (
        f'{{"budget_id": "{budget_id}", "max_budget": 0.0000410, "soft_budget": 2.50, "rpm_limit": 2,'
        ' "tpm_limit": 1000, "max_parallel_requests": 3, "budget_duration": "30d"}'
    )
    created_response = post(server, "/budget/new", raw=raw)
    created = ok(created_response)
    assert set(created) == BUDGET_FIELDS
    assert created["budget_id"] == budget_id
    assert created["max_budget"] == Decimal("0.000041") and created["soft_budget"] == Decimal("2.5")
    assert '"max_budget":0.000041,' in created_response.text  # exact, significant digits only
    assert (created["rpm_limit"], created["tpm_limit"], created["max_parallel_requests"]) == (2, 1000, 3)
    assert created["budget_duration"] == "30d"
    assert created["created_at"] and created["updated_at"] == created["created_at"]

    assert ok(post(server, "/budget/info", {"budgets": [budget_id]})) == [created]

    updated = ok(
        post(server, "/budget/update", {"budget_id": budget_id, "max_budget": 10, "rpm_limit": None})
    )
    assert updated["max_budget"] == 10 and updated["rpm_limit"] is None
    # only the fields sent change
    assert updated["soft_budget"] == Decimal("2.5") and updated["tpm_limit"] == 1000
    assert updated["budget_duration"] == "30d" and updated["created_at"] == created["created_at"]
    assert updated["updated_at"] >= created["updated_at"]

    assert updated in ok(get(server, "/budget/list"))

    deleted = ok(post(server, "/budget/delete", {"id": budget_id}))
    assert deleted == updated
    assert_error(post(server, "/budget/info", {"budgets": [budget_id]}), 404, "not_found_error")
    assert all(b["budget_id"] != budget_id for b in ok(get(server, "/budget/list")))

    assert stream(server, f"budget:{budget_id}") == [
        (1, "BudgetDefined"),
        (2, "BudgetUpdated"),
        (3, "BudgetDeleted"),
    ]


def test_budget_id_is_generated_when_omitted(server: RunningServer) -> None:
    created = ok(post(server, "/budget/new", {"max_budget": 10, "rpm_limit": 2, "tpm_limit": 1000}))
    assert created["budget_id"].startswith("budget-")
    assert created["max_budget"] == 10 and created["soft_budget"] is None
    assert stream(server, f"budget:{created['budget_id']}") == [(1, "BudgetDefined")]


def test_budget_info_returns_every_budget_named_or_404(
    server: RunningServer, existing: dict[str, str]
) -> None:
    other = ok(post(server, "/budget/new", {"max_budget": 1}))["budget_id"]
    found = ok(post(server, "/budget/info", {"budgets": [other, existing["budget"]]}))
    assert [b["budget_id"] for b in found] == [other, existing["budget"]]
    error = assert_error(
        post(server, "/budget/info", {"budgets": [other, "no-such-tier"]}), 404, "not_found_error"
    )
    assert "no-such-tier" in error["message"]


def test_update_without_changes_writes_no_event(server: RunningServer, existing: dict[str, str]) -> None:
    before = event_count(server)
    assert ok(post(server, "/budget/update", {"budget_id": existing["budget"]}))["max_budget"] == 4
    assert ok(post(server, "/team/update", {"team_id": existing["team"]}))["data"]["max_budget"] == 5
    assert ok(post(server, "/user/update", {"user_id": existing["user"]}))["data"]["max_budget"] == 6
    assert event_count(server) == before


def test_a_budget_in_use_cannot_be_deleted(server: RunningServer) -> None:
    tier = ok(post(server, "/budget/new", {"budget_id": unique("my-free-tier"), "max_budget": 4}))[
        "budget_id"
    ]
    customer = unique("my-customer-id")
    info = ok(post(server, "/customer/new", {"user_id": customer, "budget_id": tier}))
    assert info["litellm_budget_table"]["budget_id"] == tier
    assert info["litellm_budget_table"]["max_budget"] == 4

    before = event_count(server)
    error = assert_error(post(server, "/budget/delete", {"id": tier}), 400, "invalid_request_error")
    assert tier in error["message"]
    assert event_count(server) == before
    assert ok(post(server, "/budget/info", {"budgets": [tier]}))[0]["budget_id"] == tier

    # once no customer uses it, it can go
    ok(post(server, "/customer/delete", {"user_ids": [customer]}))
    assert ok(post(server, "/budget/delete", {"id": tier}))["budget_id"] == tier


# --- refused commands: a 400/404 envelope and no event -------------------------------------------------


REFUSED_400: list[tuple[str, str, dict[str, Any] | str]] = [
    ("negative max_budget", "/budget/new", {"max_budget": -1}),
    ("NaN max_budget", "/budget/new", {"max_budget": "NaN"}),
    ("infinite max_budget", "/budget/new", {"max_budget": "Infinity"}),
    ("negative soft_budget", "/budget/new", {"soft_budget": -0.5}),
    ("bad budget_duration", "/budget/new", {"max_budget": 1, "budget_duration": "7x"}),
    ("zero budget_duration", "/budget/new", {"budget_duration": "0d"}),
    ("negative rpm_limit", "/budget/new", {"rpm_limit": -1}),
    ("wrong type", "/budget/new", {"rpm_limit": "many"}),
    ("empty budget_id", "/budget/new", {"budget_id": ""}),
    ("malformed JSON", "/budget/new", "{not json"),
    ("no budgets named", "/budget/info", {"budgets": []}),
    ("negative team max_budget", "/team/new", {"max_budget": -1}),
    ("NaN team max_budget", "/team/new", {"max_budget": "NaN"}),
    ("bad team budget_duration", "/team/new", {"budget_duration": "forever"}),
    ("team models not a list", "/team/new", {"models": "gpt-4"}),
    ("no teams named", "/team/delete", {"team_ids": []}),
    ("negative user max_budget", "/user/new", {"max_budget": -1}),
    ("NaN user max_budget", "/user/new", {"max_budget": "NaN"}),
    ("bad user budget_duration", "/user/new", {"budget_duration": "1 year"}),
    ("bad user_role", "/user/new", {"user_role": "overlord"}),
    ("bad key duration", "/user/new", {"duration": "soon"}),
    ("no users named", "/user/delete", {"user_ids": []}),
    (
        "customer with unknown tier",
        "/customer/new",
        {"user_id": "c-unknown-tier", "budget_id": "no-such-tier"},
    ),
]


@pytest.mark.parametrize(("case", "path", "body"), REFUSED_400, ids=[case for case, _, _ in REFUSED_400])
def test_invalid_commands_are_400_and_write_nothing(
    server: RunningServer, case: str, path: str, body: dict[str, Any] | str
) -> None:
    before = event_count(server)
    response = post(server, path, raw=body) if isinstance(body, str) else post(server, path, body)
    assert_error(response, 400, "invalid_request_error")
    assert event_count(server) == before, case


def test_customer_with_both_max_budget_and_budget_id_is_refused(
    server: RunningServer, existing: dict[str, str]
) -> None:
    customer = unique("both")
    before = event_count(server)
    error = assert_error(
        post(
            server, "/customer/new", {"user_id": customer, "max_budget": 1, "budget_id": existing["budget"]}
        ),
        400,
        "invalid_request_error",
    )
    assert error["message"] == "Set either 'max_budget' or 'budget_id', not both."
    assert event_count(server) == before
    assert_error(get(server, "/customer/info", end_user_id=customer), 404, "not_found_error")


def test_duplicate_ids_are_400_and_write_nothing(server: RunningServer, existing: dict[str, str]) -> None:
    before = event_count(server)
    for path, body, param in [
        ("/budget/new", {"budget_id": existing["budget"], "max_budget": 99}, "budget_id"),
        ("/team/new", {"team_id": existing["team"], "max_budget": 99}, "team_id"),
        ("/user/new", {"user_id": existing["user"], "max_budget": 99}, "user_id"),
    ]:
        error = assert_error(post(server, path, body), 400, "invalid_request_error")
        assert error["param"] == param and "already exists" in error["message"], error
    assert event_count(server) == before
    # nothing was overwritten
    assert ok(post(server, "/budget/info", {"budgets": [existing["budget"]]}))[0]["max_budget"] == 4
    assert ok(get(server, "/team/info", team_id=existing["team"]))["team_info"]["max_budget"] == 5
    assert ok(get(server, "/user/info", user_id=existing["user"]))["user_info"]["max_budget"] == 6


def test_invalid_updates_are_400_and_write_nothing(server: RunningServer, existing: dict[str, str]) -> None:
    before = event_count(server)
    for path, body in [
        ("/budget/update", {"budget_id": existing["budget"], "max_budget": -5}),
        ("/budget/update", {"budget_id": existing["budget"], "budget_duration": "1 fortnight"}),
        ("/team/update", {"team_id": existing["team"], "soft_budget": "NaN"}),
        ("/team/update", {"team_id": existing["team"], "blocked": None}),
        ("/user/update", {"user_id": existing["user"], "max_budget": -1}),
        ("/user/update", {"user_id": existing["user"], "user_role": "overlord"}),
    ]:
        assert_error(post(server, path, body), 400, "invalid_request_error")
    assert event_count(server) == before
    assert ok(post(server, "/budget/info", {"budgets": [existing["budget"]]}))[0]["max_budget"] == 4


def test_unknown_ids_are_404_and_write_nothing(server: RunningServer) -> None:
    before = event_count(server)
    responses = [
        post(server, "/budget/update", {"budget_id": "no-such-tier", "max_budget": 1}),
        post(server, "/budget/delete", {"id": "no-such-tier"}),
        post(server, "/team/update", {"team_id": "no-such-team", "max_budget": 1}),
        post(server, "/team/block", {"team_id": "no-such-team"}),
        post(server, "/team/delete", {"team_ids": ["no-such-team"]}),
        get(server, "/team/info", team_id="no-such-team"),
        post(server, "/user/update", {"user_id": "no-such-user", "max_budget": 1}),
        post(server, "/user/delete", {"user_ids": ["no-such-user"]}),
        get(server, "/user/info", user_id="no-such-user"),
    ]
    for response in responses:
        assert_error(response, 404, "not_found_error")
    assert event_count(server) == before


def test_delete_is_all_or_none(server: RunningServer, existing: dict[str, str]) -> None:
    before = event_count(server)
    assert_error(
        post(server, "/team/delete", {"team_ids": [existing["team"], "no-such-team"]}), 404, "not_found_error"
    )
    assert_error(
        post(server, "/user/delete", {"user_ids": [existing["user"], "no-such-user"]}), 404, "not_found_error"
    )
    assert event_count(server) == before
    ok(get(server, "/team/info", team_id=existing["team"]))
    ok(get(server, "/user/info", user_id=existing["user"]))


def test_management_routes_need_an_admin(server: RunningServer) -> None:
    key = generate_key(server)  # a key of no internal user: no management role (api/roles.py)
    for path in ["/budget/new", "/team/new", "/user/new"]:
        response = httpx.post(f"{server.base_url}{path}", headers={"Authorization": f"Bearer {key}"}, json={})
        assert_error(response, 403, "permission_denied")
    for path in ["/budget/list", "/team/list", "/user/list"]:
        assert_error(httpx.get(f"{server.base_url}{path}"), 401, "auth_error")


# --- teams -------------------------------------------------------------------------------------------


def test_team_new_update_block_list_delete(server: RunningServer) -> None:
    created = ok(
        post(
            server,
            "/team/new",
            {
                "team_alias": "core-infra",
                "max_budget": 12.5,
                "soft_budget": 10,
                "budget_duration": "1mo",
                "rpm_limit": 100,
                "tpm_limit": 10000,
                "max_parallel_requests": 4,
                "models": ["fake-openai-endpoint"],
                "metadata": {"cost_center": "42"},
            },
        )
    )
    assert set(created) == TEAM_FIELDS
    team_id = created["team_id"]
    assert str(uuid.UUID(team_id)) == team_id  # generated: a uuid4 string
    assert created["team_alias"] == "core-infra" and created["blocked"] is False
    assert created["max_budget"] == Decimal("12.5") and created["soft_budget"] == 10
    assert created["spend"] == 0 and created["budget_reset_at"] is not None
    assert created["budget_reset_at"] > created["created_at"]
    assert created["models"] == ["fake-openai-endpoint"] and created["metadata"] == {"cost_center": "42"}

    updated = ok(post(server, "/team/update", {"team_id": team_id, "max_budget": 20, "team_alias": "infra"}))
    assert updated["team_id"] == team_id
    data = updated["data"]
    assert data["max_budget"] == 20 and data["team_alias"] == "infra"
    assert data["rpm_limit"] == 100 and data["models"] == ["fake-openai-endpoint"]  # untouched

    assert ok(post(server, "/team/block", {"team_id": team_id}))["blocked"] is True
    assert ok(post(server, "/team/unblock", {"team_id": team_id}))["blocked"] is False

    listed = {t["team_id"]: t for t in ok(get(server, "/team/list"))}
    assert listed[team_id]["team_alias"] == "infra" and set(listed[team_id]) == TEAM_FIELDS

    info = ok(get(server, "/team/info", team_id=team_id))
    assert set(info) == {"team_id", "team_info", "keys"} and info["keys"] == []
    assert info["team_info"] == listed[team_id]

    assert ok(post(server, "/team/delete", {"team_ids": [team_id]})) == {"deleted_teams": [team_id]}
    assert_error(get(server, "/team/info", team_id=team_id), 404, "not_found_error")
    assert team_id not in {t["team_id"] for t in ok(get(server, "/team/list"))}

    assert stream(server, f"team:{team_id}") == [
        (1, "TeamCreated"),
        (2, "TeamUpdated"),
        (3, "TeamUpdated"),
        (4, "TeamUpdated"),
        (5, "TeamDeleted"),
    ]


@pytest.mark.parametrize("budgeted", [True, False], ids=["period-spend", "lifetime-spend"])
def test_a_team_keys_request_shows_in_the_team_spend_exactly(server: RunningServer, budgeted: bool) -> None:
    limits = {"max_budget": 10, "budget_duration": "30d"} if budgeted else {}
    team_id = ok(post(server, "/team/new", {"team_id": unique("team"), **limits}))["team_id"]
    key = generate_key(server, team_id=team_id)

    response = chat(server, key)
    assert response.status_code == 200, response.text
    assert Decimal(response.headers["x-litellm-response-cost"]) == EXPECTED_COST

    info_response = get(server, "/team/info", team_id=team_id)
    info = ok(info_response)
    assert info["team_info"]["spend"] == EXPECTED_COST
    assert isinstance(info["team_info"]["spend"], Decimal)
    assert f'"spend":{EXPECTED_COST.normalize()}' in info_response.text  # exact digits, as a JSON number
    assert (info["team_info"]["budget_reset_at"] is not None) is budgeted
    [team_key] = info["keys"]
    assert team_key["token"] == sha256(key) and team_key["team_id"] == team_id
    assert team_key["spend"] == EXPECTED_COST
    listed = {t["team_id"]: t for t in ok(get(server, "/team/list"))}
    assert listed[team_id]["spend"] == EXPECTED_COST

    assert chat(server, key).status_code == 200
    assert ok(get(server, "/team/info", team_id=team_id))["team_info"]["spend"] == 2 * EXPECTED_COST


def test_a_blocked_team_refuses_its_keys(server: RunningServer) -> None:
    team_id = ok(post(server, "/team/new", {"team_id": unique("team")}))["team_id"]
    key = generate_key(server, team_id=team_id)
    ok(post(server, "/team/block", {"team_id": team_id}))
    assert_error(chat(server, key), 401, "auth_error")
    ok(post(server, "/team/unblock", {"team_id": team_id}))
    assert chat(server, key).status_code == 200


def test_team_models_restrict_its_keys(server: RunningServer) -> None:
    team_id = ok(post(server, "/team/new", {"team_id": unique("team"), "models": ["fake-openai-endpoint"]}))[
        "team_id"
    ]
    key = generate_key(server, team_id=team_id)
    assert_error(chat(server, key, model="gpt-3.5-turbo"), 401, "key_model_access_denied")
    assert chat(server, key).status_code == 200


def test_a_team_over_its_budget_refuses_its_keys(server: RunningServer) -> None:
    team_id = ok(post(server, "/team/new", {"team_id": unique("team"), "max_budget": 0}))["team_id"]
    key = generate_key(server, team_id=team_id)
    response = chat(server, key)
    assert_error(response, 429, "budget_exceeded")
    assert ok(get(server, "/team/info", team_id=team_id))["team_info"]["spend"] == 0


def test_deleting_a_team_deletes_its_keys(server: RunningServer) -> None:
    team_id = ok(post(server, "/team/new", {"team_id": unique("team"), "max_budget": 1}))["team_id"]
    key = generate_key(server, team_id=team_id)
    assert chat(server, key).status_code == 200
    ok(post(server, "/team/delete", {"team_ids": [team_id]}))
    assert_error(chat(server, key), 401, "auth_error")
    assert [t for _, t in stream(server, f"key:{sha256(key)}")][-1] == "KeyDeleted"


# --- internal users ----------------------------------------------------------------------------------


def test_user_new_returns_the_user_and_a_key(server: RunningServer) -> None:
    user_id = unique("krrish")
    created = ok(
        post(
            server,
            "/user/new",
            {
                "user_id": user_id,
                "user_email": "krrish@berri.ai",
                "user_alias": "Krrish",
                "user_role": "internal_user",
                "max_budget": 3.25,
                "budget_duration": "7d",
                "rpm_limit": 10,
                "models": [],
                "metadata": {"team": "core-infra"},
            },
        )
    )
    assert set(created) >= USER_FIELDS
    assert created["user_id"] == user_id and created["user_email"] == "krrish@berri.ai"
    assert created["user_alias"] == "Krrish" and created["user_role"] == "internal_user"
    assert created["max_budget"] == Decimal("3.25") and created["spend"] == 0
    assert created["budget_reset_at"] is not None and created["metadata"] == {"team": "core-infra"}
    key = created["key"]
    assert isinstance(key, str) and key.startswith("sk-") and created["token"] == sha256(key)
    # only the hash is stored
    stored = fetch(server.database_url, "select key_hash, user_id from keys where user_id = $1", user_id)
    assert stored == [{"key_hash": sha256(key), "user_id": user_id}]

    response = chat(server, key)
    assert response.status_code == 200, response.text
    info_response = get(server, "/user/info", user_id=user_id)
    info = ok(info_response)
    assert key not in info_response.text  # the plaintext is shown once
    assert set(info) == {"user_id", "user_info", "keys"}
    assert info["user_id"] == user_id and info["user_info"]["spend"] == EXPECTED_COST
    [user_key] = info["keys"]
    assert user_key["token"] == sha256(key) and user_key["spend"] == EXPECTED_COST

    assert stream(server, f"user:{user_id}") == [(1, "UserCreated")]
    assert [t for _, t in stream(server, f"key:{sha256(key)}")] == ["KeyGenerated"]


def test_user_id_is_generated_and_the_key_is_optional(server: RunningServer) -> None:
    created = ok(post(server, "/user/new", {"auto_create_key": False}))
    assert str(uuid.UUID(created["user_id"])) == created["user_id"]
    assert created["key"] is None
    assert ok(get(server, "/user/info", user_id=created["user_id"]))["keys"] == []


def test_user_update_and_delete(server: RunningServer) -> None:
    user_id = ok(post(server, "/user/new", {"user_id": unique("user"), "max_budget": 1, "tpm_limit": 50}))[
        "user_id"
    ]
    key = generate_key(server, user_id=user_id)

    updated = ok(
        post(server, "/user/update", {"user_id": user_id, "max_budget": 2.5, "user_alias": "Ishaan"})
    )
    assert updated["user_id"] == user_id
    assert updated["data"]["max_budget"] == Decimal("2.5") and updated["data"]["user_alias"] == "Ishaan"
    assert updated["data"]["tpm_limit"] == 50  # untouched

    assert ok(post(server, "/user/delete", {"user_ids": [user_id]})) == {"deleted_users": [user_id]}
    assert_error(get(server, "/user/info", user_id=user_id), 404, "not_found_error")
    assert_error(chat(server, key), 401, "auth_error")  # its keys went with it

    assert stream(server, f"user:{user_id}") == [(1, "UserCreated"), (2, "UserUpdated"), (3, "UserDeleted")]


def test_user_list_paginates(server: RunningServer) -> None:
    ids = [
        ok(post(server, "/user/new", {"user_id": unique("page"), "user_role": "internal_user_viewer"}))[
            "user_id"
        ]
        for _ in range(3)
    ]
    first = ok(get(server, "/user/list", user_ids=",".join(ids), page_size=2))
    assert (first["total"], first["page"], first["page_size"], first["total_pages"]) == (3, 1, 2, 2)
    second = ok(get(server, "/user/list", user_ids=",".join(ids), page_size=2, page=2))
    assert second["page"] == 2 and len(second["users"]) == 1
    listed = [u["user_id"] for u in first["users"] + second["users"]]
    assert sorted(listed) == sorted(ids)
    assert all(set(u) >= USER_FIELDS for u in first["users"])
    everyone = ok(get(server, "/user/list", role="internal_user_viewer", page_size=100))
    assert set(ids) <= {u["user_id"] for u in everyone["users"]}
    assert_error(get(server, "/user/list", page_size=0), 400, "invalid_request_error")


def test_user_models_restrict_the_users_keys(server: RunningServer) -> None:
    created = ok(post(server, "/user/new", {"user_id": unique("user"), "models": ["fake-openai-endpoint"]}))
    other_key = generate_key(server, user_id=created["user_id"])  # a key of its own, no model list
    for key in (created["key"], other_key):
        error = assert_error(chat(server, key, model="gpt-3.5-turbo"), 401, "key_model_access_denied")
        assert error["param"] == "model"
        assert chat(server, key).status_code == 200


def test_two_updates_racing_on_one_stream_one_wins_the_other_gets_409(server: RunningServer) -> None:
    """Optimistic concurrency: both read version n and append n + 1; the loser writes nothing."""
    created = httpx.post(
        f"{server.base_url}/budget/new", headers=AUTH, json={"budget_id": "raced", "max_budget": 1}
    )
    assert created.status_code == 200
    barrier = threading.Barrier(8)

    def update(amount: int) -> int:
        barrier.wait()
        return httpx.post(
            f"{server.base_url}/budget/update",
            headers=AUTH,
            json={"budget_id": "raced", "max_budget": amount},
        ).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(update, range(2, 10)))
    assert set(statuses) <= {200, 409} and 200 in statuses
    rows = asyncio.run(
        _fetch(
            server.database_url,
            "select version from events where stream = $1 order by version",
            "budget:raced",
        )
    )
    versions = [row["version"] for row in rows]
    assert versions == list(range(1, len(versions) + 1))  # no gap, no duplicate
    assert len(versions) == 1 + statuses.count(200)


async def _fetch(database_url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()
