"""What Anthropic's Messages API checks in a request, and how the fake counts its tokens.

`check_request` refuses what the real API refuses (with its error types and messages of the same
form): a missing `x-api-key` or `anthropic-version`, a missing `max_tokens`, roles that do not
alternate or do not begin with the user, empty text, a `tool_result` that answers no `tool_use` of
the turn before (or a `tool_use` left unanswered), tool blocks without `tools`, fields the API does
not know, a temperature above 1, more than 4 cache breakpoints. Property tests call it directly.

Tokens are counted as the OpenAI fake counts them (words, MEDIA_PART_TOKENS per image or
document, 3 per message) so tests compute what to expect; prompt caching follows Anthropic's
rules: the prefix (tools, system, messages, in that order) up to a block marked `cache_control` is
written to the cache the first time it is seen and read from it after, if it is long enough.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from typing import Any, Final

import msgspec

from tests.fakes.upstream import MEDIA_PART_TOKENS, count_tokens

VERSIONS: Final = ("2023-06-01", "2023-01-01")
FIELDS: Final = frozenset({
    "model", "messages", "max_tokens", "system", "stop_sequences", "temperature", "top_p", "top_k",
    "stream", "tools", "tool_choice", "metadata", "thinking", "service_tier", "container", "mcp_servers",
})  # fmt: skip
IMAGE_TYPES: Final = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_TOOL_NAME: Final = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
_TOOL_ID: Final = re.compile(r"^[a-zA-Z0-9_-]+$")
MAX_CACHE_BREAKPOINTS: Final = 4
MESSAGE_OVERHEAD: Final = 3


class AnthropicError(Exception):
    """An error answer of the API's: status, its error type, its message."""

    def __init__(self, status: int, type_: str, message: str) -> None:
        super().__init__(message)
        self.status, self.type, self.message = status, type_, message


def invalid(message: str) -> AnthropicError:
    return AnthropicError(400, "invalid_request_error", message)


def check_headers(headers: dict[str, str], required_key: str | None) -> None:
    key = headers.get("x-api-key")
    if not key:
        raise AnthropicError(401, "authentication_error", "x-api-key header is required")
    if required_key is not None and key != required_key:
        raise AnthropicError(401, "authentication_error", "invalid x-api-key")
    version = headers.get("anthropic-version")
    if not version:
        raise invalid("anthropic-version: header is required")
    if version not in VERSIONS:
        raise invalid(f"anthropic-version: invalid version {version!r}")


def check_request(body: Any) -> None:
    """Raise the API's 400 for a request body it would refuse; return for one it would take."""
    if not isinstance(body, dict):
        raise invalid("There was an error parsing the body of your request")
    for key in body:
        if key not in FIELDS:
            raise invalid(f"{key}: Extra inputs are not permitted")
    for key in ("model", "max_tokens", "messages"):
        if key not in body:
            raise invalid(f"{key}: Field required")
    if not isinstance(body["model"], str) or not body["model"]:
        raise invalid("model: Input should be a valid string")
    max_tokens = body["max_tokens"]
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise invalid("max_tokens: Input should be greater than or equal to 1")
    _check_numbers(body)
    _check_system(body.get("system"))
    tool_names = _check_tools(body.get("tools"), body.get("tool_choice"))
    uses_tools = _check_messages(body["messages"])
    if uses_tools and not tool_names:
        raise invalid("Requests which include `tool_use` or `tool_result` blocks must define tools.")
    marked = sum(1 for block in _all_blocks(body) if isinstance(block, dict) and "cache_control" in block)
    if marked > MAX_CACHE_BREAKPOINTS:
        raise invalid(f"A maximum of {MAX_CACHE_BREAKPOINTS} blocks with cache_control may be provided. Found {marked}.")


