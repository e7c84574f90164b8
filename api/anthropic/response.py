"""An Anthropic Messages answer → an OpenAI chat.completion, and its usage for billing.

Text blocks become the message's `content`, `tool_use` blocks its `tool_calls` (the input object
as the arguments string), thinking blocks its `reasoning_content` (LiteLLM's field). The stop
reason maps as LiteLLM's `map_finish_reason` does. The usage is OpenAI's shape with Anthropic's
cache counts kept beside it, as LiteLLM reports it: `prompt_tokens` counts every input token
(uncached + cache reads + cache writes), `prompt_tokens_details.cached_tokens` the reads and
`cache_creation_tokens` the writes, so `Usage.tokens()` (api/usage_block.py) prices each kind apart.
"""

from __future__ import annotations

import time
from typing import Annotated, Final

import msgspec
from msgspec import UNSET, Meta, Raw, UnsetType

from spendledger.api.usage_block import PromptDetails, Usage

Count = Annotated[int, Meta(ge=0)]  # as api/usage_block.py's: negative counts are nonsense, refused

FINISH_REASONS: Final = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def finish_reason(stop_reason: str | None) -> str:
    return FINISH_REASONS.get(stop_reason or "end_turn", "stop")


class AnthropicUsage(msgspec.Struct, frozen=True, kw_only=True):
    input_tokens: Count | None = None
    output_tokens: Count | None = None
    cache_creation_input_tokens: Count | None = None
    cache_read_input_tokens: Count | None = None


class _ContentBlock(msgspec.Struct, frozen=True, kw_only=True):
    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: Raw | UnsetType = UNSET
    thinking: str | None = None


class _MessageBody(msgspec.Struct, frozen=True, kw_only=True):
    id: str = ""
    model: str = ""
    content: list[_ContentBlock] = []
    stop_reason: str | None = None
    usage: AnthropicUsage | None = None


_decoder: Final = msgspec.json.Decoder(_MessageBody)


class OpenAIPromptDetails(msgspec.Struct, frozen=True, kw_only=True):
    cached_tokens: int
    cache_creation_tokens: int


class OpenAIUsage(msgspec.Struct, frozen=True, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: OpenAIPromptDetails
    cache_creation_input_tokens: int
    cache_read_input_tokens: int

    def usage(self) -> Usage:
        """The same counts as api/usage_block.py's `Usage`, which the ledger's events are made from."""
        details = self.prompt_tokens_details
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.total_tokens,
            prompt_tokens_details=PromptDetails(
                cached_tokens=details.cached_tokens, cache_creation_tokens=details.cache_creation_tokens
            ),
            cache_creation_input_tokens=self.cache_creation_input_tokens,
            cache_read_input_tokens=self.cache_read_input_tokens,
        )


def openai_usage(usage: AnthropicUsage) -> OpenAIUsage:
    read = usage.cache_read_input_tokens or 0
    write = usage.cache_creation_input_tokens or 0
    prompt = (usage.input_tokens or 0) + read + write
    completion = usage.output_tokens or 0
    return OpenAIUsage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=OpenAIPromptDetails(cached_tokens=read, cache_creation_tokens=write),
        cache_creation_input_tokens=write,
        cache_read_input_tokens=read,
    )


class FunctionCall(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    arguments: str


class ToolCall(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    type: str = "function"
    function: FunctionCall


class AssistantMessage(msgspec.Struct, frozen=True, kw_only=True):
    role: str = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCall] | UnsetType = UNSET
    reasoning_content: str | UnsetType = UNSET


class Choice(msgspec.Struct, frozen=True, kw_only=True):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletion(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: OpenAIUsage | UnsetType = UNSET


_encoder: Final = msgspec.json.Encoder()


def to_openai_response(body: bytes, model: str | None = None) -> tuple[bytes, Usage | None]:
    """The chat.completion for a Messages answer (`model` names the model in it; by default the
    one Anthropic names, as a pass-through OpenAI answer names the provider's) and its usage
    (None if Anthropic sent none: the caller estimates it, as for an OpenAI answer without one).
    A body that is not a Messages answer raises `msgspec.DecodeError`, as a provider's invalid
    JSON does on the OpenAI path."""
    answer = _decoder.decode(body)
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list[ToolCall] = []
    for block in answer.content:
        if block.type == "text" and block.text is not None:
            texts.append(block.text)
        elif block.type == "tool_use" and block.id is not None and block.name is not None:
            arguments = bytes(block.input).decode() if block.input is not UNSET else "{}"
            calls.append(ToolCall(id=block.id, function=FunctionCall(name=block.name, arguments=arguments)))
        elif block.type == "thinking" and block.thinking:
            thoughts.append(block.thinking)
    usage = openai_usage(answer.usage) if answer.usage is not None else None
    message = AssistantMessage(
        content="".join(texts) if texts else None,
        tool_calls=calls or UNSET,
        reasoning_content="".join(thoughts) if thoughts else UNSET,
    )
    completion = ChatCompletion(
        id=answer.id,
        created=int(time.time()),
        model=model or answer.model,
        choices=[Choice(message=message, finish_reason=finish_reason(answer.stop_reason))],
        usage=usage or UNSET,
    )
    return _encoder.encode(completion), usage.usage() if usage is not None else None
