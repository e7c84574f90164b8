"""An OpenAI chat.completions request → the body of an Anthropic Messages request.

The parameters map as LiteLLM maps them (`AnthropicConfig.map_openai_params`): `max_tokens` or
`max_completion_tokens` (else `DEFAULT_MAX_TOKENS`), `stop` → `stop_sequences`, `temperature`,
`top_p`, `stream`, `tools` / `tool_choice` / `parallel_tool_calls`, `user` → `metadata.user_id`,
`reasoning_effort` → a thinking budget; Anthropic's own `top_k` and `thinking` pass through.
A parameter whose meaning Anthropic cannot honour (`n` > 1, penalties, `seed`, `logprobs`,
`response_format`, ...) is a 400 naming it, rather than an answer that silently ignores it; a
field neither API knows is a 400 too (decoding forbids unknown fields). The messages are
messages.py's.
"""

from __future__ import annotations

import re
from typing import Annotated, Final

import msgspec
from msgspec import UNSET, Meta, Raw, UnsetType

from spendledger.api.anthropic.messages import ChatMessage, to_turns
from spendledger.api.anthropic.wire import (
    DEFAULT_MAX_TOKENS,
    MessagesRequest,
    Metadata,
    Tool,
    ToolChoice,
    encoder,
    present,
)
from spendledger.api.errors import ApiError, bad_request

Tokens = Annotated[int, Meta(ge=1)]
_NO_PARAMETERS: Final = Raw(b'{"type":"object","properties":{}}')
# LiteLLM's budgets for `reasoning_effort` (DEFAULT_REASONING_EFFORT_*_THINKING_BUDGET).
THINKING_BUDGETS: Final = {"low": 1024, "medium": 2048, "high": 4096}
# LiteLLM leaves `user` out of the metadata when it looks like an email or a phone number, which
# Anthropic refuses as user ids.
_EMAIL: Final = re.compile(r"^[a-zA-Z0-9._%+-]+@[a-zA-Z0-9.-]+\.[a-zA-Z]{2,}$")
_PHONE: Final = re.compile(r"^\+?[\d\s\(\)-]{7,}$")