def _check_numbers(body: dict[str, Any]) -> None:
    for key, top in (("temperature", 1.0), ("top_p", 1.0)):
        value = body.get(key)
        if value is not None and (not isinstance(value, int | float) or not 0 <= value <= top):
            raise invalid(f"{key}: Input should be less than or equal to {top:g}")
    stops = body.get("stop_sequences")
    if stops is not None and (
        not isinstance(stops, list) or not all(isinstance(s, str) and s.strip() for s in stops)
    ):
        raise invalid("stop_sequences: each stop sequence must contain non-whitespace")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise invalid("stream: Input should be a valid boolean")
    metadata = body.get("metadata")
    if metadata is not None and (not isinstance(metadata, dict) or set(metadata) - {"user_id"}):
        raise invalid("metadata: only user_id is permitted")
    thinking = body.get("thinking")
    if thinking is not None:
        budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
        if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled"):
            raise invalid("thinking.type: Input should be 'enabled' or 'disabled'")
        if thinking["type"] == "enabled" and (not isinstance(budget, int) or budget < 1024):
            raise invalid("thinking.enabled.budget_tokens: Input should be greater than or equal to 1024")
        if thinking["type"] == "enabled" and budget >= body["max_tokens"]:
            raise invalid("`max_tokens` must be greater than `thinking.budget_tokens`")


def _check_system(system: Any) -> None:
    if system is None or isinstance(system, str):
        return
    if not isinstance(system, list):
        raise invalid("system: Input should be a valid string or list")
    for i, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise invalid(f"system.{i}: Input should be a text block")
        if not block["text"]:
            raise invalid("system: text content blocks must be non-empty")


def _check_tools(tools: Any, choice: Any) -> set[str]:
    names: set[str] = set()
    if tools is not None:
        if not isinstance(tools, list):
            raise invalid("tools: Input should be a valid list")
        for i, tool in enumerate(tools):
            name = tool.get("name") if isinstance(tool, dict) else None
            if not isinstance(name, str) or not _TOOL_NAME.match(name):
                raise invalid(f"tools.{i}.custom.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'")
            schema = tool.get("input_schema")
            if not isinstance(schema, dict) or schema.get("type") != "object":
                raise invalid(f"tools.{i}.custom.input_schema.type: Input should be 'object'")
            if name in names:
                raise invalid("tools: Tool names must be unique.")
            names.add(name)
    if choice is not None:
        kind = choice.get("type") if isinstance(choice, dict) else None
        if kind not in ("auto", "any", "tool", "none"):
            raise invalid("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
        if kind == "tool" and choice.get("name") not in names:
            raise invalid(f"tool_choice.name: no tool named {choice.get('name')!r} is defined")
        if kind != "auto" and kind != "none" and not names:
            raise invalid("tool_choice may only be specified while providing tools.")
    return names


def _check_messages(messages: Any) -> bool:
    """Check the turns; whether any carries tool blocks."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages: at least one message is required")
    uses_tools = False
    previous_uses: set[str] = set()
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            raise invalid(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        if i == 0 and role != "user":
            raise invalid('messages: first message must use the "user" role')
        if i and messages[i - 1].get("role") == role:
            raise invalid(f'messages: roles must alternate between "user" and "assistant", but found multiple "{role}" roles in a row')
        final_assistant = role == "assistant" and i == len(messages) - 1
        blocks = _blocks(message.get("content"), i, final_assistant)
        uses, answers = _check_blocks(blocks, i, role)
        uses_tools = uses_tools or bool(uses) or bool(answers)
        unexpected = answers - previous_uses
        if unexpected:
            raise invalid(
                f"messages.{i}.content: unexpected `tool_use_id` found in `tool_result` blocks: {sorted(unexpected)[0]}. "
                "Each `tool_result` block must have a corresponding `tool_use` block in the previous message."
            )
        if role == "user" and previous_uses - answers:
            raise invalid(
                f"messages.{i - 1}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                f"{sorted(previous_uses - answers)[0]}. Each `tool_use` block must have a corresponding "
                "`tool_result` block in the next message."
            )
        previous_uses = uses
        if final_assistant and blocks and blocks[-1].get("type") == "text" and blocks[-1]["text"] != blocks[-1]["text"].rstrip():
            raise invalid("messages: final assistant content cannot end with trailing whitespace")
    return uses_tools


def _blocks(content: Any, i: int, final_assistant: bool) -> list[dict[str, Any]]:
    if isinstance(content, str):
        content = [{"type": "text", "text": content}] if content or not final_assistant else []
    if not isinstance(content, list) or (not content and not final_assistant):
        raise invalid(f"messages.{i}: all messages must have non-empty content except for the optional final assistant message")
    if not all(isinstance(block, dict) for block in content):
        raise invalid(f"messages.{i}.content: Input should be a valid list of content blocks")
    return content


def _check_blocks(blocks: list[dict[str, Any]], i: int, role: str) -> tuple[set[str], set[str]]:
    """Check one turn's blocks; the ids of its tool uses and of the tool uses its results answer."""
    uses: set[str] = set()
    answers: set[str] = set()
    for j, block in enumerate(blocks):
        kind = block.get("type")
        where = f"messages.{i}.content.{j}"
        if kind == "text":
            if not isinstance(block.get("text"), str) or not block["text"]:
                raise invalid("messages: text content blocks must be non-empty")
            if not block["text"].strip():
                raise invalid("messages: text content blocks must contain non-whitespace text")
        elif kind in ("image", "document") and role == "user":
            _check_source(block.get("source"), kind, where)
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("id"), str) or not _TOOL_ID.match(block["id"]):
                raise invalid(f"{where}.tool_use.id: String should match pattern '^[a-zA-Z0-9_-]+$'")
            if not isinstance(block.get("input"), dict):
                raise invalid(f"{where}.tool_use.input: Input should be a valid dictionary")
            uses.add(block["id"])
        elif kind == "tool_result" and role == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise invalid(f"{where}.tool_result.tool_use_id: Field required")
            _check_result_content(block.get("content"), where)
            answers.add(block["tool_use_id"])
        else:
            raise invalid(f"{where}: a {role} message cannot hold a block of type {kind!r}")
    return uses, answers


