"""OpenAI chat messages → Anthropic's system prompt and alternating user/assistant turns.

Anthropic wants the system prompt apart, the first turn the user's, roles alternating, no blank
text, and the answers to tool calls as `tool_result` blocks at the head of the next user turn.
OpenAI allows all of these otherwise, so: system and developer messages (wherever they stand)
become `system`; consecutive messages of one role are merged into one turn; `tool` messages become
`tool_result` blocks in a user turn; text that is empty or only whitespace is dropped. A
conversation that does not begin with the user is refused, as LiteLLM refuses it (its
`modify_params` placeholder is not copied).
"""

from __future__ import annotations

import re
from typing import Final

import msgspec
from msgspec import UNSET, Raw, UnsetType

from spendledger.api.anthropic.wire import (
    Base64Source,
    Block,
    DocumentBlock,
    ImageBlock,
    Message,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
    UrlSource,
    present,
)
from spendledger.api.errors import ApiError, bad_request

# Anthropic's image formats; a data URL of another type would be refused by it, so it is here.
IMAGE_TYPES: Final = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_DATA_URL: Final = re.compile(r"data:([\w.+-]+/[\w.+-]+);base64,", re.ASCII)
_EMPTY_OBJECT: Final = Raw(b"{}")
# Anthropic's rule for tool use ids; other providers' ids (a conversation begun elsewhere) may break
# it, so each is rewritten alike in the call and in its result, as LiteLLM does.
_TOOL_ID: Final = re.compile(r"[a-zA-Z0-9_-]+", re.ASCII)
_NOT_IN_TOOL_ID: Final = re.compile(r"[^a-zA-Z0-9_-]", re.ASCII)


class ImageUrl(msgspec.Struct, frozen=True, kw_only=True):
    url: str
    detail: str | None = None


class FileRef(msgspec.Struct, frozen=True, kw_only=True):
    file_data: str | None = None
    file_id: str | None = None
    filename: str | None = None


class ContentPart(msgspec.Struct, frozen=True, kw_only=True):
    type: str
    text: str | None = None
    refusal: str | None = None
    image_url: ImageUrl | str | None = None
    file: FileRef | None = None
    cache_control: Raw | UnsetType = UNSET  # LiteLLM's prompt-caching marker, passed on as is


