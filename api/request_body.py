"""What the proxy reads of an OpenAI-style request body, and the body it forwards.

The body is hostile until validated. Everything that decides admission or billing is decoded here
with its constraints (token counts at least 1, `n` and `best_of` within the provider's range,
finite numbers, the customer id an id the ledger can store), and the body forwarded upstream is
exactly the body checked: a top-level key sent twice is refused, because we would read one copy
and a provider may read the other. The rest of the body is forwarded untouched (messages are
counted, never rewritten).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Annotated, Any, Final

import msgspec
from msgspec import Meta

from spendledger.api.errors import ApiError, bad_request
from spendledger.api.prompt_text import TEXT_PARTS, prompt_text_tokens
from spendledger.ledger.config import Deployment
from spendledger.ledger.events import Route
from spendledger.ledger.holds import RequestShape
from spendledger.ledger.identifiers import ID_RULE, is_identifier

CUSTOMER_HEADERS: Final = ("x-litellm-customer-id", "x-litellm-end-user-id")
_INCLUDE_USAGE: Final = msgspec.Raw(b'{"include_usage":true}')

Tokens = Annotated[int, Meta(ge=1, description="a number of tokens: at least 1")]
Finite = Annotated[float, Meta(ge=-sys.float_info.max, le=sys.float_info.max)]


class ContentPart(msgspec.Struct):
    type: str = "text"


class Message(msgspec.Struct):
    content: str | list[ContentPart] | None = None


class RequestHead(msgspec.Struct, kw_only=True):
    """The fields the proxy reads (and validates); the rest of the body is forwarded untouched."""

    model: str
    stream: bool = False
    user: str | None = None
    stream_options: dict[str, Any] | None = None
    max_tokens: Tokens | None = None
    max_completion_tokens: Tokens | None = None
    n: Annotated[int, Meta(ge=1, le=128)] | None = None  # OpenAI's range
    best_of: Annotated[int, Meta(ge=1, le=20)] | None = None  # /completions: generated and billed
    messages: list[Message] | None = None
    prompt: str | list[str | int | list[int]] | None = None
    temperature: Finite | None = None
    top_p: Finite | None = None
    presence_penalty: Finite | None = None
    frequency_penalty: Finite | None = None


_head_decoder: Final = msgspec.json.Decoder(RequestHead)
_fields_decoder: Final = msgspec.json.Decoder(dict[str, msgspec.Raw])
_encoder: Final = msgspec.json.Encoder()


class RequestBody(msgspec.Struct, frozen=True):
    """A decoded request: what it asks for, and its top-level fields as sent."""

    head: RequestHead
    fields: dict[str, msgspec.Raw]


def decode_body(body: bytes) -> RequestBody:
    """Decode and validate a request body, or raise the 400 that says what is wrong with it."""
    if not body.strip():
        raise bad_request("The request body is empty: send a JSON object with 'model'")
    try:
        body.decode()
    except UnicodeDecodeError:
        raise bad_request("The request body is not valid UTF-8") from None
    try:
        fields = _fields_decoder.decode(body)
        head = _head_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise _invalid(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise bad_request("The request body is nested too deeply") from None
    _refuse_duplicate_keys(body, fields)
    if not head.model:
        raise bad_request("The request body must name a 'model'", param="model")
    if head.user and not is_identifier(head.user):
        raise bad_request(f"'user' (the customer id) must be {ID_RULE}", param="user")
    return RequestBody(head, fields)


def _invalid(message: str) -> ApiError:
    if "missing required field `model`" in message:
        return bad_request("The request body must name a 'model'", param="model")
    param = message.rpartition("`$.")[2].rstrip("`").split(".")[0].split("[")[0] if "`$." in message else None
    return bad_request(f"Invalid request body: {message}", param=param)


def _refuse_duplicate_keys(body: bytes, fields: dict[str, msgspec.Raw]) -> None:
    """A body whose length is that of its fields encoded compactly holds each key once: msgspec
    writes the shortest encoding of every key and copies each value as sent, and a second copy of
    a key could only add bytes. Other bodies (with whitespace, or escapes in keys) are checked
    key by key."""
    if len(body) == len(_encoder.encode(fields)):
        return
    try:
        pairs = json.loads(body, object_pairs_hook=_top_level_keys)
    except (ValueError, RecursionError):
        raise bad_request("The request body is not valid JSON") from None
    seen: set[str] = set()
    for key in pairs:
        if key in seen:
            raise bad_request(f"The request body names {key!r} more than once", param=key)
        seen.add(key)


def _top_level_keys(pairs: list[tuple[str, Any]]) -> list[str]:
    return [key for key, _ in pairs]


def customer_of(head: RequestHead, headers: Mapping[str, str]) -> str | None:
    """The customer: the body's `user`, else the first customer header (an id, or a 400)."""
    if head.user:
        return head.user
    for name in CUSTOMER_HEADERS:
        value = headers.get(name)
        if value:
            if not is_identifier(value):
                raise bad_request(f"The header {name} (the customer id) must be {ID_RULE}", param=name)
            return value
    return None


def shape_of(route: Route, body: RequestBody) -> RequestShape:
    """What bounds the request's tokens (ledger/holds.py turns it into the hold)."""
    head = body.head
    text_tokens = prompt_text_tokens(body.fields)
    if route == "embeddings":
        # One vector per input, no output; the inputs' count is not read, so no context cap.
        return RequestShape(text_tokens=text_tokens, generates=False, bounded_by_context=False)
    media = 0
    for message in head.messages or ():
        if isinstance(message.content, list):
            media += sum(part.type not in TEXT_PARTS for part in message.content)
    completions = head.n or 1
    prompts = 1
    if route == "completions":
        completions = max(completions, head.best_of or 1)
        prompts = _prompt_count(head.prompt)
    output_cap = head.max_completion_tokens if head.max_completion_tokens is not None else head.max_tokens
    return RequestShape(
        text_tokens=text_tokens,
        media_parts=media,
        prompts=prompts,
        completions=completions,
        output_cap=output_cap,
    )


def _prompt_count(prompt: str | list[str | int | list[int]] | None) -> int:
    """A /completions prompt: one string, one token list, or a list of either (one each)."""
    if not isinstance(prompt, list) or not prompt or all(isinstance(item, int) for item in prompt):
        return 1
    return len(prompt)


def upstream_body(body: RequestBody, raw: bytes, deployment: Deployment) -> bytes:
    """The body to send upstream: the deployment's model name, and usage asked for on streams."""
    head = body.head
    if deployment.upstream_model == head.model and not (head.stream and not asks_usage(head)):
        return raw
    fields = dict(body.fields)
    fields["model"] = msgspec.Raw(_encoder.encode(deployment.upstream_model))
    if head.stream and not asks_usage(head):
        options = dict(head.stream_options or {})
        options["include_usage"] = True
        fields["stream_options"] = (
            msgspec.Raw(_encoder.encode(options)) if len(options) > 1 else _INCLUDE_USAGE
        )
    return _encoder.encode(fields)


def asks_usage(head: RequestHead) -> bool:
    return bool(head.stream_options and head.stream_options.get("include_usage"))
