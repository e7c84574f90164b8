"""The admin UI over plain HTTP (api/ui): sign-in and its cookie, CSRF, roles, bad input, escaping,
and that a change made in a form is the API's own command, with the signed-in key as its actor.
The same pages in a real browser: test_admin_ui_browser.py."""

from __future__ import annotations

import hashlib
import html
import re
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest

from tests.e2e.admin_ui_support import UiClient, signed_in
from tests.e2e.conftest import MASTER_KEY
from tests.e2e.test_roles import fetch
from tests.support import RunningServer

ADMIN = {"Authorization": f"Bearer {MASTER_KEY}"}
PAGES = ("/ui/budgets", "/ui/customers", "/ui/keys", "/ui/teams", "/ui/users", "/ui/spend", "/ui/delivery")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def api(server: RunningServer, path: str, body: dict[str, Any], key: str = MASTER_KEY) -> dict[str, Any]:
    answer = httpx.post(f"{server.base_url}{path}", headers={"Authorization": f"Bearer {key}"}, json=body)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def user_key(server: RunningServer, role: str) -> str:
    return str(api(server, "/user/new", {"user_id": unique(role), "user_role": role})["key"])


@pytest.fixture(scope="module")
def admin(server: RunningServer) -> Iterator[UiClient]:
    client = signed_in(server, MASTER_KEY)
    yield client
    client.close()


# --- sign-in, the cookie, sign-out -----------------------------------------------------------------


def test_the_root_and_every_page_send_a_stranger_to_the_sign_in_form(server: RunningServer) -> None:
    root = httpx.get(server.base_url + "/", follow_redirects=False)
    assert root.status_code in (301, 302, 303, 307) and root.headers["location"] == "/ui"
    for path in PAGES:
        answer = httpx.get(server.base_url + path, follow_redirects=False)
        assert answer.status_code == 303 and answer.headers["location"] == "/ui/login", path


def test_the_session_cookie_is_http_only_strict_and_holds_nothing_the_database_keeps(
    server: RunningServer,
) -> None:
    client = UiClient(server)
    answer = client.sign_in(MASTER_KEY)
    assert answer.status_code == 303
    cookie = next(v for k, v in answer.headers.multi_items() if k == "set-cookie" and v.startswith("spendledger_ui="))
    flags = [part.strip().lower() for part in cookie.split(";")]
    assert "httponly" in flags and "samesite=strict" in flags and "path=/ui" in flags
    assert "secure" not in flags  # served over plain http here: a Secure cookie would never come back
    token = client.http.cookies["spendledger_ui"]
    rows = fetch(server.database_url, "select * from ui_sessions")
    stored = " ".join(str(value) for row in rows for value in row.values())
    assert token not in stored and MASTER_KEY not in stored
    assert hashlib.sha256(token.encode()).hexdigest() in {row["token_hash"] for row in rows}
    client.close()


def test_a_wrong_key_an_empty_one_or_an_internal_users_cannot_sign_in(server: RunningServer) -> None:
    client = UiClient(server)
    for key, status, said in (
        ("sk-not-a-key-of-this-server", 401, "cannot sign in"),
        ("", 401, "cannot sign in"),
        (user_key(server, "internal_user"), 403, "may not use the admin UI"),
    ):
        answer = client.sign_in(key)
        assert answer.status_code == status and said in answer.text
        assert "spendledger_ui" not in client.http.cookies
        assert key not in answer.text or key == ""  # never echoed
    client.close()


def test_sign_out_ends_the_session_on_the_server(server: RunningServer) -> None:
    client = signed_in(server, MASTER_KEY)
    token = client.http.cookies["spendledger_ui"]
    out = client.post("/ui/logout", {})
    assert out.status_code == 303 and out.headers["location"] == "/ui/login"
    replay = httpx.get(server.base_url + "/ui/budgets", cookies={"spendledger_ui": token}, follow_redirects=False)
    assert replay.status_code == 303 and replay.headers["location"] == "/ui/login"
    client.close()


def test_a_key_blocked_after_sign_in_loses_its_session_at_once(server: RunningServer) -> None:
    key = user_key(server, "proxy_admin")
    client = signed_in(server, key)
    assert client.page("/ui/budgets").status_code == 200
    api(server, "/key/block", {"key": key})
    deadline = time.monotonic() + 10  # the key cache hears of the block by NOTIFY, as the API's auth does
    while (answer := client.http.get("/ui/budgets", follow_redirects=False)).status_code == 200:
        assert time.monotonic() < deadline, "the blocked key's session still serves pages"
        time.sleep(0.05)
    assert answer.status_code == 303 and answer.headers["location"] == "/ui/login"
    client.close()


