"""The Messages API's request format, as msgspec Structs, and how to reach it (path, headers).

Only the fields the translation writes are declared; every optional one is UNSET unless set, so
the body sent holds no nulls (Anthropic refuses `null` where a field may only be absent).
"""

from __future__ import annotations

from typing import Final

import msgspec
from msgspec import UNSET, Raw, UnsetType

ANTHROPIC_VERSION: Final = "2023-06-01"
MESSAGES_PATH: Final = "/v1/messages"
# LiteLLM's default (`DEFAULT_ANTHROPIC_CHAT_MAX_TOKENS`, 4096) for a request that names no
# max_tokens: Anthropic requires one, OpenAI does not.
DEFAULT_MAX_TOKENS: Final = 4096


def messages_url(api_base: str) -> str:
    """The Messages endpoint under a deployment's `api_base`, spelled as LiteLLM users spell it:
    the host (`https://api.anthropic.com`), the host with `/v1`, or the full endpoint."""
    base = api_base.rstrip("/")
    if base.endswith(MESSAGES_PATH):
        return base
    if base.endswith("/v1"):
        return f"{base}/messages"
    return f"{base}{MESSAGES_PATH}"


def request_headers(api_key: str | None) -> dict[str, str]:
    """The headers of every Messages request: the key as `x-api-key` (never a bearer token)."""
    headers = {
        "content-type": "application/json",
        "accept": "application/json, text/event-stream",
        "anthropic-version": ANTHROPIC_VERSION,
    }
    if api_key:
        headers["x-api-key"] = api_key
    return headers


_NULL: Final = b"null"


def present(raw: Raw | UnsetType) -> Raw | UnsetType:
    """A JSON value as sent, or UNSET when it was absent or `null` (msgspec's `Raw` takes `null`
    as a value, and a `Raw | None` field cannot be declared)."""
    if raw is UNSET or bytes(raw) == _NULL:
        return UNSET
    return raw


class _Block(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """A content block; the subclass's tag is its `type`."""


class TextBlock(_Block, frozen=True, kw_only=True, tag="text"):
    text: str
    cache_control: Raw | UnsetType = UNSET


class Base64Source(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="base64"):
    media_type: str
    data: str


class UrlSource(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="url"):
    url: str


class ImageBlock(_Block, frozen=True, kw_only=True, tag="image"):
    source: Base64Source | UrlSource
    cache_control: Raw | UnsetType = UNSET


class DocumentBlock(_Block, frozen=True, kw_only=True, tag="document"):
    source: Base64Source | UrlSource
    cache_control: Raw | UnsetType = UNSET


class ToolUseBlock(_Block, frozen=True, kw_only=True, tag="tool_use"):
    id: str
    name: str
    input: Raw
    cache_control: Raw | UnsetType = UNSET


class ToolResultBlock(_Block, frozen=True, kw_only=True, tag="tool_result"):
    tool_use_id: str
    content: list[TextBlock | ImageBlock]
    cache_control: Raw | UnsetType = UNSET


Block = TextBlock | ImageBlock | DocumentBlock | ToolUseBlock | ToolResultBlock


class Message(msgspec.Struct, frozen=True, kw_only=True):
    role: str  # "user" or "assistant"
    content: list[Block]


class Tool(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str | UnsetType = UNSET
    input_schema: Raw
    cache_control: Raw | UnsetType = UNSET


class ToolChoice(msgspec.Struct, frozen=True, kw_only=True):
    type: str  # auto, any, tool, none
    name: str | UnsetType = UNSET
    disable_parallel_tool_use: bool | UnsetType = UNSET


class Metadata(msgspec.Struct, frozen=True, kw_only=True):
    user_id: str


class MessagesRequest(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    messages: list[Message]
    max_tokens: int
    system: list[TextBlock] | UnsetType = UNSET
    stop_sequences: list[str] | UnsetType = UNSET
    temperature: float | UnsetType = UNSET
    top_p: float | UnsetType = UNSET
    top_k: int | UnsetType = UNSET
    stream: bool | UnsetType = UNSET
    tools: list[Tool] | UnsetType = UNSET
    tool_choice: ToolChoice | UnsetType = UNSET
    metadata: Metadata | UnsetType = UNSET
    thinking: Raw | UnsetType = UNSET


encoder: Final = msgspec.json.Encoder()
