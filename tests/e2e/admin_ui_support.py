"""A signed-in admin UI session over plain HTTP, as a browser without script would use it: the
sign-in form's CSRF token and cookie, then the session cookie and each form's CSRF token."""

from __future__ import annotations

import re
from typing import Any

import httpx

from tests.support import RunningServer

_CSRF = re.compile(r'name="csrf_token" value="([^"]*)"')


def csrf_of(html: str) -> str:
    match = _CSRF.search(html)
    assert match is not None, "the page has no form with a CSRF token"
    return match.group(1)


class UiClient:
    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.http = httpx.Client(base_url=server.base_url, timeout=30)

    def close(self) -> None:
        self.http.close()

    def sign_in(self, key: str) -> httpx.Response:
        form = self.http.get("/ui/login")
        assert form.status_code == 200, form.text
        return self.http.post("/ui/login", data={"csrf_token": csrf_of(form.text), "api_key": key})

    def page(self, path: str, **params: Any) -> httpx.Response:
        return self.http.get(path, params=params)

    def token(self, path: str = "/ui/budgets") -> str:
        """A CSRF token of this session (every signed-in page carries it in its sign-out form)."""
        return csrf_of(self.page(path).text)

    def post(self, path: str, fields: dict[str, str], csrf: str | None = "session") -> httpx.Response:
        """Post a form; `csrf` "session" sends this session's token, None sends none, else that text."""
        body = dict(fields)
        if csrf == "session":
            body["csrf_token"] = self.token()
        elif csrf is not None:
            body["csrf_token"] = csrf
        return self.http.post(path, data=body)


def signed_in(server: RunningServer, key: str) -> UiClient:
    client = UiClient(server)
    answer = client.sign_in(key)
    assert answer.status_code == 303 and answer.headers["location"] == "/ui/budgets", answer.text
    return client
