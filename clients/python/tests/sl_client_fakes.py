"""Fakes for the client's tests: the usage-ingest API as the contract says, and an OpenAI upstream.

Both are real HTTP servers on 127.0.0.1 (the client is tested through its real httpx transport);
the ledger fake can be taken down and brought back on the same port.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = tuple[int, dict[str, str], bytes]


def envelope(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Reply:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": code, "param": None}}
    return status, dict(headers or {}), json.dumps(body).encode()


class _Server:
    """A ThreadingHTTPServer whose handler calls `self.handle(method, path, headers, body)`."""

    def __init__(self) -> None:
        self.port = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._connections: set[Any] = set()
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                outer._connections.add(self.connection)

            def finish(self) -> None:
                outer._connections.discard(self.connection)
                super().finish()

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                status, headers, body = outer.handle("POST", self.path, dict(self.headers), self.rfile.read(length))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if "content-type" not in {k.lower() for k in headers}:
                    self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        httpd.daemon_threads = True
        self.port = httpd.server_address[1]
        self._httpd = httpd
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()

    def down(self) -> None:
        """Connections are refused until `up()` (same port)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        # Kept-alive connections too: a client must not reach a server that is down.
        for connection in list(self._connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        raise NotImplementedError


@dataclass
class FakeLedger(_Server):
    """POST /usage and /usage/admit as the contract says: dedupe by call_id (a resend with other
    fields is a per-record conflict), per-record errors, whole-request errors on demand."""

    api_key: str = "sk-test"
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # call_id -> the record kept
    posts: list[list[dict[str, Any]]] = field(default_factory=list)  # every batch received
    outcomes: list[dict[str, Any]] = field(default_factory=list)  # every result answered
    admits: list[dict[str, Any]] = field(default_factory=list)
    scripted: list[Reply] = field(default_factory=list)  # answered (in order) before the contract's
    invalid_call_ids: set[str] = field(default_factory=set)  # a batch holding one is a 400
    admit_reply: Reply | None = None
    raw_bodies: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        _Server.__init__(self)

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        with self.lock:
            auth = {k.lower(): v for k, v in headers.items()}.get("authorization")
            if auth != f"Bearer {self.api_key}":
                return envelope(401, "invalid_api_key", "bad key")
            if self.scripted:
                return self.scripted.pop(0)
            payload = json.loads(body)
            if path == "/usage/admit":
                return self._admit(payload)
            if path == "/usage":
                self.raw_bodies.append(body)
                return self._usage(payload["records"])
            return envelope(404, "not_found", path)

    def _admit(self, payload: dict[str, Any]) -> Reply:
        self.admits.append(payload)
        if self.admit_reply is not None:
            return self.admit_reply
        hold = {"hold_id": f"hold-{uuid.uuid4()}", "expires_at": "2030-01-01T00:00:00+00:00"}
        return 200, {}, json.dumps(hold).encode()

    def _usage(self, records: list[dict[str, Any]]) -> Reply:
        if any(r["call_id"] in self.invalid_call_ids for r in records):
            return envelope(400, "invalid_record", "a record is invalid")
        self.posts.append(records)
        results = [self._one(r) for r in records]
        self.outcomes.extend(results)
        return 200, {}, json.dumps({"results": results}).encode()

    def _one(self, record: dict[str, Any]) -> dict[str, Any]:
        kept = self.records.get(record["call_id"])
        if kept is None:
            self.records[record["call_id"]] = record
            return {"call_id": record["call_id"], "outcome": "recorded", "cost": 0.25, "error": None}
        if kept == record:
            return {"call_id": record["call_id"], "outcome": "duplicate", "cost": 0.25, "error": None}
        error = {"message": "call_id seen with other fields", "type": "invalid_request_error", "code": "conflict", "param": "call_id"}
        return {"call_id": record["call_id"], "outcome": "error", "cost": None, "error": error}

    def received(self) -> list[str]:
        """Every call_id in every batch received, resends included."""
        with self.lock:
            return [r["call_id"] for batch in self.posts for r in batch]

    def wait_for(self, count: int, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.records) < count:
            assert time.monotonic() < deadline, f"{len(self.records)} of {count} records arrived"
            time.sleep(0.005)


def openai_reply(path: str, body: dict[str, Any]) -> Reply:
    """An OpenAI upstream: chat completions (streamed as SSE, with the usage chunk when
    include_usage is asked) and embeddings; model `boom` answers 500."""
    if body.get("model", "").endswith("boom"):
        return envelope(500, "server_error", "upstream exploded", {"x-request-id": "req-boom"})
    if path.endswith("/embeddings"):
        data = [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}]
        usage = {"prompt_tokens": 5, "total_tokens": 5}
        reply = {"object": "list", "data": data, "model": body["model"], "usage": usage}
        return 200, {"x-request-id": f"req-{uuid.uuid4()}"}, json.dumps(reply).encode()
    call_id = f"chatcmpl-{uuid.uuid4().hex}"
    usage = {
        "prompt_tokens": 11,
        "completion_tokens": 7,
        "total_tokens": 18,
        "prompt_tokens_details": {"cached_tokens": 3, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 2, "audio_tokens": 0},
    }
    if body.get("stream"):
        return 200, {"content-type": "text/event-stream"}, _sse(call_id, body, usage)
    message = {"role": "assistant", "content": "hello there"}
    reply = {
        "id": call_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": usage,
    }
    return 200, {}, json.dumps(reply).encode()


def _sse(call_id: str, body: dict[str, Any], usage: dict[str, Any]) -> bytes:
    base = {"id": call_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": body["model"]}
    chunks = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hel"}, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]},
    ]
    if (body.get("stream_options") or {}).get("include_usage"):
        chunks.append({**base, "choices": [], "usage": usage})
    lines = [f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]
    return "".join(lines).encode()


class FakeOpenAI(_Server):
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        super().__init__()

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        payload = json.loads(body)
        self.requests.append(payload)
        return openai_reply(path, payload)


def openai_handler(requests: list[dict[str, Any]]) -> Callable[[Any], Any]:
    """The same upstream as an httpx.MockTransport handler."""
    import httpx

    def handle(request: httpx.Request) -> httpx.Response:
        payload = json.loads(request.content)
        requests.append(payload)
        status, headers, body = openai_reply(request.url.path, payload)
        headers.setdefault("content-type", "application/json")
        return httpx.Response(status, headers=headers, content=body)

    return handle
