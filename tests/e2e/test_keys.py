"""Virtual keys end to end: the seed's `/key/generate` flow and LiteLLM's key management routes.

Raw HTTP against a real `spendledger serve`; the database is read directly to check what is stored
(hashes only) and that every management change appended its event to the key's stream.
"""

from __future__ import annotations

import asyncio
import hashlib
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

from tests.e2e.conftest import INPUT_PRICE, MASTER_KEY, OUTPUT_PRICE, proxy_config
from tests.fakes.upstream import REPLY_WORDS, RunningUpstream, prompt_tokens_for_messages
from tests.support import PostgresForTests, RunningServer, run_server

AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
MESSAGES = [{"role": "user", "content": "what llm are you"}]
EXPECTED_COST = prompt_tokens_for_messages(MESSAGES) * Decimal(INPUT_PRICE) + REPLY_WORDS * Decimal(
    OUTPUT_PRICE
)


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


def event_count(database_url: str) -> int:
    return int(fetch(database_url, "select count(*) as n from events")[0]["n"])


def key_events(database_url: str, key_hash: str) -> list[dict[str, Any]]:
    rows = fetch(
        database_url,
        "select version, type, data::text as data, metadata::text as metadata from events "
        "where stream = $1 order by version",
        f"key:{key_hash}",
    )
    for row in rows:
        row["data"] = json.loads(row["data"], parse_float=Decimal)
        row["metadata"] = json.loads(row["metadata"])
    return rows


def usage_events(database_url: str, key_hash: str) -> list[dict[str, Any]]:
    rows = fetch(
        database_url,
        "select data::text as data from events where type = 'UsageRecorded' and data->>'key_hash' = $1 "
        "order by position",
        key_hash,
    )
    return [json.loads(row["data"], parse_float=Decimal) for row in rows]


def generate(server: RunningServer, **fields: Any) -> dict[str, Any]:
    response = httpx.post(f"{server.base_url}/key/generate", headers=AUTH, json=fields)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = json.loads(response.text, parse_float=Decimal)
    return body


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(
    server: RunningServer, key: str, model: str = "fake-openai-endpoint", **extra: Any
) -> httpx.Response:
    return httpx.post(
        f"{server.base_url}/chat/completions",
        headers=bearer(key),
        json={"model": model, "messages": MESSAGES, **extra},
    )


def key_info(server: RunningServer, key: str) -> dict[str, Any]:
    response = httpx.get(f"{server.base_url}/key/info", headers=AUTH, params={"key": key})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = json.loads(response.text, parse_float=Decimal)
    return body


def manage(server: RunningServer, action: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.base_url}/key/{action}", headers=AUTH, json=body)


def assert_error(response: httpx.Response, status: int, type_: str) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == type_, error
    return dict(error)


# --- the seed's flow -------------------------------------------------------------------------------------


def test_seed_flow_key_for_an_internal_user_is_billed_exactly(server: RunningServer) -> None:
    created = generate(server, user_id="my-unique-id")
    key = created["key"]
    assert isinstance(key, str) and key.startswith("sk-") and len(key) > 20
    assert created["user_id"] == "my-unique-id"
    assert created["token"] == sha256(key)

    response = chat(server, key)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]
    assert Decimal(response.headers["x-litellm-response-cost"]) == EXPECTED_COST
    assert Decimal(response.headers["x-litellm-key-spend"]) == EXPECTED_COST

    info = key_info(server, key)
    assert info["key"] == key
    assert info["info"]["spend"] == EXPECTED_COST
    assert isinstance(info["info"]["spend"], Decimal)  # a JSON number with exact digits
    assert info["info"]["user_id"] == "my-unique-id"
    assert info["info"]["token"] == sha256(key)

    # a second request: the spend is the exact sum, no float drift
    assert chat(server, key).status_code == 200
    assert key_info(server, key)["info"]["spend"] == 2 * EXPECTED_COST

    (usage, _) = usage_events(server.database_url, sha256(key))
    assert usage["user_id"] == "my-unique-id" and usage["team_id"] is None
    assert usage["cost"] == EXPECTED_COST


def test_a_key_may_read_its_own_info_only(server: RunningServer) -> None:
    mine = generate(server, user_id=unique("own-info"))["key"]
    other = generate(server, user_id=unique("other-info"))["key"]
    own = httpx.get(f"{server.base_url}/key/info", headers=bearer(mine))
    assert own.status_code == 200, own.text
    assert own.json()["info"]["token"] == sha256(mine)
    assert "key" in own.json()
    refused = httpx.get(f"{server.base_url}/key/info", headers=bearer(mine), params={"key": other})
    assert_error(refused, 403, "permission_denied")


