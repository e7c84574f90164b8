"""A fake Azure OpenAI resource: Azure's paths, query, headers, answers and errors, generating with the
OpenAI fake (tests/fakes/upstream.py), so its token counts are the same word counts.

- Paths: `/openai/deployments/{deployment}/{chat/completions|completions|embeddings}?api-version=…`,
  and the v1 API's `/openai/v1/{route}` with the deployment named by the body's `model`.
- Auth: the `api-key` header, or `Authorization: Bearer <Entra ID token>`; else Azure's 401.
- A missing api-version is Azure's 404 "Resource not found", an unknown one its 400, an unknown
  deployment its 404 `DeploymentNotFound`.
- Answers name the deployment's model (not the deployment) and carry `prompt_filter_results` and
  each choice's `content_filter_results`; a stream starts with Azure's chunk of prompt filter
  results and no choices. Headers: `apim-request-id`, `x-ms-region`.
- On demand: `fail_status` (Azure's error body; 429 with `retry-after`), `content_filter` (the 400
  with code `content_filter` and the `innererror` verdict a filtered prompt gets).
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from tests.fakes.delegate import Receive, Reshape, Scope, Send, delegate, read_request, send_error
from tests.fakes.serving import Served, serve_in_thread
from tests.fakes.upstream import FakeUpstream, RecordedRequest

AZURE_KEY = "azure-fake-key-0123456789abcdef"
API_VERSIONS = frozenset({"2024-02-01", "2024-06-01", "2024-10-21", "2025-01-01-preview"})
# Deployment name → the model it serves (named as the model, as Azure's portal suggests).
DEPLOYMENTS = {m: m for m in ("gpt-35-turbo", "gpt-4o-mini", "text-embedding-3-small")}
_ROUTES = ("/chat/completions", "/completions", "/embeddings")
_DEPLOYMENT_PATH = re.compile(r"/openai/deployments/([^/]+)(/chat/completions|/completions|/embeddings)")

FILTERED_MESSAGE = (
    "The response was filtered due to the prompt triggering Azure OpenAI's content management policy. "
    "Please modify your prompt and retry. To learn more about our content filtering policies please read our "
    "documentation: https://go.microsoft.com/fwlink/?linkid=2198766"
)
SAFE = {"filtered": False, "severity": "safe"}
VERDICT_HATE = {
    "hate": {"filtered": True, "severity": "high"},
    "jailbreak": {"filtered": False, "detected": False},
    "self_harm": SAFE,
    "sexual": SAFE,
    "violence": SAFE,
}
_PROMPT_FILTER = [{"prompt_index": 0, "content_filter_results": {k: SAFE for k in ("hate", "self_harm", "sexual", "violence")}}]  # fmt: skip


def azure_error(code: str, message: str) -> dict[str, Any]:
    """Azure's own error body: a code and a message, no `type`."""
    return {"error": {"code": code, "message": message}}


def content_filter_error() -> dict[str, Any]:
    return {
        "error": {
            "message": FILTERED_MESSAGE,
            "type": None,
            "param": "prompt",
            "code": "content_filter",
            "status": 400,
            "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": VERDICT_HATE},
        }
    }


class _Refused(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(status)
        self.status, self.body = status, body


class _AzureShape(Reshape):
    def json(self, payload: dict[str, Any]) -> dict[str, Any]:
        if payload.get("object") == "list":  # embeddings carry no filter results
            return payload
        for choice in payload.get("choices", []):
            choice["content_filter_results"] = {k: SAFE for k in ("hate", "self_harm", "sexual", "violence")}
        return {"prompt_filter_results": _PROMPT_FILTER, **payload}

    def events(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        first = {"choices": [], "created": 0, "id": "", "model": "", "object": "", "prompt_filter_results": _PROMPT_FILTER}
        return [first, *events]

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"apim-request-id", str(uuid.uuid4()).encode()), (b"x-ms-region", b"Sweden Central")]


@dataclass(eq=False)
class FakeAzure:
    """Raw ASGI app; tests flip the control attributes between requests (`reset()` clears them)."""

    api_key: str = AZURE_KEY
    ad_token: str | None = None  # an Entra ID token accepted as a bearer token
    deployments: dict[str, str] = field(default_factory=lambda: dict(DEPLOYMENTS))
    fail_status: int | None = None
    content_filter: bool = False
    inner: FakeUpstream = field(default_factory=FakeUpstream)
    requests: list[RecordedRequest] = field(default_factory=list)

    def reset(self) -> None:
        self.fail_status, self.content_filter, self.ad_token = None, False, None
        self.requests.clear()
        self.inner.reset()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = await read_request(scope, receive)
        self.requests.append(request)
        if request.headers.get("api-key") != self.api_key and (
            self.ad_token is None or request.headers.get("authorization") != f"Bearer {self.ad_token}"
        ):
            message = (
                "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid "
                "key for an active subscription and use a correct regional API endpoint for your resource."
            )
            await send_error(send, 401, azure_error("401", message))
            return
        try:
            deployment, route = self._route(request)
        except _Refused as refused:
            await send_error(send, refused.status, refused.body)
            return
        if self.fail_status is not None:
            await self._fail(send, self.fail_status)
            return
        if self.content_filter:
            await send_error(send, 400, content_filter_error())
            return
        body = dict(request.json) if isinstance(request.json, dict) else {}
        body["model"] = self.deployments[deployment]  # Azure answers with the deployment's model
        await delegate(self.inner, scope, request, route, body, _AzureShape(), send)

    def _route(self, request: RecordedRequest) -> tuple[str, str]:
        """(deployment, OpenAI route); `_Refused` with Azure's error for a request Azure refuses."""
        not_found = _Refused(404, azure_error("404", "Resource not found"))
        if request.method != "POST":
            raise not_found
        if request.path.startswith("/openai/v1/"):
            route = request.path.removeprefix("/openai/v1")
            model = request.json.get("model") if isinstance(request.json, dict) else None
            if route not in _ROUTES:
                raise not_found
            return self._known(str(model), route)
        matched = _DEPLOYMENT_PATH.fullmatch(request.path)
        if matched is None:
            raise not_found
        versions = parse_qs(request.query).get("api-version", [])
        if not versions:
            raise not_found
        if versions[0] not in API_VERSIONS:
            raise _Refused(400, azure_error("BadRequest", "API version not supported"))
        return self._known(matched[1], matched[2])

    def _known(self, deployment: str, route: str) -> tuple[str, str]:
        if deployment not in self.deployments:
            message = (
                "The API deployment for this resource does not exist. If you created the deployment within the "
                "last 5 minutes, please wait a moment and try again."
            )
            raise _Refused(404, azure_error("DeploymentNotFound", message))
        return deployment, route

    async def _fail(self, send: Send, status: int) -> None:
        if status == 429:
            message = (
                "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have "
                "exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 6 seconds."
            )
            await send_error(send, 429, azure_error("429", message), [(b"retry-after", b"6")])
            return
        code = {500: "InternalServerError", 503: "ServiceUnavailable"}.get(status, str(status))
        await send_error(send, status, azure_error(code, f"Fake Azure failure (status {status})"))


@dataclass
class RunningAzure(Served[FakeAzure]):
    @property
    def base_url(self) -> str:
        """The resource's endpoint, as `api_base` takes it (`https://<resource>.openai.azure.com`)."""
        return self.root_url


@contextlib.contextmanager
def run_fake_azure(app: FakeAzure | None = None) -> Iterator[RunningAzure]:
    app = app or FakeAzure()
    with serve_in_thread(app, "fake-azure", what="fake Azure") as served:
        yield RunningAzure(app, served.port, served.server, served.thread)
