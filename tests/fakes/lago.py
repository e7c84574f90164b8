"""A fake Lago (usage-based billing) events API for end-to-end tests of the ledger's delivery.

It answers `POST /api/v1/events` and `POST /api/v1/events/batch` the way Lago does. What the shapes
are based on:

* Request/response schemas and error bodies: `/work/shared/lago-openapi/lago-events-subset.openapi.yaml`
  (`EventInput`, `EventBatchInput`, `EventInputObject`, `EventCreated`, `EventsCreated`,
  `ApiErrorUnauthorized` = `{"status": 401, "error": "Unauthorized"}`, `ApiErrorBadRequest`,
  `ApiErrorUnprocessableEntity` = `{"status": 422, "error": ..., "code": ..., "error_details": {}}`).
  The schema leaves `error_details` as a free object, so its content follows the Lago API source
  (getlago/lago-api): `ApiErrors#validation_errors` renders
  `{"status": 422, "error": "Unprocessable Entity", "code": "validation_errors", "error_details": ...}`;
  `Events::CreateService` answers a duplicate with `error_details = {"transaction_id": ["value_already_exist"]}`;
  `Events::CreateBatchService` answers `{"events": ["no_events"]}` / `{"events": ["too_many_events"]}`
  (more than 100, `LAGO_EVENTS_BATCH_MAX_LENGTH`), and per-item errors keyed by the item's index
  (JSON object keys are strings: `{"0": {"transaction_id": ["value_already_exist"]}}`); the ActiveRecord
  messages are Lago's codes (`value_is_mandatory` for blank, `invalid_format` for a bad timestamp).
* Batch semantics, also from `Events::CreateBatchService` on the Postgres event store: every item is
  validated first and *all* invalid indexes are reported; only when none is invalid are the events
  saved in one transaction, and a duplicate (unique index on
  organization, external_subscription_id, transaction_id) rolls the whole batch back and is reported
  under its index. Validation errors therefore hide duplicates in the same batch. Nothing of a
  rejected batch is stored. (Real Postgres aborts the transaction at the first violation; set
  `report_all_duplicates = False` to report only the first duplicate index.)
* Validation is the schema's: `transaction_id`, `external_subscription_id`, `code` required strings;
  `timestamp` optional integer/decimal number or numeric string (Lago does `Float(timestamp)`);
  `properties` optional object whose values are strings, integers or decimals (the spec's
  `oneOf [string, integer, number]` wrongly rejects integers under strict JSON Schema: both are
  accepted here); `precise_total_amount_cents` optional string or null. Extra keys such as
  `external_customer_id` are ignored, as Lago's strong parameters drop them.
* Poison items (`reject_transaction_ids`) get `POISON_ERROR` = `{"properties": ["value_is_invalid"]}`,
  a non-dedupe error, under their index.

Request JSON is parsed with `parse_float=Decimal`, so the stored events keep `response_cost` etc. as
the exact decimal text that was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import decimal
import http
import json
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

from tests.fakes.serving import Served, serve_in_thread

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

DEFAULT_API_KEY = "lago-test-api-key"
EVENTS_PATH = "/api/v1/events"
BATCH_PATH = "/api/v1/events/batch"
BATCH_MAX_LENGTH = 100
POISON_ERROR: dict[str, list[str]] = {"properties": ["value_is_invalid"]}
DUPLICATE_ERROR: dict[str, list[str]] = {"transaction_id": ["value_already_exist"]}
DOWN_BODY = (
    b"<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n<body>\r\n"
    b"<center><h1>503 Service Temporarily Unavailable</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)

_ENCODER = msgspec.json.Encoder(decimal_format="number")
_REQUIRED_STRINGS = ("transaction_id", "external_subscription_id", "code")


# --- Lago's error bodies ---


def unauthorized_body() -> dict[str, Any]:
    return {"status": 401, "error": "Unauthorized"}


def bad_request_body(message: str) -> dict[str, Any]:
    return {"status": 400, "error": f"BadRequest: {message}"}


def not_found_body() -> dict[str, Any]:
    return {"status": 404, "error": "Not Found", "code": "resource_not_found"}


def validation_error_body(error_details: dict[str, Any]) -> dict[str, Any]:
    """Lago's 422: `error_details` is `{field: [codes]}` (single) or `{"<index>": {field: [codes]}}` (batch)."""
    return {
        "status": 422,
        "error": "Unprocessable Entity",
        "code": "validation_errors",
        "error_details": error_details,
    }


# --- parsing and validation ---


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON constant {name}")


def parse_json(raw: bytes) -> Any:
    """JSON with decimals kept exact (`Decimal`), NaN/Infinity refused."""
    return json.loads(raw, parse_float=decimal.Decimal, parse_constant=_reject_constant)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, decimal.Decimal) and value.is_finite()