# --- CSRF and roles ---------------------------------------------------------------------------------


def test_a_form_posted_without_or_with_a_wrong_csrf_token_changes_nothing(server: RunningServer, admin: UiClient) -> None:
    for csrf in (None, "", "not-the-token", admin.token() + "x"):
        tier = unique("csrf-tier")
        answer = admin.post("/ui/budgets/new", {"budget_id": tier, "max_budget": "4"}, csrf=csrf)
        assert answer.status_code == 403 and "CSRF" in answer.text
        assert fetch(server.database_url, "select 1 from budgets where budget_id = $1", tier) == []


def test_the_sign_in_form_needs_its_own_csrf_token(server: RunningServer) -> None:
    answer = httpx.post(server.base_url + "/ui/login", data={"api_key": MASTER_KEY, "csrf_token": "forged"})
    assert answer.status_code == 403 and "spendledger_ui=" not in answer.headers.get("set-cookie", "")


def test_a_viewer_reads_every_page_sees_no_change_button_and_its_posts_are_refused(server: RunningServer) -> None:
    viewer = signed_in(server, user_key(server, "proxy_admin_viewer"))
    tier = unique("viewer-tier")
    api(server, "/budget/new", {"budget_id": tier, "max_budget": 1})
    for path in PAGES:
        answer = viewer.page(path)
        assert answer.status_code == 200, path
        for change in ("+ Create", "+ Generate", ">Delete<", ">Block<", ">Retry", "/ui/budgets/edit"):
            assert change not in answer.text, (path, change)
    for path, fields in (
        ("/ui/budgets/new", {"budget_id": unique("by-viewer"), "max_budget": "4"}),
        ("/ui/budgets/delete", {"budget_id": tier}),
        ("/ui/customers/new", {"user_id": unique("by-viewer")}),
        ("/ui/keys/new", {"key_alias": unique("by-viewer")}),
        ("/ui/delivery/retry", {}),
    ):
        answer = viewer.post(path, fields)
        assert answer.status_code == 403 and "may not" in answer.text, path
    assert fetch(server.database_url, "select 1 from budgets where budget_id = $1", tier) != []
    assert fetch(server.database_url, "select 1 from budgets where budget_id like 'by-viewer-%'") == []
    viewer.close()


# --- what the pages show, and what forms do ----------------------------------------------------------


def test_every_page_answers_with_its_security_headers(admin: UiClient) -> None:
    for path in (*PAGES, "/ui/budgets/new", "/ui/customers/new", "/ui/keys/new", "/ui/teams/new", "/ui/users/new"):
        answer = admin.page(path)
        assert answer.status_code == 200, path
        csp = answer.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert answer.headers["x-content-type-options"] == "nosniff"


def test_a_tier_made_edited_and_deleted_by_form_is_the_apis_own_tier_and_names_its_actor(
    server: RunningServer,
) -> None:
    key = user_key(server, "proxy_admin")
    client = signed_in(server, key)
    tier = unique("form-tier")
    made = client.post("/ui/budgets/new", {"budget_id": tier, "max_budget": "4.10", "rpm_limit": "7", "budget_duration": "1mo"})
    assert made.status_code == 303
    view = api(server, "/budget/info", {"budgets": [tier]})[0]
    assert Decimal(str(view["max_budget"])) == Decimal("4.1") and view["rpm_limit"] == 7
    assert view["budget_duration"] == "1mo" and view["tpm_limit"] is None
    edited = client.post("/ui/budgets/edit", {"budget_id": tier, "max_budget": "", "rpm_limit": "9", "budget_duration": "1mo"})
    assert edited.status_code == 303
    view = api(server, "/budget/info", {"budgets": [tier]})[0]
    assert view["max_budget"] is None and view["rpm_limit"] == 9  # an emptied field removes the limit
    assert client.post("/ui/budgets/delete", {"budget_id": tier}).status_code == 303
    events = httpx.get(f"{server.base_url}/audit/events", params={"actor": f"key:{hashlib.sha256(key.encode()).hexdigest()}"}, headers=ADMIN).json()
    assert [e["type"] for e in events["events"]] == ["BudgetDefined", "BudgetUpdated", "BudgetDeleted"]
    client.close()


