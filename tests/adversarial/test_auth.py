"""Issue 15, auth: each finding on 8e40733 as a test that failed there.

1. `master_key: os.environ/LITELLM_MASTER_KEY` with the variable unset started (with a warning) and
   served every caller as the admin; so did an empty key, no key, and the publicly known sk-1234.
2. The operator's explicit permission is the only way to serve like that, and then it is visible.
3. Management routes took text/plain and form bodies: a cross-site form could drive them.
4. Custom keys as short as `sk-1` (or `sk-`) were accepted and shown whole in `key_name`.
5. `allowed_customers` pins a key to customers: no other customer's budget can be spent with it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.e2e.conftest import _reset_upstream, upstream  # the fake provider
from tests.fakes.upstream import RunningUpstream
from tests.support import PROJECT_ROOT, PostgresForTests, RunningServer, free_port, run_server

__all__ = ["_reset_upstream", "upstream"]

MASTER_KEY = "sk-auth-4e7b1d9c0a2f8e5361b7"
AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
PERMIT_ENV = "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY"
# Nothing listens here: a server that wrongly starts fails on the database, not with exit code 2.
UNREACHABLE_DATABASE = "postgresql://nobody@127.0.0.1:9/nothing"


def config(
    general: str = f"  master_key: {MASTER_KEY}\n", upstream_url: str = "http://127.0.0.1:9/v1"
) -> str:
    return f"""
model_list:
  - model_name: mock-model
    litellm_params:
      model: mock/demo
    model_info:
      input_cost_per_token: 0.000001
      output_cost_per_token: 0.000003
  - model_name: fake-openai-endpoint
    litellm_params:
      model: openai/fake
      api_key: upstream-secret-key
      api_base: {upstream_url}
    model_info:
      input_cost_per_token: 0.000001
      output_cost_per_token: 0.000002
general_settings:
{general}"""


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any master key or permission of its own."""
    env = {k: v for k, v in os.environ.items() if k not in ("LITELLM_MASTER_KEY", PERMIT_ENV)}
    return {**env, **extra}


def fetchval(database_url: str, sql: str, *args: Any) -> Any:
    async def run() -> Any:
        conn = await asyncpg.connect(database_url)
        try:
            return await conn.fetchval(sql, *args)
        finally:
            await conn.close()

    return asyncio.run(run())


def events(server: RunningServer) -> int:
    return int(fetchval(server.database_url, "select count(*) from events"))


def error_of(response: httpx.Response, status: int, type_: str) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == type_ and set(error) == {"message", "type", "param", "code"}
    return error


@pytest.fixture(scope="module")
def server(postgres: PostgresForTests, upstream: RunningUpstream) -> Iterator[RunningServer]:
    url = postgres.new_database()
    with run_server(config(upstream_url=upstream.base_url), url, env=clean_env()) as running:
        yield running
    postgres.drop_database(url)


# --- 1. a weak or unset master key refuses to start -------------------------------------------------