def timestamp_seconds(value: Any) -> float | None:
    """Unix seconds of a valid `timestamp` (None when absent); ValueError when Lago would say `invalid_format`."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            number = decimal.Decimal(value.strip())
        except decimal.InvalidOperation as exc:
            raise ValueError(value) from exc
    elif _is_number(value):
        number = decimal.Decimal(value)
    else:
        raise ValueError(value)
    if not number.is_finite():
        raise ValueError(value)
    seconds = float(number)
    try:
        dt.datetime.fromtimestamp(seconds, tz=dt.UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise ValueError(value) from exc
    return seconds


def _valid_properties(properties: Any, strict: bool) -> bool:
    if not isinstance(properties, dict):
        return False
    return not strict or all(isinstance(v, str) or _is_number(v) for v in properties.values())


def validate_event(event: Any, strict_properties: bool = True) -> dict[str, list[str]]:
    """Lago's per-event errors (`{field: [codes]}`, empty when valid); the poison check is separate."""
    if not isinstance(event, dict):
        event = {}
    errors: dict[str, list[str]] = {}
    for name in _REQUIRED_STRINGS:
        value = event.get(name)
        if value is None or value == "":
            errors[name] = ["value_is_mandatory"]
        elif not isinstance(value, str):
            errors[name] = ["value_is_invalid"]
    try:
        timestamp_seconds(event.get("timestamp"))
    except ValueError:
        errors["timestamp"] = ["invalid_format"]
    properties = event.get("properties")
    if properties is not None and not _valid_properties(properties, strict_properties):
        errors["properties"] = ["value_is_invalid"]
    precise = event.get("precise_total_amount_cents")
    if precise is not None and not isinstance(precise, str):
        errors["precise_total_amount_cents"] = ["value_is_invalid"]
    return errors


def _iso(seconds: float, timespec: str = "milliseconds") -> str:
    moment = dt.datetime.fromtimestamp(seconds, tz=dt.UTC)
    return moment.isoformat(timespec=timespec).replace("+00:00", "Z")


def event_object(event: dict[str, Any], received_at: float) -> dict[str, Any]:
    """The `EventObject` Lago answers for a created event (`lago_customer_id` is always null there)."""
    seconds = timestamp_seconds(event.get("timestamp"))
    return {
        "lago_id": str(uuid.uuid4()),
        "transaction_id": event["transaction_id"],
        "lago_customer_id": None,
        "code": event["code"],
        "timestamp": _iso(received_at if seconds is None else seconds),
        "precise_total_amount_cents": event.get("precise_total_amount_cents"),
        "properties": event.get("properties") or {},
        "lago_subscription_id": None,
        "external_subscription_id": event["external_subscription_id"],
        "created_at": _iso(received_at, "seconds"),
    }


# --- the app ---