def test_a_tier_in_use_is_not_deleted_and_the_page_says_why_as_the_api_does(server: RunningServer, admin: UiClient) -> None:
    tier = unique("busy-tier")
    api(server, "/budget/new", {"budget_id": tier, "max_budget": 4})
    api(server, "/customer/new", {"user_id": unique("on-busy"), "budget_id": tier})
    by_api = httpx.post(f"{server.base_url}/budget/delete", headers=ADMIN, json={"id": tier})
    by_form = admin.post("/ui/budgets/delete", {"budget_id": tier})
    assert by_form.status_code == by_api.status_code == 400
    assert by_api.json()["error"]["message"] in html.unescape(by_form.text)
    assert fetch(server.database_url, "select 1 from budgets where budget_id = $1", tier) != []


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"max_budget": "four"}, "Max Budget: expected a number"),
        ({"rpm_limit": "1.5"}, "RPM Limit: expected a whole number"),
        ({"max_budget": "-1"}, "max_budget"),
        ({"budget_duration": "forever"}, "duration"),
        ({"budget_id": "a\u0007b"}, "Budget ID: expected an id"),
        ({"budget_id": "x" * 5000}, "at most 4096 characters"),
    ],
)
def test_a_bad_field_is_refused_with_its_label_and_nothing_is_written(
    server: RunningServer, admin: UiClient, fields: dict[str, str], said: str
) -> None:
    before = fetch(server.database_url, "select count(*) as n from events")[0]["n"]
    answer = admin.post("/ui/budgets/new", {"budget_id": unique("bad"), **fields})
    assert answer.status_code == 400 and said in html.unescape(answer.text), answer.text[-600:]
    assert fetch(server.database_url, "select count(*) as n from events")[0]["n"] == before


def test_what_clients_named_is_shown_escaped(server: RunningServer, admin: UiClient) -> None:
    customer = unique("<script>alert(1)</script>")
    api(server, "/customer/new", {"user_id": customer, "alias": "<img src=x onerror=alert(2)>"})
    for answer in (admin.page("/ui/customers", q="script"), admin.page("/ui/customer", id=customer)):
        assert answer.status_code == 200
        assert "<script>alert(1)" not in answer.text and "<img src=x" not in answer.text
        assert html.escape(customer) in answer.text or html.escape(customer, quote=False) in answer.text


def test_hostile_query_values_are_refused_not_served_a_500(admin: UiClient) -> None:
    for path, params in (
        ("/ui/customer", {"id": "nobody-" + uuid.uuid4().hex}),
        ("/ui/customer", {"id": "x", "before": "not-a-cursor"}),
        ("/ui/spend", {"start": "2026-13-01"}),
        ("/ui/spend", {"start": "2026-12-07", "end": "2026-01-01"}),
        ("/ui/spend", {"start": "0001-01-01", "end": "9999-12-31"}),
        ("/ui/keys", {"page": "-1"}),
        ("/ui/customers", {"q": "%" * 300}),
        ("/ui/spend/export.csv", {"by": "planet"}),
    ):
        answer = admin.page(path, **params)
        assert 400 <= answer.status_code < 500, (path, params, answer.status_code)


def test_customers_page_and_search_by_id_or_alias(server: RunningServer, admin: UiClient) -> None:
    stem = unique("paged")
    for n in range(55):
        api(server, "/customer/new", {"user_id": f"{stem}-{n:02d}", "alias": f"alias-{stem}" if n == 54 else None})
    first = admin.page("/ui/customers", q=stem)
    assert "55 customers" in first.text and f"{stem}-00" in first.text and f"{stem}-50" not in first.text
    assert "Next page" in first.text
    second = admin.page("/ui/customers", q=stem, after=f"{stem}-49")
    assert f"{stem}-50" in second.text and f"{stem}-49<" not in second.text and "Next page" not in second.text
    by_alias = admin.page("/ui/customers", q=f"alias-{stem}")
    assert "1 customer " in by_alias.text and f"{stem}-54" in by_alias.text
    literal = admin.page("/ui/customers", q=f"{stem}-0_")  # `_` is a character here, not a wildcard
    assert "0 customers" in literal.text