def test_only_the_hash_of_a_key_is_stored(server: RunningServer) -> None:
    key = generate(server, user_id=unique("hash-only"), key_alias=unique("hash-alias"))["key"]
    assert chat(server, key, user=unique("hash-customer")).status_code == 200
    assert manage(server, "update", {"key": key, "metadata": {"note": "x"}}).status_code == 200

    rows = fetch(server.database_url, "select key_hash, key_name from keys where key_hash = $1", sha256(key))
    assert len(rows) == 1
    assert rows[0]["key_name"] != key and len(rows[0]["key_name"]) < 12
    # The plaintext appears in no column of any table, events (data and metadata) included.
    tables = fetch(
        server.database_url,
        "select table_name from information_schema.tables where table_schema = 'public' and table_type = 'BASE TABLE'",
    )
    names = {row["table_name"] for row in tables}
    assert {"events", "keys"} <= names
    for name in sorted(names):
        found = fetch(
            server.database_url, f'select count(*) as n from "{name}" t where t::text like $1', f"%{key}%"
        )
        assert found[0]["n"] == 0, f"the plaintext key is stored in table {name}"
    secret_part = key.removeprefix("sk-")
    for name in sorted(names):
        found = fetch(
            server.database_url,
            f'select count(*) as n from "{name}" t where t::text like $1',
            f"%{secret_part}%",
        )
        assert found[0]["n"] == 0, f"the key's secret part is stored in table {name}"
    assert key not in server.log() and secret_part not in server.log()


def test_a_custom_key_is_accepted_and_hashed(server: RunningServer) -> None:
    custom = "sk-" + uuid.uuid4().hex
    created = generate(server, key=custom, user_id=unique("custom"))
    assert created["key"] == custom and created["token"] == sha256(custom)
    assert chat(server, custom).status_code == 200
    again = httpx.post(f"{server.base_url}/key/generate", headers=AUTH, json={"key": custom})
    assert_error(again, 400, "invalid_request_error")


# --- model access ------------------------------------------------------------------------------------------


def test_a_key_limited_to_models_is_refused_others(server: RunningServer, upstream: RunningUpstream) -> None:
    key = generate(server, models=["fake-openai-endpoint"], user_id=unique("models"))["key"]
    before = event_count(server.database_url)
    refused = chat(server, key, model="gpt-3.5-turbo")
    error = assert_error(refused, 401, "key_model_access_denied")
    assert "gpt-3.5-turbo" in error["message"]
    assert upstream.app.requests == []
    assert event_count(server.database_url) == before
    assert chat(server, key).status_code == 200

    for path in ("/v1/models", "/models"):
        listing = httpx.get(f"{server.base_url}{path}", headers=bearer(key))
        assert listing.status_code == 200, listing.text
        assert [m["id"] for m in listing.json()["data"]] == ["fake-openai-endpoint"]
    everything = httpx.get(f"{server.base_url}/v1/models", headers=AUTH).json()["data"]
    assert {m["id"] for m in everything} >= {"fake-openai-endpoint", "gpt-3.5-turbo", "mock-model"}


# --- update ------------------------------------------------------------------------------------------------


def test_update_changes_only_the_fields_sent(server: RunningServer) -> None:
    user = unique("update")
    created = generate(
        server,
        user_id=user,
        models=["fake-openai-endpoint"],
        metadata={"tier": "gold"},
        max_budget="10",
        rpm_limit=100,
    )
    key, key_hash = created["key"], created["token"]

    response = manage(server, "update", {"key": key, "models": ["fake-openai-endpoint", "gpt-3.5-turbo"]})
    assert response.status_code == 200, response.text
    info = key_info(server, key)["info"]
    assert info["models"] == ["fake-openai-endpoint", "gpt-3.5-turbo"]
    assert info["metadata"] == {"tier": "gold"} and info["max_budget"] == Decimal(10)
    assert info["rpm_limit"] == 100 and info["user_id"] == user
    assert chat(server, key, model="gpt-3.5-turbo").status_code == 200  # takes effect at once

    # by its hash (as /key/list shows it), and a budget with many decimal places kept exactly
    response = manage(server, "update", {"key": key_hash, "metadata": {"tier": "silver", "n": 2}})
    assert response.status_code == 200, response.text
    response = manage(server, "update", {"key": key, "max_budget": "0.000000123456789"})
    assert response.status_code == 200, response.text
    info = key_info(server, key)["info"]
    assert info["metadata"] == {"tier": "silver", "n": 2}
    assert info["max_budget"] == Decimal("0.000000123456789")
    assert info["models"] == ["fake-openai-endpoint", "gpt-3.5-turbo"]
    assert info["rpm_limit"] == 100 and info["user_id"] == user

    # an explicit null clears a field; absent fields stay
    response = manage(server, "update", {"key": key, "max_budget": None})
    assert response.status_code == 200, response.text
    info = key_info(server, key)["info"]
    assert info["max_budget"] is None and info["rpm_limit"] == 100

    # the KeyUpdated events carry exactly the fields that were sent
    updates = [e["data"] for e in key_events(server.database_url, key_hash) if e["type"] == "KeyUpdated"]
    assert [set(u) - {"type", "key_hash"} for u in updates] == [
        {"models"},
        {"metadata"},
        {"max_budget"},
        {"max_budget"},
    ]
    assert updates[2]["max_budget"] == Decimal("0.000000123456789")
    assert updates[3]["max_budget"] is None


