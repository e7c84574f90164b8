"""Bad input, raw HTTP: every refusal is an OpenAI error envelope, never a 500, and leaves no trace.

For each malformed, mistyped, oversized, unauthenticated or misrouted request we check the status,
that the body is exactly `{"error": {"message", "type", "param", "code"}}`, that nothing reached the
upstream provider, and that the count of rows in `events` did not move (no half-written ledger).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest

from tests.e2e.conftest import MASTER_KEY, proxy_config
from tests.fakes.upstream import RunningUpstream
from tests.support import PostgresForTests, RunningServer, run_server

AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
JSON_AUTH = {**AUTH, "content-type": "application/json"}
MESSAGES = [{"role": "user", "content": "hello there"}]
GOOD_CHAT: dict[str, Any] = {"model": "fake-openai-endpoint", "messages": MESSAGES}


# --- helpers -----------------------------------------------------------------------------------------


def event_count(database_url: str) -> int:
    async def run() -> int:
        conn = await asyncpg.connect(database_url)
        try:
            return int(await conn.fetchval("select count(*) from events"))
        finally:
            await conn.close()

    return asyncio.run(run())


def assert_envelope(
    response: httpx.Response,
    status: int,
    type_: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """The exact OpenAI error envelope; returns its `error` object."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert isinstance(error["code"], str) and error["code"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    if type_ is not None:
        assert error["type"] == type_, error
    if code is not None:
        assert error["code"] == code, error
    return dict(error)


def names_field(error: dict[str, Any], field: str) -> bool:
    return error["param"] == field or field in error["message"]


@pytest.fixture
def unchanged_ledger(server: RunningServer, upstream: RunningUpstream) -> Iterator[None]:
    """The test's requests must neither write an event nor reach the upstream provider."""
    before = event_count(server.database_url)
    yield
    assert event_count(server.database_url) == before, "a refused request wrote to the event log"
    assert upstream.app.requests == [], "a refused request was forwarded upstream"


@pytest.fixture(scope="module")
def small_server(postgres: PostgresForTests, upstream: RunningUpstream) -> Iterator[RunningServer]:
    """A server whose request bodies may be at most 0.001 MB (1048 bytes)."""
    url = postgres.new_database()
    config = proxy_config(upstream.base_url, extra="  max_request_size_mb: 0.001")
    with run_server(config, url) as running:
        yield running
    postgres.drop_database(url)


# --- malformed and mistyped bodies ---------------------------------------------------------------------


ROUTES = ["/chat/completions", "/v1/chat/completions", "/completions", "/v1/embeddings"]


@pytest.mark.usefixtures("unchanged_ledger")
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "raw",
    [
        b"{bad",
        b'{"model": "fake-openai-endpoint",}',
        b'{"model": "fake-openai-endpoint"} trailing',
        b"\xff\xfe\x00",
        b"",
        b"   ",
    ],
    ids=["unclosed", "trailing-comma", "trailing-garbage", "not-utf8", "empty", "blank"],
)
def test_malformed_json_is_400(server: RunningServer, route: str, raw: bytes) -> None:
    response = httpx.post(f"{server.base_url}{route}", headers=JSON_AUTH, content=raw)
    assert_envelope(response, 400, "invalid_request_error")


@pytest.mark.usefixtures("unchanged_ledger")
@pytest.mark.parametrize("raw", [b"[1, 2]", b"null", b'"a string"', b"42", b"true", b"[]"])
def test_json_that_is_not_an_object_is_400(server: RunningServer, raw: bytes) -> None:
    response = httpx.post(f"{server.base_url}/chat/completions", headers=JSON_AUTH, content=raw)
    error = assert_envelope(response, 400, "invalid_request_error")
    assert "object" in error["message"], error