@dataclass
class RecordedRequest:
    """One request as the fake saw it; `status` is what it answered (set before any `delay_s`)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any
    status: int | None = None
    received_at: float = 0.0


@dataclass
class _Reply:
    status: int
    body: bytes
    content_type: bytes = b"application/json"
    extra_headers: list[tuple[bytes, bytes]] = field(default_factory=list)


def _json_reply(status: int, payload: Any, extra: list[tuple[bytes, bytes]] | None = None) -> _Reply:
    return _Reply(status, _ENCODER.encode(payload), extra_headers=extra or [])


@dataclass(eq=False)
class FakeLago:
    """Raw ASGI app; tests flip the plain control attributes between (or during) requests.

    Controls: `api_key` (change it to simulate a revoked key), `down` (503 HTML from the "load balancer"),
    `fail_status` (answer that status without processing; 429/503 carry `Retry-After: retry_after_s`),
    `delay_s` (process and store first, answer late: "sent but not acknowledged"),
    `reject_transaction_ids` (poison items), `strict_properties`, `report_all_duplicates`.
    """

    api_key: str = DEFAULT_API_KEY
    down: bool = False
    fail_status: int | None = None
    retry_after_s: int = 1
    delay_s: float = 0.0
    reject_transaction_ids: set[str] = field(default_factory=set)
    strict_properties: bool = True
    report_all_duplicates: bool = True
    accepted: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._initial_api_key = self.api_key
        self._lock = threading.RLock()
        self._stopping = False

    def reset(self) -> None:
        """Restore the constructor's api_key and default controls; forget events and requests (same objects)."""
        with self._lock:
            self.api_key = self._initial_api_key
            self.down, self.fail_status, self.retry_after_s, self.delay_s = False, None, 1, 0.0
            self.reject_transaction_ids.clear()
            self.strict_properties, self.report_all_duplicates = True, True
            self.accepted.clear()
            self.requests.clear()

    # helpers for assertions

    def events_for(self, subscription_id: str) -> list[dict[str, Any]]:
        """Accepted events of one external_subscription_id, in acceptance order."""
        with self._lock:
            return [e for (sub, _), e in self.accepted.items() if sub == subscription_id]

    def accepted_transaction_ids(self) -> list[str]:
        """transaction_id of every accepted event, in acceptance order."""
        with self._lock:
            return [tid for _, tid in self.accepted]

    def event_requests(self) -> list[RecordedRequest]:
        """Recorded POSTs to the two events endpoints."""
        with self._lock:
            return [r for r in self.requests if r.method == "POST" and r.path in (EVENTS_PATH, BATCH_PATH)]

    # ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        parse_error: str | None = None
        parsed: Any = None
        if raw:
            try:
                parsed = parse_json(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                parse_error = str(exc)
        record = RecordedRequest(
            scope["method"], scope["path"], headers, raw, parsed, received_at=time.time()
        )
        with self._lock:
            self.requests.append(record)
            reply = self._handle(record, parse_error)
            record.status = reply.status
        await self._sleep(self.delay_s)
        await send(
            {
                "type": "http.response.start",
                "status": reply.status,
                "headers": [
                    (b"content-type", reply.content_type),
                    (b"content-length", str(len(reply.body)).encode()),
                    *reply.extra_headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": reply.body})

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but give up early when the server is shutting down."""
        deadline = time.monotonic() + seconds
        for _ in range(int(seconds / 0.05) + 2):
            left = deadline - time.monotonic()
            if self._stopping or left <= 0:
                return
            await asyncio.sleep(min(left, 0.05))

    def _handle(self, record: RecordedRequest, parse_error: str | None) -> _Reply:
        if self.down:
            return _Reply(503, DOWN_BODY, content_type=b"text/html")
        if self.fail_status is not None:
            status = self.fail_status
            try:
                phrase = http.HTTPStatus(status).phrase
            except ValueError:
                phrase = "Error"
            extra = [(b"retry-after", str(self.retry_after_s).encode())] if status in (429, 503) else []
            return _json_reply(status, {"status": status, "error": phrase}, extra)
        if not self._authorized(record.headers.get("authorization", "")):
            return _json_reply(401, unauthorized_body())
        if record.method != "POST" or record.path not in (EVENTS_PATH, BATCH_PATH):
            return _json_reply(404, not_found_body())
        if parse_error is not None:
            return _json_reply(
                400, bad_request_body(f"Error occurred while parsing request parameters: {parse_error}")
            )
        if record.path == EVENTS_PATH:
            return self._create(record.json, record.received_at)
        return self._batch(record.json, record.received_at)

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and bool(token.strip()) and token.strip() == self.api_key

    def _item_errors(self, event: Any) -> dict[str, list[str]]:
        errors = validate_event(event, self.strict_properties)
        if isinstance(event, dict) and event.get("transaction_id") in self.reject_transaction_ids:
            for name, codes in POISON_ERROR.items():
                errors.setdefault(name, [])
                errors[name] += [c for c in codes if c not in errors[name]]
        return errors

    def _create(self, body: Any, received_at: float) -> _Reply:
        event = body.get("event") if isinstance(body, dict) else None
        if not isinstance(event, dict) or not event:
            return _json_reply(400, bad_request_body("param is missing or the value is empty: event"))
        errors = self._item_errors(event)
        if errors:
            return _json_reply(422, validation_error_body(errors))
        key = (event["external_subscription_id"], event["transaction_id"])
        if key in self.accepted:
            return _json_reply(422, validation_error_body(dict(DUPLICATE_ERROR)))
        self.accepted[key] = event
        return _json_reply(200, {"event": event_object(event, received_at)})

    def _batch(self, body: Any, received_at: float) -> _Reply:
        events = body.get("events") if isinstance(body, dict) else None
        if not isinstance(events, list) or not events:
            return _json_reply(422, validation_error_body({"events": ["no_events"]}))
        if len(events) > BATCH_MAX_LENGTH:
            return _json_reply(422, validation_error_body({"events": ["too_many_events"]}))
        invalid = {str(i): errs for i, event in enumerate(events) if (errs := self._item_errors(event))}
        if invalid:
            return _json_reply(422, validation_error_body(invalid))
        duplicates: dict[str, Any] = {}
        seen: set[tuple[str, str]] = set()
        for i, event in enumerate(events):
            key = (event["external_subscription_id"], event["transaction_id"])
            if key in self.accepted or key in seen:
                duplicates[str(i)] = dict(DUPLICATE_ERROR)
                if not self.report_all_duplicates:
                    break
            seen.add(key)
        if duplicates:
            return _json_reply(422, validation_error_body(duplicates))
        for event in events:
            self.accepted[(event["external_subscription_id"], event["transaction_id"])] = event
        return _json_reply(200, {"events": [event_object(e, received_at) for e in events]})


# --- runner ---


@dataclass
class RunningLago(Served[FakeLago]):
    """Handle on a served FakeLago: point `LAGO_API_BASE` at `base_url`."""

    @property
    def base_url(self) -> str:
        return self.root_url


@contextlib.contextmanager
def run_fake_lago(app: FakeLago | None = None, startup_timeout_s: float = 10.0) -> Iterator[RunningLago]:
    """Serve `app` with uvicorn in a background thread on a free 127.0.0.1 port; stop it on exit.

    The socket is bound here and handed to uvicorn, so there is no pick-a-port race.
    """
    fake = app or FakeLago()
    fake._stopping = False

    def stopping() -> None:  # delayed answers give up at once, so shutdown need not wait for them
        fake._stopping = True

    with serve_in_thread(fake, "fake-lago", startup_timeout_s, what="fake Lago", on_stop=stopping) as served:
        yield RunningLago(fake, served.port, served.server, served.thread)