def test_update_of_models_narrows_access_at_once(server: RunningServer) -> None:
    key = generate(server, user_id=unique("narrow"))["key"]
    assert chat(server, key, model="gpt-3.5-turbo").status_code == 200
    assert manage(server, "update", {"key": key, "models": ["fake-openai-endpoint"]}).status_code == 200
    assert_error(chat(server, key, model="gpt-3.5-turbo"), 401, "key_model_access_denied")


# --- block, unblock, delete, expiry -----------------------------------------------------------------------


def test_block_and_unblock_take_effect_immediately(server: RunningServer) -> None:
    key = generate(server, user_id=unique("block"))["key"]
    assert chat(server, key).status_code == 200  # now cached by the server
    for _ in range(5):
        blocked = manage(server, "block", {"key": key})
        assert blocked.status_code == 200 and blocked.json()["blocked"] is True, blocked.text
        assert_error(chat(server, key), 401, "auth_error")
        assert_error(httpx.get(f"{server.base_url}/v1/models", headers=bearer(key)), 401, "auth_error")
        assert key_info(server, key)["info"]["blocked"] is True
        unblocked = manage(server, "unblock", {"key": key})
        assert unblocked.status_code == 200 and unblocked.json()["blocked"] is False, unblocked.text
        assert chat(server, key).status_code == 200
    assert key_info(server, key)["info"]["spend"] == 6 * EXPECTED_COST


@pytest.fixture(scope="module")
def two_worker_server(postgres: PostgresForTests, upstream: RunningUpstream) -> Iterator[RunningServer]:
    url = postgres.new_database()
    with run_server(proxy_config(upstream.base_url), url, workers=2) as running:
        yield running
    postgres.drop_database(url)


def test_block_reaches_every_worker_immediately(two_worker_server: RunningServer) -> None:
    """Each worker caches keys; the NOTIFY sent by the block must reach all of them before we ask."""
    server = two_worker_server
    key = generate(server, user_id=unique("workers"))["key"]

    def statuses(n: int = 12) -> list[int]:
        # a fresh connection each time, so requests land on both workers
        return [httpx.get(f"{server.base_url}/v1/models", headers=bearer(key)).status_code for _ in range(n)]

    for _ in range(3):
        assert set(statuses()) == {200}  # every worker has the key cached
        assert manage(server, "block", {"key": key}).status_code == 200
        assert set(statuses()) == {401}
        assert manage(server, "unblock", {"key": key}).status_code == 200
        assert set(statuses()) == {200}
    assert manage(server, "delete", {"keys": [key]}).status_code == 200
    assert set(statuses()) == {401}


def test_delete_refuses_the_key_afterwards(server: RunningServer) -> None:
    key = generate(server, user_id=unique("delete"))["key"]
    assert chat(server, key).status_code == 200
    response = manage(server, "delete", {"keys": [key]})
    assert response.status_code == 200, response.text
    assert response.json()["deleted_keys"] == [key]
    error = assert_error(chat(server, key), 401, "auth_error")
    assert key not in error["message"]
    info = httpx.get(f"{server.base_url}/key/info", headers=AUTH, params={"key": key})
    assert info.status_code == 404
    assert fetch(server.database_url, "select 1 from keys where key_hash = $1", sha256(key)) == []
    # deleting again: the key is unknown now
    assert manage(server, "delete", {"keys": [key]}).status_code == 404
    # the spend it made stays in the ledger
    assert len(usage_events(server.database_url, sha256(key))) == 1