@pytest.mark.usefixtures("unchanged_ledger")
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": 5, "messages": MESSAGES}, "model"),
        ({"model": ["fake-openai-endpoint"], "messages": MESSAGES}, "model"),
        ({"model": None, "messages": MESSAGES}, "model"),
        ({**GOOD_CHAT, "stream": "yes"}, "stream"),
        ({**GOOD_CHAT, "stream": 1}, "stream"),
        ({**GOOD_CHAT, "user": 5}, "user"),
        ({**GOOD_CHAT, "user": {"id": "x"}}, "user"),
        ({**GOOD_CHAT, "stream": True, "stream_options": "yes"}, "stream_options"),
        # A customer id PostgreSQL cannot store must be refused before the upstream is paid for it.
        ({**GOOD_CHAT, "user": "cus\u0000tomer"}, "user"),
    ],
    ids=[
        "model-int",
        "model-list",
        "model-null",
        "stream-str",
        "stream-int",
        "user-int",
        "user-object",
        "stream_options-str",
        "user-nul",
    ],
)
def test_wrong_types_are_400_naming_the_field(
    server: RunningServer, body: dict[str, Any], field: str
) -> None:
    response = httpx.post(f"{server.base_url}/chat/completions", headers=AUTH, json=body)
    error = assert_envelope(response, 400, "invalid_request_error")
    assert names_field(error, field), error


@pytest.mark.usefixtures("unchanged_ledger")
@pytest.mark.parametrize(
    "body",
    [{"messages": MESSAGES}, {"model": "", "messages": MESSAGES}, {}],
    ids=["absent", "empty-string", "empty-object"],
)
def test_missing_model_is_400_param_model(server: RunningServer, body: dict[str, Any]) -> None:
    response = httpx.post(f"{server.base_url}/chat/completions", headers=AUTH, json=body)
    error = assert_envelope(response, 400, "invalid_request_error")
    assert error["param"] == "model", error


@pytest.mark.usefixtures("unchanged_ledger")
def test_embeddings_cannot_stream(server: RunningServer) -> None:
    body = {"model": "text-embedding-3-small", "input": "hi", "stream": True}
    response = httpx.post(f"{server.base_url}/embeddings", headers=AUTH, json=body)
    error = assert_envelope(response, 400, "invalid_request_error")
    assert error["param"] == "stream", error


@pytest.mark.usefixtures("unchanged_ledger")
@pytest.mark.parametrize("route", ROUTES)
def test_unknown_model_is_404_model_not_found(server: RunningServer, route: str) -> None:
    body = {"model": "no-such-model", "messages": MESSAGES, "prompt": "x", "input": "x"}
    response = httpx.post(f"{server.base_url}{route}", headers=AUTH, json=body)
    error = assert_envelope(response, 404, "invalid_request_error", "model_not_found")
    assert error["param"] == "model"
    assert "no-such-model" in error["message"]


# --- size limit -----------------------------------------------------------------------------------------


def _oversized_chat() -> bytes:
    filler = "x" * 5000
    return httpx.Request("POST", "http://x", json={**GOOD_CHAT, "filler": filler}).read()


@pytest.mark.parametrize("route", ["/chat/completions", "/v1/embeddings", "/key/generate"])
def test_body_over_the_limit_is_413(
    small_server: RunningServer, upstream: RunningUpstream, route: str
) -> None:
    before = event_count(small_server.database_url)
    body = _oversized_chat()
    assert len(body) > 5000
    response = httpx.post(f"{small_server.base_url}{route}", headers=JSON_AUTH, content=body)
    assert_envelope(response, 413, "invalid_request_error")
    assert event_count(small_server.database_url) == before
    assert upstream.app.requests == []


def test_chunked_body_over_the_limit_is_413(small_server: RunningServer, upstream: RunningUpstream) -> None:
    """No content-length: the limit must be enforced while reading, not from a header."""
    before = event_count(small_server.database_url)
    body = _oversized_chat()

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 512):
            yield body[start : start + 512]

    request = httpx.Request(
        "POST", f"{small_server.base_url}/chat/completions", headers=JSON_AUTH, content=chunks()
    )
    assert "content-length" not in request.headers
    assert request.headers.get("transfer-encoding") == "chunked"
    with httpx.Client() as client:
        response = client.send(request)
    assert_envelope(response, 413, "invalid_request_error")
    assert event_count(small_server.database_url) == before
    assert upstream.app.requests == []


def test_body_under_the_limit_still_works(small_server: RunningServer) -> None:
    """The small server is otherwise a normal server: a small request is served and recorded."""
    before = event_count(small_server.database_url)
    response = httpx.post(f"{small_server.base_url}/chat/completions", headers=AUTH, json=GOOD_CHAT)
    assert response.status_code == 200, response.text
    assert event_count(small_server.database_url) == before + 1