def _check_source(source: Any, kind: str, where: str) -> None:
    source_type = source.get("type") if isinstance(source, dict) else None
    if source_type == "url" and isinstance(source.get("url"), str) and source["url"].startswith(("http://", "https://")):
        return
    if source_type != "base64" or not isinstance(source.get("data"), str):
        raise invalid(f"{where}.{kind}.source: Input tag {source_type!r} does not match any of the expected tags")
    allowed = IMAGE_TYPES if kind == "image" else {"application/pdf"}
    if source.get("media_type") not in allowed:
        raise invalid(f"{where}.{kind}.source.base64.media_type: Input should be one of {', '.join(sorted(allowed))}")


def _check_result_content(content: Any, where: str) -> None:
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise invalid(f"{where}.tool_result.content: Input should be a valid string or list")
    for block in content:
        if not isinstance(block, dict) or block.get("type") not in ("text", "image"):
            raise invalid(f"{where}.tool_result.content: only text and image blocks are permitted")
        if block["type"] == "text" and not block.get("text"):
            raise invalid("messages: text content blocks must be non-empty")


# --- token accounting ---


def _all_blocks(body: dict[str, Any]) -> Iterator[Any]:
    """Every block of the prompt in cache order: tools, system, then each message's content."""
    yield from body.get("tools") or ()
    system = body.get("system")
    yield from ([{"type": "text", "text": system}] if isinstance(system, str) else system or ())
    for message in body.get("messages") or ():
        content = message.get("content")
        yield {"type": "message_start", "role": message.get("role")}
        yield from [{"type": "text", "text": content}] if isinstance(content, str) else content or ()


def block_tokens(block: dict[str, Any]) -> int:
    kind = block.get("type")
    if kind == "message_start":
        return MESSAGE_OVERHEAD
    if kind == "text":
        return count_tokens(block.get("text", ""))
    if kind in ("image", "document"):
        return MEDIA_PART_TOKENS
    if kind == "tool_use":
        return count_tokens(block.get("name", "")) + count_tokens(msgspec.json.encode(block.get("input")).decode())
    if kind == "tool_result":
        content = block.get("content")
        if isinstance(content, str):
            return count_tokens(content)
        return sum(block_tokens(part) for part in content or ())
    # a tool definition
    return count_tokens(f"{block.get('name', '')} {block.get('description', '')}") + MESSAGE_OVERHEAD


def prompt_tokens(body: dict[str, Any]) -> tuple[int, list[tuple[int, bytes]]]:
    """The prompt's tokens, and for each cache breakpoint its prefix's tokens and digest."""
    digest = hashlib.sha256(str(body.get("model")).encode())
    total = 0
    breakpoints: list[tuple[int, bytes]] = []
    for block in _all_blocks(body):
        total += block_tokens(block)
        digest.update(msgspec.json.encode({k: v for k, v in block.items() if k != "cache_control"}))
        if "cache_control" in block:
            breakpoints.append((total, digest.copy().digest()))
    return total, breakpoints
