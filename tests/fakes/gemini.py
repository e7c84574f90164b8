"""A fake of Google's OpenAI-compatible Gemini endpoint, generating with the OpenAI fake
(tests/fakes/upstream.py), so its token counts are the same word counts.

- Paths: `/v1beta/openai/chat/completions` and `/v1beta/openai/embeddings` (no legacy completions).
- Auth: `Authorization: Bearer <GEMINI_API_KEY>`; none is Google's 403 PERMISSION_DENIED, a wrong one
  its 400 INVALID_ARGUMENT "API key not valid".
- Errors are Google's envelope (`code` a number, `status` a name) inside a one-element JSON list.
- Answers carry no `system_fingerprint`; in a stream the usage (when asked for) rides on the last
  chunk, the one with the finish reason, not on a chunk of its own.
- On demand: `fail_status` (Google's error; 429 RESOURCE_EXHAUSTED), and an unknown model is its 404.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.delegate import Receive, Reshape, Scope, Send, delegate, read_request, send_error
from tests.fakes.serving import Served, serve_in_thread
from tests.fakes.upstream import FakeUpstream, RecordedRequest

GEMINI_KEY = "AIzaSy-fake-gemini-key-0123456789"
MODELS = frozenset({"gemini-2.0-flash", "gemini-2.5-flash", "gemini-embedding-001"})
PREFIX = "/v1beta/openai"
_STATUS = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE",
}  # fmt: skip


def google_error(code: int, message: str) -> list[dict[str, Any]]:
    return [{"error": {"code": code, "message": message, "status": _STATUS.get(code, "UNKNOWN")}}]


class _GeminiShape(Reshape):
    def json(self, payload: dict[str, Any]) -> dict[str, Any]:
        payload.pop("system_fingerprint", None)
        return payload

    def events(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for event in events:
            event.pop("system_fingerprint", None)
        if len(events) >= 2 and not events[-1]["choices"] and events[-1].get("usage"):
            usage = events.pop()["usage"]
            events[-1]["usage"] = usage
        for event in events:
            if event.get("usage", 0) is None:
                del event["usage"]
        return events


@dataclass(eq=False)
class FakeGemini:
    api_key: str = GEMINI_KEY
    fail_status: int | None = None
    inner: FakeUpstream = field(default_factory=FakeUpstream)
    requests: list[RecordedRequest] = field(default_factory=list)

    def reset(self) -> None:
        self.fail_status = None
        self.requests.clear()
        self.inner.reset()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = await read_request(scope, receive)
        self.requests.append(request)
        authorization = request.headers.get("authorization")
        if authorization is None:
            message = (
                "Method doesn't allow unregistered callers (callers without established identity). "
                "Please use API Key or other form of API consumer identity to call this API."
            )
            await send_error(send, 403, google_error(403, message))
            return
        if authorization != f"Bearer {self.api_key}":
            await send_error(send, 400, google_error(400, "API key not valid. Please pass a valid API key."))
            return
        route = request.path.removeprefix(PREFIX)
        if request.method != "POST" or not request.path.startswith(PREFIX) or route not in ("/chat/completions", "/embeddings"):
            await send_error(send, 404, google_error(404, f"Requested entity was not found: {request.path}"))
            return
        body = request.json if isinstance(request.json, dict) else {}
        if body.get("model") not in MODELS:
            message = f"models/{body.get('model')} is not found for API version v1main, or is not supported for generateContent."
            await send_error(send, 404, google_error(404, message))
            return
        if self.fail_status is not None:
            status = self.fail_status
            message = "Resource has been exhausted (e.g. check quota)." if status == 429 else f"Fake Gemini failure ({status})"
            await send_error(send, status, google_error(status, message))
            return
        await delegate(self.inner, scope, request, route, body, _GeminiShape(), send)


@dataclass
class RunningGemini(Served[FakeGemini]):
    @property
    def base_url(self) -> str:
        """Google's OpenAI-compatible base, as `api_base` takes it."""
        return f"{self.root_url}{PREFIX}"


@contextlib.contextmanager
def run_fake_gemini(app: FakeGemini | None = None) -> Iterator[RunningGemini]:
    app = app or FakeGemini()
    with serve_in_thread(app, "fake-gemini", what="fake Gemini") as served:
        yield RunningGemini(app, served.port, served.server, served.thread)