# --- routing and auth -----------------------------------------------------------------------------------


@pytest.mark.usefixtures("unchanged_ledger")
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/no/such/route"),
        ("POST", "/v1/no-such-endpoint"),
        ("GET", "/v2/models"),
        ("POST", "/key/nope"),
    ],
)
def test_unknown_route_is_404(server: RunningServer, method: str, path: str) -> None:
    response = httpx.request(method, f"{server.base_url}{path}", headers=AUTH, json=GOOD_CHAT)
    assert_envelope(response, 404)


@pytest.mark.usefixtures("unchanged_ledger")
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/chat/completions"),
        ("PUT", "/v1/chat/completions"),
        ("DELETE", "/v1/embeddings"),
        ("POST", "/v1/models"),
        ("GET", "/key/generate"),
        ("POST", "/key/info"),
    ],
)
def test_wrong_method_is_405(server: RunningServer, method: str, path: str) -> None:
    response = httpx.request(method, f"{server.base_url}{path}", headers=AUTH)
    assert_envelope(response, 405)


@pytest.mark.usefixtures("unchanged_ledger")
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/chat/completions"),
        ("POST", "/v1/embeddings"),
        ("GET", "/v1/models"),
        ("POST", "/key/generate"),
    ],
)
def test_no_authorization_is_401(server: RunningServer, method: str, path: str) -> None:
    response = httpx.request(method, f"{server.base_url}{path}", json=GOOD_CHAT)
    assert_envelope(response, 401, "auth_error")


@pytest.mark.usefixtures("unchanged_ledger")
@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer sk-not-a-key-we-know"},
        {"Authorization": "sk-not-a-key-we-know"},
        {"x-litellm-api-key": "sk-not-a-key-we-know"},
        {"Authorization": "Bearer sk-1234x"},
        {"Authorization": "Bearer sk-123"},
    ],
    ids=["bearer", "bare", "litellm-header", "master-prefix", "master-truncated"],
)
def test_unknown_key_is_401(server: RunningServer, headers: dict[str, str]) -> None:
    response = httpx.post(f"{server.base_url}/chat/completions", headers=headers, json=GOOD_CHAT)
    assert_envelope(response, 401, "auth_error")
    models = httpx.get(f"{server.base_url}/v1/models", headers=headers)
    assert_envelope(models, 401, "auth_error")


@pytest.mark.usefixtures("unchanged_ledger")
def test_auth_is_checked_before_the_body(server: RunningServer) -> None:
    """A malformed body with no key is refused for the key: nobody learns anything unauthenticated."""
    response = httpx.post(f"{server.base_url}/chat/completions", content=b"{bad")
    assert_envelope(response, 401, "auth_error")