REFUSED = {
    "no master key at all": ("  database_url: null\n", {}),
    "an os.environ/ reference to an unset variable": ("  master_key: os.environ/LITELLM_MASTER_KEY\n", {}),
    "an empty master key": ('  master_key: ""\n', {}),
    "the publicly known sk-1234": ("  master_key: sk-1234\n", {}),
    "sk-1234 from LITELLM_MASTER_KEY": ("  database_url: null\n", {"LITELLM_MASTER_KEY": "sk-1234"}),
    "a permission that is not LiteLLM's true": ("  master_key: sk-1234\n", {PERMIT_ENV: "yes"}),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_weak_or_unset_master_key_refuses_to_start_with_one_line(tmp_path: Path, case: str) -> None:
    general, env = REFUSED[case]
    path = tmp_path / "config.yaml"
    path.write_text(config(general))
    result = subprocess.run(
        [sys.executable, "-m", "spendledger.api", "serve", "--config", str(path), "--port", str(free_port())],
        cwd=PROJECT_ROOT,
        env=clean_env(DATABASE_URL=UNREACHABLE_DATABASE, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "LITELLM_MASTER_KEY" in lines[0] and "openssl rand -hex 32" in lines[0]
    assert PERMIT_ENV in lines[0] and "dangerously_permit_weak_or_unset_master_key" in lines[0]
    assert "sk-1234" not in result.stderr + result.stdout  # not even a public key is repeated


# --- 2. only the operator's permission serves without a key of its own, and it shows ----------------


@pytest.mark.parametrize(
    ("general", "env", "by"),
    [
        ("  dangerously_permit_weak_or_unset_master_key: true\n", {}, "general_settings."),
        ("  master_key: os.environ/LITELLM_MASTER_KEY\n", {PERMIT_ENV: " True "}, f"env {PERMIT_ENV}"),
    ],
)
def test_a_permitted_unset_key_serves_everyone_as_the_admin_and_says_so(
    postgres: PostgresForTests, general: str, env: dict[str, str], by: str
) -> None:
    url = postgres.new_database()
    try:
        with run_server(config(general), url, env=clean_env(**env)) as running:
            readiness = httpx.get(f"{running.base_url}/health/readiness").json()
            assert readiness["auth"].startswith("open: no master key (permitted by "), readiness
            assert by in readiness["auth"]
            anyone = httpx.post(f"{running.base_url}/budget/new", json={"budget_id": "open-door"})
            assert anyone.status_code == 200, anyone.text  # as LiteLLM: no key, every caller the admin
            log = running.log()
            assert "weak_master_key" in log and "every caller is the admin" in log and by in log
    finally:
        postgres.drop_database(url)


def test_a_permitted_publicly_known_key_serves_with_a_warning_and_is_still_required(
    postgres: PostgresForTests,
) -> None:
    url = postgres.new_database()
    general = "  master_key: sk-1234\n  dangerously_permit_weak_or_unset_master_key: true\n"
    try:
        with run_server(config(general), url, env=clean_env()) as running:
            readiness = httpx.get(f"{running.base_url}/health/readiness").json()
            assert readiness["auth"].startswith("weak: publicly known master key (permitted by "), readiness
            error_of(httpx.post(f"{running.base_url}/budget/new", json={}), 401, "auth_error")
            ok = httpx.get(f"{running.base_url}/budget/list", headers={"Authorization": "Bearer sk-1234"})
            assert ok.status_code == 200
            assert "weak_master_key" in running.log() and "sk-1234" not in running.log()
    finally:
        postgres.drop_database(url)


def test_a_key_of_ones_own_reports_itself_ready(server: RunningServer) -> None:
    assert httpx.get(f"{server.base_url}/health/readiness").json()["auth"] == "master_key"
    error_of(httpx.post(f"{server.base_url}/budget/new", json={}), 401, "auth_error")


# --- 3. management routes take JSON only ------------------------------------------------------------

BODIES = {
    "/key/generate": {"key_alias": "from-a-form"},
    "/customer/new": {"user_id": "from-a-form"},
    "/budget/new": {"budget_id": "from-a-form"},
}
NOT_JSON: dict[str, dict[str, Any]] = {
    "text/plain": {
        "content": b'{"user_id": "from-a-form", "key_alias": "from-a-form", "budget_id": "x"}',
        "headers": {"content-type": "text/plain"},
    },
    "form-urlencoded": {"data": {"user_id": "from-a-form", "key_alias": "f", "budget_id": "f"}},
    "multipart": {"files": {"user_id": ("x", b"from-a-form")}},
    "no content-type, a body": {"content": b'{"user_id": "from-a-form", "budget_id": "x"}'},
}


@pytest.mark.parametrize("path", list(BODIES))
@pytest.mark.parametrize("kind", list(NOT_JSON))
def test_management_bodies_that_are_not_json_get_415_and_write_nothing(
    server: RunningServer, path: str, kind: str
) -> None:
    before = events(server)
    request = httpx.Request("POST", f"{server.base_url}{path}", **NOT_JSON[kind])
    request.headers.update(AUTH)
    assert "content-type" in request.headers or kind == "no content-type, a body"
    response = httpx.Client().send(request)
    error = error_of(response, 415, "invalid_request_error")
    assert "application/json" in error["message"]
    assert events(server) == before


def test_json_with_a_charset_is_json(server: RunningServer) -> None:
    headers = {**AUTH, "content-type": "application/json; charset=utf-8"}
    response = httpx.post(f"{server.base_url}/budget/new", headers=headers, content=b'{"budget_id": "utf8"}')
    assert response.status_code == 200, response.text


# --- 4. custom keys are long enough, and never echoed ------------------------------------------------


@pytest.mark.parametrize(
    "key", ["sk-1", "sk-", "sk-123456789012", "xk-1234567890abcdef", "1234567890abcdefgh"]
)
def test_a_short_or_unprefixed_custom_key_is_400_and_never_echoed(server: RunningServer, key: str) -> None:
    before = events(server)
    response = httpx.post(f"{server.base_url}/key/generate", headers=AUTH, json={"key": key})
    error = error_of(response, 400, "invalid_request_error")
    assert error["param"] == "key" and "16" in error["message"]
    assert key not in response.text.replace("'sk-'", "")  # the rule quotes the prefix, never the key
    assert events(server) == before


def test_a_custom_key_of_sixteen_characters_is_accepted_and_shown_only_by_its_end(
    server: RunningServer,
) -> None:
    key = "sk-0123456789abc"
    assert len(key) == 16
    response = httpx.post(f"{server.base_url}/key/generate", headers=AUTH, json={"key": key})
    assert response.status_code == 200, response.text
    assert response.json()["key_name"] == "sk-...9abc"


# --- 5. a key pinned to customers -------------------------------------------------------------------


def chat(
    server: RunningServer, key: str, customer: str | None = None, header: bool = False
) -> httpx.Response:
    body: dict[str, Any] = {"model": "fake-openai-endpoint", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {key}"}
    if customer is not None and header:
        headers["x-litellm-customer-id"] = customer
    elif customer is not None:
        body["user"] = customer
    return httpx.post(f"{server.base_url}/chat/completions", headers=headers, json=body, timeout=30)


def spend(server: RunningServer, customer: str) -> Any:
    return fetchval(
        server.database_url,
        "select coalesce(sum(spend), 0) from spend_totals where scope = 'customer' and scope_id = $1",
        customer,
    )


def test_a_key_pinned_to_a_customer_cannot_spend_anothers_budget(
    server: RunningServer, upstream: RunningUpstream
) -> None:
    for customer in ("pin-a", "pin-b"):
        created = httpx.post(
            f"{server.base_url}/customer/new", headers=AUTH, json={"user_id": customer, "max_budget": 5}
        )
        assert created.status_code == 200, created.text
    generated = httpx.post(
        f"{server.base_url}/key/generate",
        headers=AUTH,
        json={"key_alias": "app-of-a", "allowed_customers": ["pin-a"]},
    )
    assert generated.status_code == 200, generated.text
    key = generated.json()["key"]
    assert generated.json()["allowed_customers"] == ["pin-a"]

    for header in (False, True):
        refused = chat(server, key, "pin-b", header=header)
        error = error_of(refused, 403, "permission_denied")
        assert "app-of-a" in error["message"] and key not in refused.text
    assert upstream.app.requests == []  # refused before anything went upstream
    held = "select count(*) from holds where budget_rows::text like '%pin-b%'"
    assert fetchval(server.database_url, held) == 0  # nor was anything held
    assert spend(server, "pin-b") == 0

    billed = chat(server, key)  # naming nobody: billed to the one customer it may serve
    assert billed.status_code == 200, billed.text
    assert spend(server, "pin-a") > 0 and spend(server, "pin-b") == 0
    assert chat(server, key, "pin-a").status_code == 200


def test_a_key_for_several_customers_must_name_one(server: RunningServer) -> None:
    generated = httpx.post(
        f"{server.base_url}/key/generate", headers=AUTH, json={"allowed_customers": ["multi-a", "multi-b"]}
    )
    key, name = generated.json()["key"], generated.json()["key_name"]
    error = error_of(chat(server, key), 403, "permission_denied")
    assert name in error["message"] and key not in error["message"]
    assert chat(server, key, "multi-b").status_code == 200
    updated = httpx.post(
        f"{server.base_url}/key/update", headers=AUTH, json={"key": key, "allowed_customers": []}
    )
    assert updated.json()["allowed_customers"] == []
    assert chat(server, key, "anyone-now").status_code == 200
