"""The usage block of a provider's answer (OpenAI's shape, or Anthropic's) and the token estimate
used when a provider reports none.

Apart from api/proxy.py (which re-exports these names) so that the Anthropic translation
(api/anthropic/), which api/upstream.py imports, can read it without importing the proxy, which
imports the upstream.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from spendledger.ledger.tokens import TokenUsage

Count = Annotated[int, Meta(ge=0)]  # an upstream reporting negative tokens is answering nonsense


class PromptDetails(msgspec.Struct, kw_only=True):
    cached_tokens: Count | None = None
    cache_creation_tokens: Count | None = None  # LiteLLM's spelling, for an upstream LiteLLM
    audio_tokens: Count | None = None
    image_tokens: Count | None = None


class CompletionDetails(msgspec.Struct, kw_only=True):
    reasoning_tokens: Count | None = None
    audio_tokens: Count | None = None
    image_tokens: Count | None = None


class Usage(msgspec.Struct, kw_only=True):
    """A usage block as OpenAI (and Azure, OpenRouter, LiteLLM) report it — `prompt_tokens`
    counting every input token, cached ones included — or as Anthropic does (`input_tokens`
    without the cache's, which come apart as `cache_read_input_tokens` and
    `cache_creation_input_tokens`)."""

    prompt_tokens: Count | None = None
    completion_tokens: Count | None = None
    total_tokens: Count | None = None
    prompt_tokens_details: PromptDetails | None = None
    completion_tokens_details: CompletionDetails | None = None
    input_tokens: Count | None = None
    output_tokens: Count | None = None
    cache_read_input_tokens: Count | None = None
    cache_creation_input_tokens: Count | None = None

    def tokens(self) -> TokenUsage:
        prompt = self.prompt_tokens_details or PromptDetails()
        completion = self.completion_tokens_details or CompletionDetails()
        cache_read = _first(prompt.cached_tokens, self.cache_read_input_tokens)
        cache_write = _first(prompt.cache_creation_tokens, self.cache_creation_input_tokens)
        if self.prompt_tokens is not None:
            input_tokens = self.prompt_tokens
        else:  # Anthropic's count leaves the cache's tokens out
            input_tokens = (self.input_tokens or 0) + cache_read + cache_write
        return TokenUsage.reported(
            input_tokens,
            _first(self.completion_tokens, self.output_tokens),
            cache_read=cache_read,
            cache_write=cache_write,
            input_audio=prompt.audio_tokens or 0,
            input_image=prompt.image_tokens or 0,
            output_audio=completion.audio_tokens or 0,
            output_image=completion.image_tokens or 0,
            reasoning=completion.reasoning_tokens or 0,
        )


def _first(*counts: int | None) -> int:
    return next((c for c in counts if c is not None), 0)


def estimate_tokens(size: int) -> int:
    """A rough count (4 bytes a token, OpenAI's rule of thumb) of `size` bytes of text, for when
    the provider never reported usage."""
    return max(1, size // 4)