def test_delete_by_alias_and_all_or_none(server: RunningServer) -> None:
    alias = unique("del-alias")
    first = generate(server, key_alias=alias)["key"]
    second = generate(server, user_id=unique("del-second"))["key"]
    # one unknown key refuses the whole command
    partly = manage(server, "delete", {"keys": [second, "sk-unknown-key"]})
    assert_error(partly, 404, "not_found_error")
    assert chat(server, second).status_code == 200
    response = manage(server, "delete", {"key_aliases": [alias], "keys": [second]})
    assert response.status_code == 200, response.text
    assert chat(server, first).status_code == 401 and chat(server, second).status_code == 401


def test_a_key_expires_after_its_duration(server: RunningServer) -> None:
    created = generate(server, user_id=unique("expiry"), duration="2s")
    key = created["key"]
    expires = datetime.fromisoformat(created["expires"])
    assert expires.tzinfo is not None
    assert 0 < (expires - datetime.now(UTC)).total_seconds() <= 2.5
    assert chat(server, key).status_code == 200
    time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.3)
    error = assert_error(chat(server, key), 401, "auth_error")
    assert "expired" in error["message"]
    assert_error(httpx.get(f"{server.base_url}/v1/models", headers=bearer(key)), 401, "auth_error")


def test_one_second_key_is_refused_after_it_expires(server: RunningServer) -> None:
    created = generate(server, user_id=unique("expiry-1s"), duration="1s")
    time.sleep(1.3)
    assert_error(chat(server, created["key"]), 401, "auth_error")


def test_update_duration_extends_an_expired_key(server: RunningServer) -> None:
    created = generate(server, user_id=unique("extend"), duration="1s")
    key = created["key"]
    time.sleep(1.3)
    assert chat(server, key).status_code == 401
    assert manage(server, "update", {"key": key, "duration": "1h"}).status_code == 200
    assert chat(server, key).status_code == 200
    assert manage(server, "update", {"key": key, "duration": None}).status_code == 200
    assert key_info(server, key)["info"]["expires"] is None


# --- list ----------------------------------------------------------------------------------------------------


