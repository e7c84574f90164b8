"""How many text tokens a request's prompt can be at most, read from its body without a tokenizer.

No token is shorter than a byte: a byte-level BPE (OpenAI's, Llama's, Mistral's …) merges bytes and
never splits one, so the UTF-8 bytes of a text bound its tokens under every tokenizer. What is
counted is the text the provider turns into tokens, not the JSON around it:

- chat `messages`: every string value of each message (role, name, text parts, tool calls and
  their arguments, tool call ids) — keys and JSON syntax are not text — plus OpenAI's chat format:
  `MESSAGE_OVERHEAD` tokens per message (its start, role separator and end markers), one more per
  `name`, and `REPLY_PRIMING` for the assistant turn the reply starts. Image, audio and file parts
  are not text: each is bounded by the model's input limit (ledger/holds.py).
- `prompt` (/completions) and `input` (embeddings): the bytes of each string; a token-id list is
  exactly one token per id.
- any other field that may reach the prompt — `tools`, `functions`, `tool_choice`,
  `response_format`, `prediction`, `suffix`, and fields this gateway does not know — the bytes of
  its JSON as sent, keys included (a tool's schema is rendered into the prompt with its property
  names).
- the sampling and routing parameters (`PARAMETERS`) are not prompt: nothing.

No tokenizer is used: tiktoken downloads its encodings on first use, and no well-kept package ships
them offline; a tokenizer would also hold only for the models it belongs to, where this bound holds
for every model behind an OpenAI-style API.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

# OpenAI's chat format: <|start|>{role}<|message|>{content}<|end|> per message; the reply is primed
# with <|start|>assistant<|message|> (OpenAI's published count: 3 per message, 1 per name, 3 per reply).
MESSAGE_OVERHEAD: Final = 3
NAME_OVERHEAD: Final = 1
REPLY_PRIMING: Final = 3
# Content parts that are text; any other part (image_url, input_audio, file …) is a media part.
TEXT_PARTS: Final = frozenset({"text", "refusal"})
# Top-level fields that never become prompt tokens.
PARAMETERS: Final = frozenset(
    {
        "model", "stream", "stream_options", "user", "max_tokens", "max_completion_tokens", "n",
        "best_of", "temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "stop",
        "logprobs", "top_logprobs", "logit_bias", "echo", "metadata", "store", "service_tier",
        "parallel_tool_calls", "modalities", "reasoning_effort", "verbosity", "encoding_format",
        "dimensions", "timeout",
    }
)  # fmt: skip
# Counted by what they hold rather than as JSON.
_TEXT_FIELDS: Final = frozenset({"messages", "prompt", "input"})

_any_decoder: Final = msgspec.json.Decoder()


def prompt_text_tokens(fields: dict[str, msgspec.Raw]) -> int:
    """An upper bound of the text tokens the body's prompt is billed as (media parts excluded)."""
    total = 0
    for name, raw in fields.items():
        if name in PARAMETERS:
            continue
        if name not in _TEXT_FIELDS:
            total += len(raw)
            continue
        value = _any_decoder.decode(raw)
        if name == "messages":
            total += _messages_tokens(value)
        else:
            total += _text_tokens(value, token_ids=True)
    return total


def _messages_tokens(messages: Any) -> int:
    if not isinstance(messages, list):
        return _text_tokens(messages, token_ids=False)
    total = REPLY_PRIMING
    for message in messages:
        total += MESSAGE_OVERHEAD
        if not isinstance(message, dict):
            total += _text_tokens(message, token_ids=False)
            continue
        for key, value in message.items():
            if key == "content" and isinstance(value, list):
                value = [part for part in value if not _is_media_part(part)]
            total += _text_tokens(value, token_ids=False)
        if "name" in message:
            total += NAME_OVERHEAD
    return total


def _text_tokens(value: Any, *, token_ids: bool) -> int:
    """The UTF-8 bytes of every string in `value` (keys excluded). A number is one token where it
    is a token id, else as many as its characters."""
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode())
    if isinstance(value, dict):
        return sum(_text_tokens(item, token_ids=token_ids) for item in value.values())
    if isinstance(value, list):
        return sum(_text_tokens(item, token_ids=token_ids) for item in value)
    if isinstance(value, bool) or value is None:
        return 0 if value is None else len(str(value))
    if token_ids and isinstance(value, int):
        return 1
    return len(str(value))


def _is_media_part(part: Any) -> bool:
    """A content part that is not text: bounded per part by the model's input limit instead."""
    return isinstance(part, dict) and part.get("type", "text") not in TEXT_PARTS
