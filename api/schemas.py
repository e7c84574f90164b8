"""What the OpenAPI document (`/schema/openapi.json`) says the routes answer, where Litestar cannot
tell from the code: the one error envelope and the statuses each route answers with it, the headers
of those answers, bodies that are not JSON, and money as the JSON number it is sent as.

Responses are encoded by hand (api/jsonio.py: money a JSON number with its exact digits), so the
Structs that describe success bodies (in the route modules) are for the document only: a handler
annotated `-> Response[BudgetView]` still sends the bytes `json_response` made. The fuzz test
(tests/adversarial/test_openapi_fuzz.py) checks real answers against these descriptions, and
tests/unit/test_openapi_document.py that every operation has them.

A route declares what it answers with `**documented(...)`: the key it asks for (`COMPONENTS`'
bearer scheme), its error statuses from `ERRORS` (one description each, shared by every route), and
the operation class that adds their headers and the 200's other media types.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar, Final

import msgspec
from litestar.datastructures import ResponseHeader
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import (
    Components,
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    Operation,
    Schema,
    SecurityScheme,
)
from litestar.openapi.spec.enums import OpenAPIType
from litestar.plugins import OpenAPISchemaPlugin

if TYPE_CHECKING:
    from litestar._openapi.schema_generation import SchemaCreator
    from litestar.typing import FieldDefinition


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct):
    """Every error: `{"error": {"message", "type", "param", "code"}}` (api/errors.py)."""

    error: ErrorDetail


# What each status means, whichever route answers it.
_MEANINGS: Final[Mapping[int, str]] = {
    400: "Invalid request (`invalid_request_error`): malformed or non-UTF-8 JSON, a field of the wrong "
    "type or out of range, an id that breaks the id rule, a command the ledger refuses; `param` names "
    "the field. On the LLM routes also the provider's own 4xx, passed through in this envelope.",
    401: "No API key, or an unknown, expired, blocked or deleted one (`auth_error`); on the LLM routes "
    "also a model the key may not use (`key_model_access_denied`).",
    403: "The caller's role may not do this (`permission_denied`); on the LLM routes also a blocked "
    "customer (`customer_blocked`) or one the key may not serve.",
    404: "What the request names does not exist (`not_found`; on the LLM routes an unknown model, "
    "code `model_not_found`).",
    409: "Another change to the same object won the race (`conflict_error`): nothing was written; "
    "send it again.",
    413: "The request body is over `general_settings.max_request_size_mb` (`request_too_large`).",
    415: "A management request whose body is not sent as `Content-Type: application/json` "
    "(`unsupported_media_type`).",
    422: "The asked format cannot hold a value exactly (`not_representable`).",
    429: "A budget would be exceeded (`budget_exceeded`, header `x-should-retry: false`), or an rpm, "
    "tpm or parallel-request limit is reached (`rate_limit_exceeded`, headers `retry-after` and "
    "`x-ratelimit-*`); or the provider's own 429, passed through.",
    502: "The provider failed or answered something unusable (`upstream_error`).",
    503: "The ledger database is unreachable (`ledger_unavailable`): retry after `retry-after` seconds.",
    504: "The provider did not answer in time (`upstream_timeout`).",
}

ERRORS: Final[Mapping[int, ResponseSpec]] = {
    status: ResponseSpec(data_container=ErrorBody, description=meaning, generate_examples=False)
    for status, meaning in _MEANINGS.items()
}


def _header(description: str, required: bool = False) -> OpenAPIHeader:
    return OpenAPIHeader(schema=Schema(type=OpenAPIType.STRING), description=description, required=required)


# The headers of an error answer, by status (ResponseSpec has no place for them).
ERROR_HEADERS: Final[Mapping[str, Mapping[str, OpenAPIHeader]]] = {
    "429": {
        "retry-after": _header("Seconds until the limit allows a request again (rate limits)"),
        "x-should-retry": _header("`false` when a budget is exhausted: retrying will not help"),
        "x-ratelimit-remaining-requests": _header("Requests left in the current minute"),
        "x-ratelimit-remaining-tokens": _header("Tokens left in the current minute"),
    },
    "503": {"retry-after": _header("Seconds to wait before retrying", required=True)},
}


@dataclass
class DocumentedOperation(Operation):
    """An operation whose error answers carry their headers, and whose 200 may come in other media
    types besides JSON (`ALSO`, set by `documented(also=...)` on a subclass)."""

    ALSO: ClassVar[Mapping[str, Schema]] = {}

    def __post_init__(self) -> None:
        for status, response in (self.responses or {}).items():
            if not isinstance(response, OpenAPIResponse):
                continue
            if status in ERROR_HEADERS:
                response.headers = {**(response.headers or {}), **ERROR_HEADERS[status]}
            if status == "200" and self.ALSO and response.content is not None:
                response.content = {
                    **response.content,
                    **{media: OpenAPIMediaType(schema=schema) for media, schema in self.ALSO.items()},
                }


# Who is calling (api/auth.py): every route but the health ones asks for a key.
COMPONENTS: Final = Components(
    security_schemes={
        "api_key": SecurityScheme(
            type="http",
            scheme="bearer",
            description="The master key or a generated key (`sk-…`), as `Authorization: Bearer <key>` "
            "(also accepted: the `x-litellm-api-key` or `api-key` header)",
        )
    }
)


def documented(*statuses: int, also: Mapping[str, Schema] | None = None, keyless: bool = False) -> dict[str, Any]:
    """A route decorator's keyword arguments that document the key it asks for (none when
    `keyless`: a caller that signs instead, as Lago does), the errors it answers (each with the
    envelope, and the headers of 429 and 503) and, with `also`, the other media types of its 200."""
    operation: type[Operation] = DocumentedOperation
    if also:
        name = "DocumentedOperation_" + "_".join(sorted(also)).replace("/", "_")
        operation = type(name, (DocumentedOperation,), {"ALSO": dict(also)})
    documents: dict[str, Any] = {
        "responses": {status: ERRORS[status] for status in sorted(statuses)},
        "operation_class": operation,
    }
    if not keyless:
        documents["security"] = [{"api_key": []}]
    return documents


# The statuses of the management routes, composed per route (plus 404 where it names something):
# who may call (401, 403) and the database (503); a query or body that can be wrong (400); a JSON
# body, its size and media type (413, 415); a change, which can lose a race (409).
GUARDED: Final = (401, 403, 503)
READ: Final = (*GUARDED, 400)
BODY: Final = (*READ, 413, 415)
WRITE: Final = (*BODY, 409)


def text(description: str, binary: bool = False) -> Schema:
    """A body that is not JSON (NDJSON lines, CSV, Parquet, SSE events), described in words."""
    if binary:
        return Schema(
            type=OpenAPIType.STRING, content_media_type="application/octet-stream", description=description
        )
    return Schema(type=OpenAPIType.STRING, description=description)


def sse_events(data: str) -> Schema:
    """A Server-Sent Events body, described as OpenAPI 3.1 tools read `text/event-stream`: the schema
    of one event (3.2's `itemSchema`)."""
    return Schema(
        type=OpenAPIType.OBJECT,
        description="One Server-Sent Event",
        properties={
            "data": Schema(type=OpenAPIType.STRING, description=data),
            "event": Schema(type=OpenAPIType.STRING),
            "id": Schema(type=OpenAPIType.STRING),
        },
        required=["data"],
    )


def header(name: str, description: str) -> ResponseHeader:
    """A success response's header, for the document (the handler sets it)."""
    return ResponseHeader(name=name, value="", documentation_only=True, description=description)


class MoneyAsNumber(OpenAPISchemaPlugin):
    """`Decimal` is a JSON number: written with its exact digits (api/jsonio.py) and read as one
    (msgspec keeps every digit sent). Litestar's default would document a string."""

    def is_plugin_supported_field(self, field_definition: FieldDefinition) -> bool:
        return field_definition.annotation is Decimal

    def to_openapi_schema(self, field_definition: FieldDefinition, schema_creator: SchemaCreator) -> Schema:
        return Schema(type=OpenAPIType.NUMBER, description="An amount of money (USD): a JSON number, exact")
