"""Roles end to end (api/roles.py): LiteLLM's four, a user with no role, and a key with no user,
each against a representative read, change, and own-versus-other route, on one server."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest

from tests.e2e.conftest import MASTER_KEY, proxy_config
from tests.fakes.upstream import RunningUpstream
from tests.support import PostgresForTests, RunningServer, run_server

ADMIN = {"Authorization": f"Bearer {MASTER_KEY}"}


@dataclass(frozen=True)
class Person:
    name: str
    user_id: str | None
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    @property
    def key_hash(self) -> str:
        return hashlib.sha256(self.key.encode()).hexdigest()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def admin_post(server: RunningServer, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{server.base_url}{path}", headers=ADMIN, json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def new_user(server: RunningServer, name: str, role: str | None) -> Person:
    user_id = unique(name)
    created = admin_post(server, "/user/new", {"user_id": user_id, "user_role": role})
    return Person(name, user_id, created["key"])


def fetch(database_url: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(database_url)
        try:
            return [dict(row) for row in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    return asyncio.run(run())


@pytest.fixture(scope="module")
def server(postgres: PostgresForTests, upstream: RunningUpstream) -> Iterator[RunningServer]:
    url = postgres.new_database()
    with run_server(proxy_config(upstream.base_url), url) as running:
        yield running
    postgres.drop_database(url)


@pytest.fixture(scope="module")
def people(server: RunningServer) -> dict[str, Person]:
    """One caller per role; "no role" is a user without `user_role` (LiteLLM: an internal_user);
    "keyless" is a key that belongs to no internal user (no management role)."""
    cast = {
        name: new_user(server, name, role)
        for name, role in (
            ("admin", "proxy_admin"),
            ("viewer", "proxy_admin_viewer"),
            ("internal", "internal_user"),
            ("internal_viewer", "internal_user_viewer"),
            ("no_role", None),
            ("victim", "internal_user"),
        )
    }
    cast["keyless"] = Person("keyless", None, admin_post(server, "/key/generate", {})["key"])
    return cast


def request(server: RunningServer, person: Person, case: str, people: dict[str, Person]) -> httpx.Response:
    """One representative call per kind of permission."""
    base, victim = server.base_url, people["victim"]
    own_user = person.user_id or "nobody"
    calls: dict[str, Any] = {
        "read everything: GET /customer/list": lambda: httpx.get(
            f"{base}/customer/list", headers=person.headers
        ),
        "change: POST /budget/new": lambda: httpx.post(
            f"{base}/budget/new", headers=person.headers, json={"budget_id": unique("tier")}
        ),
        "own: GET /user/info": lambda: httpx.get(
            f"{base}/user/info", headers=person.headers, params={"user_id": own_user}
        ),
        "other's: GET /user/info": lambda: httpx.get(
            f"{base}/user/info", headers=person.headers, params={"user_id": victim.user_id}
        ),
        "own key: POST /key/generate": lambda: httpx.post(
            f"{base}/key/generate", headers=person.headers, json={}
        ),
        "other's key: POST /key/update": lambda: httpx.post(
            f"{base}/key/update",
            headers=person.headers,
            json={"key": victim.key, "metadata": {"by": person.name}},
        ),
        "other's key: GET /key/info": lambda: httpx.get(
            f"{base}/key/info", headers=person.headers, params={"key": victim.key}
        ),
        "LLM: POST /chat/completions": lambda: httpx.post(
            f"{base}/chat/completions",
            headers=person.headers,
            json={"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]},
        ),
        "audit: GET /audit/events": lambda: httpx.get(f"{base}/audit/events", headers=person.headers),
    }
    response: httpx.Response = calls[case]()
    return response


OK, NO = 200, 403
# case → expected status for admin, viewer, internal, internal_viewer, no_role, keyless
MATRIX: dict[str, tuple[int, int, int, int, int, int]] = {
    "read everything: GET /customer/list": (OK, OK, NO, NO, NO, NO),
    "change: POST /budget/new": (OK, NO, NO, NO, NO, NO),
    "own: GET /user/info": (OK, OK, OK, OK, OK, NO),
    "other's: GET /user/info": (OK, OK, NO, NO, NO, NO),
    "own key: POST /key/generate": (OK, NO, OK, NO, OK, NO),
    "other's key: POST /key/update": (OK, NO, NO, NO, NO, NO),
    "other's key: GET /key/info": (OK, OK, NO, NO, NO, NO),
    "LLM: POST /chat/completions": (OK, NO, OK, OK, OK, OK),
    "audit: GET /audit/events": (OK, OK, NO, NO, NO, NO),
}
CALLERS = ("admin", "viewer", "internal", "internal_viewer", "no_role", "keyless")


def test_the_role_matrix(server: RunningServer, people: dict[str, Person]) -> None:
    wrong = []
    for case, expected in MATRIX.items():
        for name, status in zip(CALLERS, expected, strict=True):
            response = request(server, people[name], case, people)
            if response.status_code != status:
                wrong.append(
                    f"{name} {case}: {response.status_code} (expected {status}) {response.text[:160]}"
                )
            elif status == NO:
                error = response.json()["error"]
                assert error["type"] == "permission_denied" and error["code"] == "403", response.text
                assert people[name].key not in response.text
    assert not wrong, "\n".join(wrong)


def test_missing_and_unknown_keys_stay_401(server: RunningServer) -> None:
    for headers in ({}, {"Authorization": "Bearer sk-no-such-key-at-all"}):
        response = httpx.get(f"{server.base_url}/customer/list", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["type"] == "auth_error"


def test_an_internal_user_sees_and_manages_only_its_own_keys(
    server: RunningServer, people: dict[str, Person]
) -> None:
    me, victim = people["internal"], people["victim"]
    base = server.base_url
    made = httpx.post(f"{base}/key/generate", headers=me.headers, json={"key_alias": unique("mine")})
    assert made.status_code == 200 and made.json()["user_id"] == me.user_id  # its own user by default
    mine = made.json()["key"]
    before = fetch(server.database_url, "select count(*) as n from events")[0]["n"]
    for body in ({"user_id": victim.user_id}, {"team_id": "any-team"}):
        refused = httpx.post(f"{base}/key/generate", headers=me.headers, json=body)
        assert refused.status_code == 403, refused.text
    moved = httpx.post(
        f"{base}/key/update", headers=me.headers, json={"key": mine, "user_id": victim.user_id}
    )
    assert moved.status_code == 403
    gone = httpx.post(f"{base}/key/delete", headers=me.headers, json={"keys": [victim.key]})
    assert gone.status_code == 403
    assert fetch(server.database_url, "select count(*) as n from events")[0]["n"] == before

    listed = httpx.get(f"{base}/key/list", headers=me.headers, params={"return_full_object": "true"}).json()
    assert listed["keys"] and {k["user_id"] for k in listed["keys"]} == {me.user_id}
    assert (
        httpx.get(f"{base}/key/list", headers=me.headers, params={"user_id": victim.user_id}).status_code
        == 403
    )
    everyone = httpx.get(f"{base}/key/list", headers=people["viewer"].headers).json()
    assert everyone["total_count"] > listed["total_count"]

    mine_info = httpx.get(f"{base}/key/info", headers=me.headers, params={"key": mine})
    assert mine_info.status_code == 200
    updated = httpx.post(f"{base}/key/update", headers=me.headers, json={"key": mine, "max_budget": 1})
    assert updated.status_code == 200, updated.text
    deleted = httpx.post(f"{base}/key/delete", headers=me.headers, json={"keys": [mine]})
    assert deleted.status_code == 200, deleted.text


def test_an_internal_user_reads_only_its_own_spend(server: RunningServer, people: dict[str, Person]) -> None:
    me, victim = people["internal"], people["victim"]
    body = {"model": "mock-model", "messages": [{"role": "user", "content": "spend"}]}
    for person in (me, victim):
        assert (
            httpx.post(f"{server.base_url}/chat/completions", headers=person.headers, json=body).status_code
            == 200
        )
    logs = httpx.get(f"{server.base_url}/spend/logs", headers=me.headers).json()
    assert logs and {row["user"] for row in logs} == {me.user_id}
    other = httpx.get(f"{server.base_url}/spend/logs", headers=me.headers, params={"user_id": victim.user_id})
    assert other.status_code == 403
    everyone = httpx.get(f"{server.base_url}/spend/logs", headers=people["viewer"].headers).json()
    assert {me.user_id, victim.user_id} <= {row["user"] for row in everyone}


def test_only_a_proxy_admin_makes_or_promotes_admins(
    server: RunningServer, people: dict[str, Person]
) -> None:
    base = server.base_url
    for name in ("viewer", "internal", "internal_viewer", "no_role"):
        person = people[name]
        made = httpx.post(f"{base}/user/new", headers=person.headers, json={"user_role": "proxy_admin"})
        assert made.status_code == 403, (name, made.text)
        promoted = httpx.post(
            f"{base}/user/update",
            headers=person.headers,
            json={"user_id": person.user_id, "user_role": "proxy_admin"},
        )
        assert promoted.status_code == 403, (name, promoted.text)
    by_admin = httpx.post(
        f"{base}/user/new", headers=people["admin"].headers, json={"user_role": "proxy_admin"}
    )
    assert by_admin.status_code == 200 and by_admin.json()["user_role"] == "proxy_admin"


def test_a_role_change_takes_effect_at_once_for_cached_keys(server: RunningServer) -> None:
    person = new_user(server, "promoted", "internal_user")
    budget = f"{server.base_url}/budget/new"
    for _ in range(3):  # the key is cached by now
        assert httpx.post(budget, headers=person.headers, json={"budget_id": unique("b")}).status_code == 403
    admin_post(server, "/user/update", {"user_id": person.user_id, "user_role": "proxy_admin"})
    assert httpx.post(budget, headers=person.headers, json={"budget_id": unique("b")}).status_code == 200
    admin_post(server, "/user/update", {"user_id": person.user_id, "user_role": "internal_user_viewer"})
    assert httpx.post(budget, headers=person.headers, json={"budget_id": unique("b")}).status_code == 403
    own_key = httpx.post(f"{server.base_url}/key/generate", headers=person.headers, json={})
    assert own_key.status_code == 403


def test_every_change_names_its_actor_and_the_audit_log_filters_by_it(
    server: RunningServer, people: dict[str, Person]
) -> None:
    me = people["internal"]
    alias = unique("actor")
    made = httpx.post(f"{server.base_url}/key/generate", headers=me.headers, json={"key_alias": alias})
    assert made.status_code == 200
    by_me = f"key:{me.key_hash}"
    rows = fetch(
        server.database_url,
        "select metadata->>'actor' as actor from events where stream = $1",
        f"key:{made.json()['token']}",
    )
    assert [r["actor"] for r in rows] == [by_me]
    for actor in (by_me, me.key):  # as events name it, or the key itself
        page = httpx.get(f"{server.base_url}/audit/events", headers=ADMIN, params={"actor": actor}).json()
        assert page["events"] and all(e["metadata"]["actor"] == by_me for e in page["events"])
        assert alias in {e["data"].get("key_alias") for e in page["events"]}
    masters = httpx.get(
        f"{server.base_url}/audit/events",
        headers=ADMIN,
        params={"actor": "master_key", "type": "UserCreated"},
    ).json()["events"]
    assert {e["data"]["user_id"] for e in masters} >= {p.user_id for p in people.values() if p.user_id}
    assert all(me.key not in str(e["metadata"]) for e in page["events"])
