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

It also answers the reads `spendledger reconcile --against-lago` and the webhook receiver make, as
the full schema (`/work/shared/lago-openapi/openapi.yaml`) has them: `GET /api/v1/events/{transaction_id}`
(`Event`, the first event found with that id; 404 `event_not_found`), `GET /api/v1/events`
(`EventsPaginated`, by `external_subscription_id` and `code`), `GET /api/v1/customers/{id}/current_usage`
(`CustomerUsage`: a calendar month in UTC, one `charges_usage` item per billable metric code with its
`events_count`; 404 `no_active_subscription` for `no_subscription`) and `GET /api/v1/webhooks/json_public_key`
(`WebhookPublicKey`: base64 of the PEM). `events_errors_webhook` builds the `events.errors` webhook Lago
posts (`EventsErrorsObject`), signed as Lago signs: `hmac` (base64 HMAC-SHA256 of the body under the
organization's token) or `jwt` (RS256, the body in the `data` claim), with `X-Lago-Unique-Key`.

Request JSON is parsed with `parse_float=Decimal`, so the stored events keep `response_cost` etc. as
the exact decimal text that was sent.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import decimal
import hashlib
import hmac
import http
import json
import threading
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

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
    query: str = ""  # the query string, for GETs


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
    received: dict[tuple[str, str], float] = field(default_factory=dict)  # when each was accepted
    # external_subscription_ids with no active subscription: current_usage answers 404
    no_subscription: set[str] = field(default_factory=set)
    requests: list[RecordedRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._initial_api_key = self.api_key
        self._lock = threading.RLock()
        self._stopping = False
        # The organization's webhook signing keys: RS256 for jwt, a token for hmac (Lago's own).
        self.private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.hmac_key = "lago-hmac-" + uuid.uuid4().hex

    def reset(self) -> None:
        """Restore the constructor's api_key and default controls; forget events and requests (same objects)."""
        with self._lock:
            self.api_key = self._initial_api_key
            self.down, self.fail_status, self.retry_after_s, self.delay_s = False, None, 1, 0.0
            self.reject_transaction_ids.clear()
            self.strict_properties, self.report_all_duplicates = True, True
            self.accepted.clear()
            self.received.clear()
            self.no_subscription.clear()
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
            scope["method"], scope["path"], headers, raw, parsed, received_at=time.time(),
            query=scope.get("query_string", b"").decode("latin-1"),
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
        if record.method == "GET":
            return self._read(record)
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
        self.received[key] = received_at
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
            self.received[(event["external_subscription_id"], event["transaction_id"])] = received_at
        return _json_reply(200, {"events": [event_object(e, received_at) for e in events]})


    # --- reads: what reconcile --against-lago and the webhook receiver ask ---

    def _read(self, record: RecordedRequest) -> _Reply:
        path = record.path.removeprefix("/api/v1")
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(record.query).items()}
        if path == "/webhooks/json_public_key":
            return _json_reply(200, {"webhook": {"public_key": self.public_key_base64()}})
        if path == "/events":
            return self._list(query)
        if path.startswith("/events/"):
            wanted = urllib.parse.unquote(path.removeprefix("/events/"))
            for key, event in self.accepted.items():  # the first found, as Lago's doc says
                if key[1] == wanted:
                    return _json_reply(200, {"event": event_object(event, self.received.get(key, 0.0))})
            return _json_reply(404, {"status": 404, "error": "Not Found", "code": "event_not_found"})
        if path.startswith("/customers/") and path.endswith("/current_usage"):
            customer = urllib.parse.unquote(path.removeprefix("/customers/").removesuffix("/current_usage"))
            return self._current_usage(customer, query.get("external_subscription_id", ""))
        return _json_reply(404, not_found_body())

    def _list(self, query: dict[str, str]) -> _Reply:
        """`GET /events`: filtered by subscription and code, paginated (per_page at most 100)."""
        page, per_page = max(1, int(query.get("page", "1"))), min(100, max(1, int(query.get("per_page", "20"))))
        found = [
            event_object(event, self.received.get(key, 0.0))
            for key, event in self.accepted.items()
            if key[0] == query.get("external_subscription_id", key[0]) and event["code"] == query.get("code", event["code"])
        ]
        pages = max(1, -(-len(found) // per_page))
        meta = {
            "current_page": page, "next_page": page + 1 if page < pages else None,
            "prev_page": page - 1 if page > 1 else None, "total_pages": pages, "total_count": len(found),
        }  # fmt: skip
        return _json_reply(200, {"events": found[(page - 1) * per_page : page * per_page], "meta": meta})

    def _current_usage(self, customer: str, subscription: str) -> _Reply:
        """The subscription's current period (a calendar month in UTC, as a monthly plan from the
        1st): per billable metric code, its events and their `total_tokens` summed as units."""
        if subscription in self.no_subscription or not subscription:
            return _json_reply(404, {"status": 404, "error": "Not Found", "code": "no_active_subscription"})
        now = dt.datetime.now(dt.UTC)
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (start + dt.timedelta(days=32)).replace(day=1) - dt.timedelta(seconds=1)
        by_code: dict[str, list[dict[str, Any]]] = {}
        for key, event in self.accepted.items():
            seconds = timestamp_seconds(event.get("timestamp")) or self.received.get(key, 0.0)
            if key[0] == subscription and start.timestamp() <= seconds <= end.timestamp():
                by_code.setdefault(event["code"], []).append(event)
        charges = [
            {
                "units": str(sum(decimal.Decimal(str(e.get("properties", {}).get("total_tokens", 0))) for e in events)),
                "total_aggregated_units": "0", "events_count": len(events), "amount_cents": 0,
                "amount_currency": "USD", "charge": {"lago_id": str(uuid.uuid4()), "charge_model": "standard"},
                "billable_metric": {"lago_id": str(uuid.uuid4()), "name": code, "code": code, "aggregation_type": "sum_agg"},
                "filters": [], "grouped_usage": [],
            }
            for code, events in by_code.items()
        ]  # fmt: skip
        usage = {
            "from_datetime": start.isoformat().replace("+00:00", "Z"), "to_datetime": end.isoformat().replace("+00:00", "Z"),
            "issuing_date": (end + dt.timedelta(seconds=1)).date().isoformat(), "currency": "USD",
            "amount_cents": 0, "taxes_amount_cents": 0, "total_amount_cents": 0, "charges_usage": charges,
        }  # fmt: skip
        return _json_reply(200, {"customer_usage": usage})

    # --- webhooks, signed as Lago signs them ---

    def public_key_base64(self) -> str:
        """The public key as Lago serves it: base64 of its PEM, at 60 columns (Ruby's encode64)."""
        pem = self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        encoded = base64.b64encode(pem).decode()
        return "\n".join(encoded[i : i + 60] for i in range(0, len(encoded), 60)) + "\n"

    def events_errors_webhook(
        self, errors: dict[str, list[str]], algorithm: str = "hmac", unique_key: str | None = None
    ) -> tuple[bytes, dict[str, str]]:
        """An `events.errors` webhook (body, headers) as Lago posts it to an endpoint."""
        body = json.dumps({
            "webhook_type": "events.errors", "object_type": "events_errors",
            "organization_id": str(uuid.uuid4()),
            "events_errors": {name: errors.get(name, []) for name in (
                "invalid_code", "missing_aggregation_property", "invalid_filter_values", "missing_group_key")},
        }).encode()  # fmt: skip
        return body, self.signed_headers(body, algorithm, unique_key)

    def signed_headers(self, body: bytes, algorithm: str = "hmac", unique_key: str | None = None) -> dict[str, str]:
        if algorithm == "hmac":
            signature = base64.b64encode(hmac.new(self.hmac_key.encode(), body, hashlib.sha256).digest()).decode()
        else:
            claims = {"data": body.decode(), "iss": "http://lago.test"}
            signature = jwt.encode(claims, self.private_key, algorithm="RS256")
        return {
            "Content-Type": "application/json",
            "X-Lago-Signature": signature,
            "X-Lago-Signature-Algorithm": algorithm,
            "X-Lago-Unique-Key": unique_key or str(uuid.uuid4()),
        }


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