class FunctionCall(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    arguments: str = ""


class ToolCall(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    type: str = "function"
    function: FunctionCall


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One OpenAI message; fields SDKs echo back (`refusal`, `annotations`, ...) are ignored."""

    role: str
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    cache_control: Raw | UnsetType = UNSET


_arguments_decoder: Final = msgspec.json.Decoder(dict[str, Raw])


def to_turns(messages: list[ChatMessage]) -> tuple[list[TextBlock], list[Message]]:
    """The system prompt's blocks and the alternating turns, or the 400 naming what cannot be sent."""
    system: list[TextBlock] = []
    turns: list[tuple[str, list[Block]]] = []
    for i, message in enumerate(messages):
        role = message.role
        if role in ("system", "developer"):
            system.extend(_text_blocks(message.content, i, role))
            continue
        if role == "user":
            blocks = _user_blocks(message.content, i)
        elif role == "assistant":
            blocks = _assistant_blocks(message, i)
        elif role == "tool":
            role, blocks = "user", [_tool_result(message, i)]
        else:
            raise bad_request(f"messages[{i}]: the role {role!r} cannot be sent to Anthropic", param="messages")
        marker = present(message.cache_control)
        if marker is not UNSET and blocks:  # LiteLLM: a message's marker goes on its last block
            blocks[-1] = msgspec.structs.replace(blocks[-1], cache_control=marker)
        if not blocks:
            continue
        if turns and turns[-1][0] == role:
            turns[-1][1].extend(blocks)
        else:
            turns.append((role, blocks))
    if not turns:
        raise bad_request("messages: Anthropic needs at least one user message besides the system prompt", param="messages")
    if turns[0][0] != "user":
        raise bad_request(
            "messages: Anthropic needs the conversation (after any system messages) to begin with a user message",
            param="messages",
        )
    _trim_final_assistant(turns[-1])
    return system, [Message(role=role, content=_tool_results_first(blocks)) for role, blocks in turns if blocks]


def _text_blocks(content: str | list[ContentPart] | None, i: int, role: str) -> list[TextBlock]:
    if isinstance(content, str):
        return [TextBlock(text=content)] if content.strip() else []
    blocks: list[TextBlock] = []
    for part in content or ():
        text = part.text if part.type == "text" else part.refusal if part.type == "refusal" else None
        if text is None:
            raise _part_refused(i, role, part.type)
        if text.strip():
            blocks.append(TextBlock(text=text, cache_control=_marker(part)))
    return blocks


def _user_blocks(content: str | list[ContentPart] | None, i: int) -> list[Block]:
    if not isinstance(content, list):
        return list(_text_blocks(content, i, "user"))
    blocks: list[Block] = []
    for part in content:
        if part.type == "text":
            if part.text and part.text.strip():
                blocks.append(TextBlock(text=part.text, cache_control=_marker(part)))
        elif part.type == "image_url" and part.image_url is not None:
            url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
            blocks.append(ImageBlock(source=_image_source(url, i), cache_control=_marker(part)))
        elif part.type == "file" and part.file is not None and part.file.file_data:
            source = _data_source(part.file.file_data)
            if source is None or source.media_type != "application/pdf":
                raise bad_request(f"messages[{i}]: Anthropic takes files only as base64 PDF data URLs", param="messages")
            blocks.append(DocumentBlock(source=source, cache_control=_marker(part)))
        else:
            raise _part_refused(i, "user", part.type)
    return blocks


def _assistant_blocks(message: ChatMessage, i: int) -> list[Block]:
    blocks: list[Block] = list(_text_blocks(message.content, i, "assistant"))
    for call in message.tool_calls or ():
        if call.type != "function":
            raise bad_request(f"messages[{i}]: tool calls of type {call.type!r} cannot be sent to Anthropic", param="messages")
        blocks.append(ToolUseBlock(id=_tool_id(call.id), name=call.function.name, input=_arguments(call.function.arguments, i)))
    return blocks


def _tool_result(message: ChatMessage, i: int) -> ToolResultBlock:
    if not message.tool_call_id:
        raise bad_request(f"messages[{i}]: a tool message needs its 'tool_call_id'", param="messages")
    content: list[TextBlock | ImageBlock] = list(_text_blocks(message.content, i, "tool"))
    return ToolResultBlock(tool_use_id=_tool_id(message.tool_call_id), content=content)


def _tool_id(given: str) -> str:
    return given if _TOOL_ID.fullmatch(given) else _NOT_IN_TOOL_ID.sub("_", given) or "_"


def _arguments(arguments: str, i: int) -> Raw:
    """A tool call's arguments (a JSON string in OpenAI's format) as Anthropic's `input` object."""
    if not arguments.strip():
        return _EMPTY_OBJECT
    try:
        _arguments_decoder.decode(arguments)
    except msgspec.DecodeError:
        raise bad_request(
            f"messages[{i}]: a tool call's arguments must be a JSON object to be sent to Anthropic", param="messages"
        ) from None
    return Raw(arguments.encode())


def _image_source(url: str, i: int) -> Base64Source | UrlSource:
    if url.startswith(("https://", "http://")):
        return UrlSource(url=url)
    source = _data_source(url)
    if source is None:
        raise bad_request(f"messages[{i}]: an image must be an http(s) URL or a base64 data URL", param="messages")
    if source.media_type not in IMAGE_TYPES:
        raise bad_request(
            f"messages[{i}]: Anthropic takes images as {', '.join(sorted(IMAGE_TYPES))}, not {source.media_type}",
            param="messages",
        )
    return source


def _data_source(url: str) -> Base64Source | None:
    match = _DATA_URL.match(url)
    if match is None:
        return None
    return Base64Source(media_type=match.group(1).lower(), data=url[match.end() :])


def _marker(part: ContentPart) -> Raw | UnsetType:
    return present(part.cache_control)


def _part_refused(i: int, role: str, kind: str) -> ApiError:
    return bad_request(f"messages[{i}]: a {role} message's {kind!r} part cannot be sent to Anthropic", param="messages")


def _trim_final_assistant(turn: tuple[str, list[Block]]) -> None:
    """Anthropic refuses a final assistant turn (a prefill) whose text ends in whitespace."""
    role, blocks = turn
    if role == "assistant" and blocks and isinstance(blocks[-1], TextBlock):
        text = blocks[-1].text.rstrip()
        if text:
            blocks[-1] = msgspec.structs.replace(blocks[-1], text=text)
        else:
            blocks.pop()


def _tool_results_first(blocks: list[Block]) -> list[Block]:
    """Anthropic reads a user turn's tool results only at its head."""
    if not any(isinstance(b, ToolResultBlock) for b in blocks[1:]):
        return blocks
    return [b for b in blocks if isinstance(b, ToolResultBlock)] + [
        b for b in blocks if not isinstance(b, ToolResultBlock)
    ]