def test_a_generated_key_is_shown_once_works_and_never_sits_in_a_url(server: RunningServer, admin: UiClient) -> None:
    alias = unique("ui-key")
    answer = admin.post("/ui/keys/new", {"key_alias": alias, "max_budget": "2", "models": "fake-openai-endpoint"})
    assert answer.status_code == 200 and "location" not in answer.headers
    key = answer.text.split('id="new-key">', 1)[1].split("<", 1)[0]
    assert key.startswith("sk-")
    info = httpx.get(f"{server.base_url}/key/info", params={"key": key}, headers=ADMIN).json()["info"]
    assert info["key_alias"] == alias and info["models"] == ["fake-openai-endpoint"]
    listed = admin.page("/ui/keys")
    assert alias in listed.text and key not in listed.text
    assert admin.post("/ui/keys/block", {"key": info["token"], "name": alias, "blocked": "true"}).status_code == 303
    refused = httpx.post(f"{server.base_url}/chat/completions", headers={"Authorization": f"Bearer {key}"},
                         json={"model": "fake-openai-endpoint", "messages": [{"role": "user", "content": "hi"}]})
    assert refused.status_code == 401
    assert admin.post("/ui/keys/delete", {"key": info["token"], "name": alias}).status_code == 303
    assert fetch(server.database_url, "select 1 from keys where key_alias = $1", alias) == []


def test_teams_and_users_made_blocked_and_deleted_by_form(server: RunningServer, admin: UiClient) -> None:
    team = unique("ui-team")
    assert admin.post("/ui/teams/new", {"team_id": team, "max_budget": "10", "models": "a, b"}).status_code == 303
    assert api(server, "/team/block", {"team_id": team})["blocked"] is True  # the API sees the form's team
    assert admin.post("/ui/teams/block", {"team_id": team, "blocked": "false"}).status_code == 303
    assert fetch(server.database_url, "select blocked, models from teams where team_id = $1", team) == [
        {"blocked": False, "models": ["a", "b"]}
    ]
    assert admin.post("/ui/teams/delete", {"team_id": team}).status_code == 303
    user = unique("ui-user")
    made = admin.post("/ui/users/new", {"user_id": user, "user_role": "proxy_admin_viewer"})
    assert made.status_code == 200 and 'id="new-key">sk-' in made.text
    assert fetch(server.database_url, "select user_role from users where user_id = $1", user) == [
        {"user_role": "proxy_admin_viewer"}
    ]
    assert admin.post("/ui/users/delete", {"user_id": user}).status_code == 303
    assert fetch(server.database_url, "select 1 from users where user_id = $1", user) == []


def test_the_spend_csv_is_the_reconciliation_export_of_the_range(server: RunningServer, admin: UiClient) -> None:
    day = "2026-01-01"
    by_ui = admin.page("/ui/spend/export.csv", by="customer", start=day, end=day)
    by_api = httpx.get(f"{server.base_url}/export/reconciliation", headers=ADMIN,
                       params={"by": "customer", "from": day, "to": day, "format": "csv"})
    assert by_ui.status_code == by_api.status_code == 200
    assert by_ui.headers["content-type"].startswith("text/csv")
    assert by_ui.content == by_api.content


def test_a_customers_requests_page_newest_first_and_older_by_cursor(server: RunningServer, admin: UiClient) -> None:
    customer = unique("paged-requests")
    api(server, "/customer/new", {"user_id": customer})
    call_ids = []
    for n in range(30):
        answer = httpx.post(f"{server.base_url}/chat/completions", headers=ADMIN, json={
            "model": "fake-openai-endpoint", "user": customer, "messages": [{"role": "user", "content": f"hi {n}"}]})
        assert answer.status_code == 200, answer.text
        call_ids.append(answer.headers["x-litellm-call-id"])
    first = admin.page("/ui/customer", id=customer)
    shown_first = [c for c in call_ids if c in first.text]
    assert shown_first == call_ids[-25:]  # the 25 newest
    assert first.text.index(call_ids[-1]) < first.text.index(call_ids[-25])  # newest at the top
    older = re.search(r'href="([^"]*)">Older requests', first.text)
    assert older is not None
    second = admin.http.get(html.unescape(older.group(1)))
    assert second.status_code == 200
    assert [c for c in call_ids if c in second.text] == call_ids[:5] and "Older requests" not in second.text