def test_list_paginates_and_filters(server: RunningServer) -> None:
    user, other_user, team = unique("lister"), unique("other-lister"), unique("list-team")
    mine = [generate(server, user_id=user)["token"] for _ in range(5)]
    generate(server, user_id=other_user)
    team_keys = [generate(server, team_id=team)["token"] for _ in range(2)]

    seen: list[str] = []
    for page in (1, 2, 3):
        response = httpx.get(
            f"{server.base_url}/key/list", headers=AUTH, params={"user_id": user, "page": page, "size": 2}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["total_count"] == 5 and body["total_pages"] == 3 and body["current_page"] == page
        assert len(body["keys"]) == (2 if page < 3 else 1)
        seen += body["keys"]
    assert sorted(seen) == sorted(mine) and len(set(seen)) == 5
    assert all(isinstance(h, str) and len(h) == 64 for h in seen)  # hashes, never plaintext

    beyond = httpx.get(
        f"{server.base_url}/key/list", headers=AUTH, params={"user_id": user, "page": 4, "size": 2}
    )
    assert beyond.status_code == 200 and beyond.json()["keys"] == []

    full = httpx.get(
        f"{server.base_url}/key/list", headers=AUTH, params={"user_id": user, "return_full_object": "true"}
    )
    assert full.status_code == 200, full.text
    objects = full.json()["keys"]
    assert {o["token"] for o in objects} == set(mine)
    assert all(o["user_id"] == user and "key" not in o for o in objects)

    by_team = httpx.get(f"{server.base_url}/key/list", headers=AUTH, params={"team_id": team}).json()
    assert sorted(by_team["keys"]) == sorted(team_keys) and by_team["total_count"] == 2

    nobody = httpx.get(
        f"{server.base_url}/key/list", headers=AUTH, params={"user_id": unique("nobody")}
    ).json()
    assert nobody["keys"] == [] and nobody["total_count"] == 0


# --- who may manage keys -----------------------------------------------------------------------------------


def test_a_generated_key_cannot_manage_keys(server: RunningServer) -> None:
    key = generate(server, user_id=unique("not-admin"))["key"]
    other = generate(server, user_id=unique("victim"))["key"]
    before = event_count(server.database_url)
    for path, body in (
        ("/key/generate", {"user_id": "escalate"}),
        ("/key/update", {"key": other, "models": []}),
        ("/key/block", {"key": other}),
        ("/key/unblock", {"key": key}),
        ("/key/delete", {"keys": [other]}),
    ):
        response = httpx.post(f"{server.base_url}{path}", headers=bearer(key), json=body)
        assert_error(response, 403, "permission_denied")  # its user_id names no internal user: no role
    assert_error(httpx.get(f"{server.base_url}/key/list", headers=bearer(key)), 403, "permission_denied")
    assert event_count(server.database_url) == before
    assert chat(server, other).status_code == 200


def test_duplicate_key_alias_is_400_and_writes_nothing(server: RunningServer) -> None:
    alias = unique("alias")
    first = generate(server, key_alias=alias)
    before = event_count(server.database_url)
    duplicate = httpx.post(f"{server.base_url}/key/generate", headers=AUTH, json={"key_alias": alias})
    error = assert_error(duplicate, 400, "invalid_request_error")
    assert error["param"] == "key_alias"
    assert event_count(server.database_url) == before

    second = generate(server, key_alias=unique("alias"))
    before = event_count(server.database_url)
    clash = manage(server, "update", {"key": second["key"], "key_alias": alias})
    assert_error(clash, 400, "invalid_request_error")
    assert event_count(server.database_url) == before
    assert key_info(server, first["key"])["info"]["key_alias"] == alias
    assert key_info(server, second["key"])["info"]["key_alias"] != alias


# --- attribution and the event streams ---------------------------------------------------------------------


def test_team_and_user_keys_are_recorded_on_the_usage(server: RunningServer) -> None:
    team, user, alias = unique("team"), unique("user"), unique("team-alias")
    team_key = generate(server, team_id=team, key_alias=alias)
    user_key = generate(server, user_id=user)
    both_key = generate(server, user_id=user, team_id=team)
    customer = unique("customer")
    for created in (team_key, user_key, both_key):
        assert chat(server, created["key"], user=customer).status_code == 200

    (team_usage,) = usage_events(server.database_url, team_key["token"])
    assert team_usage["team_id"] == team and team_usage["user_id"] is None
    assert team_usage["key_alias"] == alias and team_usage["customer_id"] == customer
    (user_usage,) = usage_events(server.database_url, user_key["token"])
    assert user_usage["user_id"] == user and user_usage["team_id"] is None
    (both_usage,) = usage_events(server.database_url, both_key["token"])
    assert both_usage["user_id"] == user and both_usage["team_id"] == team
    for usage in (team_usage, user_usage, both_usage):
        assert usage["cost"] == EXPECTED_COST and usage["status"] == "success"

    totals = {
        (row["scope"], row["scope_id"]): row["spend"]
        for row in fetch(
            server.database_url,
            "select scope, scope_id, spend from spend_totals where scope_id = any($1::text[])",
            [team, user],
        )
    }
    assert totals == {("team", team): 2 * EXPECTED_COST, ("user", user): 2 * EXPECTED_COST}


def test_every_management_change_appends_an_event_to_the_key_stream(server: RunningServer) -> None:
    created = generate(server, user_id=unique("stream"), metadata={"a": 1}, max_budget="1.5")
    key, key_hash = created["key"], created["token"]
    assert manage(server, "update", {"key": key, "rpm_limit": 7}).status_code == 200
    assert manage(server, "block", {"key": key}).status_code == 200
    assert manage(server, "unblock", {"key": key}).status_code == 200
    assert manage(server, "update", {"key": key, "metadata": {"b": 2}}).status_code == 200
    assert manage(server, "delete", {"keys": [key]}).status_code == 200

    events = key_events(server.database_url, key_hash)
    assert [e["version"] for e in events] == list(range(1, len(events) + 1))
    assert [e["type"] for e in events] == [
        "KeyGenerated",
        "KeyUpdated",
        "KeyBlocked",
        "KeyUnblocked",
        "KeyUpdated",
        "KeyDeleted",
    ]
    assert all(e["data"]["type"] == e["type"] and e["data"]["key_hash"] == key_hash for e in events)
    generated = events[0]["data"]
    assert generated["max_budget"] == Decimal("1.5") and generated["metadata"] == {"a": 1}
    assert generated["key_name"] == created["key_name"] and key not in json.dumps(generated, default=str)
    assert events[1]["data"]["rpm_limit"] == 7
    assert all(e["metadata"].get("actor") == "master_key" for e in events)


def test_a_refused_management_change_appends_no_event(server: RunningServer) -> None:
    created = generate(server, user_id=unique("refused"))
    key_hash = created["token"]
    assert manage(server, "update", {"key": created["key"], "rpm_limit": -5}).status_code == 400
    assert manage(server, "update", {"key": created["key"], "duration": "soon"}).status_code == 400
    assert [e["type"] for e in key_events(server.database_url, key_hash)] == ["KeyGenerated"]