class FunctionDef(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str | None = None
    parameters: Raw | UnsetType = UNSET
    strict: bool | None = None  # OpenAI's structured-outputs flag: no Anthropic equivalent, dropped


class ToolDef(msgspec.Struct, frozen=True, kw_only=True):
    type: str = "function"
    function: FunctionDef | None = None
    cache_control: Raw | UnsetType = UNSET


class NamedFunction(msgspec.Struct, frozen=True, kw_only=True):
    name: str


class NamedToolChoice(msgspec.Struct, frozen=True, kw_only=True):
    type: str = "function"
    function: NamedFunction


class ChatRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every field a chat request may carry: translated, dropped (no effect on the answer), or
    refused when set to something other than its default."""

    model: str
    messages: list[ChatMessage]
    max_tokens: Tokens | None = None
    max_completion_tokens: Tokens | None = None
    stop: str | list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Tokens | None = None
    stream: bool | None = None
    stream_options: Raw | UnsetType = UNSET  # the usage is always in Anthropic's stream
    tools: list[ToolDef] | None = None
    tool_choice: str | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    thinking: Raw | UnsetType = UNSET
    reasoning_effort: str | None = None
    n: int | None = None
    # Dropped: they ask for something of OpenAI's platform, not of the answer.
    metadata: Raw | UnsetType = UNSET
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # Refused unless at their default: Anthropic has no way to honour them.
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: Raw | UnsetType = UNSET
    logprobs: bool | None = None
    top_logprobs: int | None = None
    seed: int | None = None
    response_format: Raw | UnsetType = UNSET
    audio: Raw | UnsetType = UNSET
    modalities: Raw | UnsetType = UNSET
    prediction: Raw | UnsetType = UNSET
    functions: Raw | UnsetType = UNSET
    function_call: Raw | UnsetType = UNSET
    web_search_options: Raw | UnsetType = UNSET


_decoder: Final = msgspec.json.Decoder(ChatRequest)
_TEXT_FORMAT: Final = (b'{"type":"text"}', b'{"type": "text"}')


def to_messages_request(body: bytes, upstream_model: str, *, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> bytes:
    """The Messages request for an OpenAI chat request's `body`, to `upstream_model`; an `ApiError`
    400 (OpenAI's envelope) for a request that cannot be translated."""
    request = decode_chat_request(body)
    _refuse_untranslatable(request)
    system, messages = to_turns(request.messages)
    tools = _tools(request.tools)
    if tools is UNSET and any(
        block.__struct_config__.tag in ("tool_use", "tool_result") for m in messages for block in m.content
    ):
        raise bad_request(
            "Anthropic needs the tools defined ('tools') when the messages hold tool calls or their results",
            param="tools",
        )
    max_tokens = request.max_completion_tokens or request.max_tokens or default_max_tokens
    translated = MessagesRequest(
        model=upstream_model,
        messages=messages,
        max_tokens=max_tokens,
        system=system or UNSET,
        stop_sequences=_stop_sequences(request.stop),
        temperature=_given(request.temperature),
        top_p=_given(request.top_p),
        top_k=UNSET if request.top_k is None else request.top_k,
        stream=True if request.stream else UNSET,
        tools=tools,
        tool_choice=_tool_choice(request.tool_choice, request.parallel_tool_calls) if tools is not UNSET else UNSET,
        metadata=_metadata(request.user),
        thinking=_thinking(request),
    )
    return encoder.encode(translated)


def decode_chat_request(body: bytes) -> ChatRequest:
    try:
        return _decoder.decode(body)
    except msgspec.ValidationError as exc:
        message = str(exc)
        param = message.rpartition("`$.")[2].split(".")[0].split("[")[0].rstrip("`") if "`$." in message else None
        if message.startswith("Object contains unknown field"):
            field = message.split("`")[1]
            raise bad_request(f"The parameter {field!r} cannot be sent to Anthropic", param=field) from None
        raise bad_request(f"Invalid request body: {message}", param=param) from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}") from None


def _refuse_untranslatable(request: ChatRequest) -> None:
    if request.n is not None and request.n != 1:
        raise _unsupported("n", f"n={request.n}: Anthropic answers with one choice per request")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(request, name) not in (None, 0):
            raise _unsupported(name, f"{name}: Anthropic has no penalties")
    if request.seed is not None or request.top_logprobs is not None:
        name = "seed" if request.seed is not None else "top_logprobs"
        raise _unsupported(name, f"{name} cannot be sent to Anthropic")
    for name in ("logit_bias", "audio", "modalities", "prediction", "functions", "function_call",
                 "web_search_options"):  # fmt: skip
        if present(getattr(request, name)) is not UNSET:
            raise _unsupported(name, f"{name} cannot be sent to Anthropic")
    if request.logprobs:
        raise _unsupported("logprobs", "logprobs: Anthropic does not return log probabilities")
    response_format = present(request.response_format)
    if response_format is not UNSET and bytes(response_format) not in _TEXT_FORMAT:
        raise _unsupported("response_format", "response_format other than text cannot be sent to Anthropic")
    if present(request.thinking) is not UNSET and request.reasoning_effort is not None:
        raise _unsupported("reasoning_effort", "send either thinking or reasoning_effort, not both")


def _unsupported(param: str, message: str) -> ApiError:
    return bad_request(f"Unsupported for Anthropic models: {message}", param=param)


def _given(value: float | None) -> float | UnsetType:
    return UNSET if value is None else value


def _stop_sequences(stop: str | list[str] | None) -> list[str] | UnsetType:
    sequences = [stop] if isinstance(stop, str) else stop
    if not sequences:
        return UNSET
    if any(not s.strip() for s in sequences):
        raise _unsupported("stop", "Anthropic refuses stop sequences that are empty or only whitespace")
    return sequences


def _tools(tools: list[ToolDef] | None) -> list[Tool] | UnsetType:
    if not tools:
        return UNSET
    translated = []
    for i, tool in enumerate(tools):
        if tool.type != "function" or tool.function is None:
            raise _unsupported("tools", f"tools[{i}]: only function tools can be sent to Anthropic")
        function = tool.function
        translated.append(
            Tool(
                name=function.name,
                description=UNSET if function.description is None else function.description,
                input_schema=parameters if (parameters := present(function.parameters)) is not UNSET else _NO_PARAMETERS,
                cache_control=present(tool.cache_control),
            )
        )
    return translated


def _tool_choice(choice: str | NamedToolChoice | None, parallel: bool | None) -> ToolChoice | UnsetType:
    disable_parallel = UNSET if parallel is None else not parallel
    if isinstance(choice, NamedToolChoice):
        return ToolChoice(type="tool", name=choice.function.name, disable_parallel_tool_use=disable_parallel)
    if choice is None:
        return UNSET if parallel is None else ToolChoice(type="auto", disable_parallel_tool_use=disable_parallel)
    kinds = {"auto": "auto", "required": "any", "none": "none"}
    if choice not in kinds:
        raise bad_request(f"tool_choice must be auto, required, none or a named function, not {choice!r}", param="tool_choice")
    if choice == "none":  # Anthropic takes no parallel flag with "none"
        return ToolChoice(type="none")
    return ToolChoice(type=kinds[choice], disable_parallel_tool_use=disable_parallel)


def _metadata(user: str | None) -> Metadata | UnsetType:
    if not user or _EMAIL.match(user) or _PHONE.match(user):
        return UNSET
    return Metadata(user_id=user)


def _thinking(request: ChatRequest) -> Raw | UnsetType:
    thinking = present(request.thinking)
    if thinking is not UNSET:
        return thinking
    effort = request.reasoning_effort
    if effort is None:
        return UNSET
    if effort not in THINKING_BUDGETS:
        raise _unsupported("reasoning_effort", f"reasoning_effort must be one of {', '.join(THINKING_BUDGETS)}")
    return Raw(b'{"type":"enabled","budget_tokens":%d}' % THINKING_BUDGETS[effort])