# --- management bodies ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("unchanged_ledger")
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"max_budget": "abc"}, "max_budget"),
        ({"max_budget": -1}, "max_budget"),
        ({"max_budget": "NaN"}, "max_budget"),
        ({"max_budget": "1e999999"}, "max_budget"),
        ({"rpm_limit": -1}, "rpm_limit"),
        ({"tpm_limit": 1.5}, "tpm_limit"),
        ({"max_parallel_requests": -3}, "max_parallel_requests"),
        ({"rpm_limit": 2**31}, "rpm_limit"),
        ({"tpm_limit": 99999999999}, "tpm_limit"),
        ({"duration": "5 parsecs"}, "duration"),
        ({"duration": "0s"}, "duration"),
        ({"duration": "99999999999d"}, "duration"),
        ({"duration": "99999999mo"}, "duration"),
        ({"budget_duration": "x"}, "budget_duration"),
        ({"budget_duration": "99999999999999999999999mo"}, "budget_duration"),
        ({"models": "fake-openai-endpoint"}, "models"),
        ({"metadata": "x"}, "metadata"),
        ({"user_id": 5}, "user_id"),
        ({"key": "not-sk-prefixed"}, "key"),
        ({"blocked": "yes"}, "blocked"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_bad_key_generate_body_is_400(server: RunningServer, body: dict[str, Any], field: str) -> None:
    response = httpx.post(f"{server.base_url}/key/generate", headers=AUTH, json=body)
    error = assert_envelope(response, 400, "invalid_request_error")
    assert names_field(error, field), error


@pytest.mark.usefixtures("unchanged_ledger")
@pytest.mark.parametrize(
    "body",
    [
        {"user_id": "nul\u0000user"},
        {"team_id": "nul\u0000team"},
        {"key_alias": "nul\u0000alias"},
        {"models": ["nul\u0000model"]},
        {"metadata": {"note": "nul\u0000note"}},
        {"metadata": {"nul\u0000key": 1}},
    ],
    ids=["user_id", "team_id", "key_alias", "models", "metadata-value", "metadata-key"],
)
def test_key_generate_with_unstorable_text_is_400(server: RunningServer, body: dict[str, Any]) -> None:
    """PostgreSQL text cannot hold NUL: that is the caller's bad input (400), not a server fault."""
    response = httpx.post(f"{server.base_url}/key/generate", headers=AUTH, json=body)
    assert_envelope(response, 400, "invalid_request_error")


@pytest.mark.usefixtures("unchanged_ledger")
@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/key/generate", b"{bad"),
        ("/key/generate", b"[1]"),
        ("/key/generate", b'{"key_alias": "\xff"}'),
        ("/key/update", b'{"models": []}'),
        ("/key/update", b'{"key": 5}'),
        ("/key/delete", b'{"keys": "sk-x"}'),
        ("/key/block", b"{}"),
        ("/key/unblock", b"null"),
    ],
)
def test_bad_management_json_is_400(server: RunningServer, path: str, raw: bytes) -> None:
    response = httpx.post(f"{server.base_url}{path}", headers=JSON_AUTH, content=raw)
    assert_envelope(response, 400, "invalid_request_error")


def test_bad_key_update_is_400_and_changes_nothing(server: RunningServer) -> None:
    created = httpx.post(
        f"{server.base_url}/key/generate", headers=AUTH, json={"user_id": "bad-update", "rpm_limit": 5}
    )
    assert created.status_code == 200, created.text
    key = created.json()["key"]
    before = event_count(server.database_url)
    for body in (
        {"key": key, "max_budget": "abc"},
        {"key": key, "rpm_limit": -1},
        {"key": key, "rpm_limit": 2**31},
        {"key": key, "duration": "5 parsecs"},
        {"key": key, "budget_duration": "x"},
        {"key": key, "metadata": {"a": "nul\u0000"}},
    ):
        response = httpx.post(f"{server.base_url}/key/update", headers=AUTH, json=body)
        assert_envelope(response, 400, "invalid_request_error")
    assert event_count(server.database_url) == before
    info = httpx.get(f"{server.base_url}/key/info", headers=AUTH, params={"key": key}).json()["info"]
    assert info["rpm_limit"] == 5 and info["max_budget"] is None and info["metadata"] == {}


@pytest.mark.usefixtures("unchanged_ledger")
@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/key/list", {"page": "0"}),
        ("/key/list", {"size": "abc"}),
        ("/key/list", {"size": "1000"}),
        ("/key/info", {}),
    ],
)
def test_bad_management_query_is_400(server: RunningServer, path: str, params: dict[str, str]) -> None:
    response = httpx.get(f"{server.base_url}{path}", headers=AUTH, params=params)
    assert_envelope(response, 400, "invalid_request_error")


@pytest.mark.usefixtures("unchanged_ledger")
def test_unknown_key_in_management_is_404(server: RunningServer) -> None:
    for path, body in (
        ("/key/update", {"key": "sk-nobody", "models": []}),
        ("/key/block", {"key": "sk-nobody"}),
        ("/key/unblock", {"key": "sk-nobody"}),
        ("/key/delete", {"keys": ["sk-nobody"]}),
    ):
        response = httpx.post(f"{server.base_url}{path}", headers=AUTH, json=body)
        assert_envelope(response, 404)
    info = httpx.get(f"{server.base_url}/key/info", headers=AUTH, params={"key": "sk-nobody"})
    assert_envelope(info, 404)


def test_the_server_logged_no_unhandled_error(server: RunningServer) -> None:
    """Runs last in this module: none of the above reached the catch-all 500 handler."""
    assert "unhandled_error" not in server.log(), server.log()[-4000:]
