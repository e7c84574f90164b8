"""What a request used, by the kinds of token providers bill apart.

Totals are OpenAI's: `input_tokens` counts every input token (those read from or written to the
prompt cache and audio included), `output_tokens` every output token (reasoning and audio
included). The kinds are parts of those totals; what is left of a total once its kinds are taken
out is plain text. A provider's report is the outside world's: `TokenUsage.reported` keeps every
part inside its total, so no kind is counted twice and no remainder is negative.
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec

TokenKind = Literal[
    "input", "cache_read", "cache_write", "input_audio", "input_image",
    "output", "reasoning", "output_audio", "output_image",
]  # fmt: skip
# Each kind that is part of a total, with that total's own kind: a kind without a price of its own
# is billed at its parent's (prompt-cache reads and writes as input, reasoning as output).
PARENT: Final[dict[TokenKind, TokenKind]] = {
    "cache_read": "input",
    "cache_write": "input",
    "input_audio": "input",
    "input_image": "input",
    "reasoning": "output",
    "output_audio": "output",
    "output_image": "output",
}
KINDS: Final[tuple[TokenKind, ...]] = (
    "input", "cache_read", "cache_write", "input_audio", "input_image",
    "output", "reasoning", "output_audio", "output_image",
)  # fmt: skip


# The counts of the parts, as UsageRecorded, the Lago event's properties and the reconciliation
# export name them (LiteLLM's and OpenAI's words).
PART_FIELDS: Final = (
    "cached_input_tokens", "cache_creation_input_tokens", "input_audio_tokens", "input_image_tokens",
    "reasoning_tokens", "output_audio_tokens", "output_image_tokens",
)  # fmt: skip


class TokenUsage(msgspec.Struct, frozen=True, kw_only=True):
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    input_audio_tokens: int = 0
    input_image_tokens: int = 0
    output_audio_tokens: int = 0
    output_image_tokens: int = 0
    reasoning_tokens: int = 0

    @classmethod
    def reported(
        cls,
        input_tokens: int,
        output_tokens: int,
        *,
        cache_read: int = 0,
        cache_write: int = 0,
        input_audio: int = 0,
        input_image: int = 0,
        output_audio: int = 0,
        output_image: int = 0,
        reasoning: int = 0,
    ) -> TokenUsage:
        """A provider's counts, each part cut to what its total leaves (in the order listed)."""
        cache_read, cache_write, input_audio, input_image = _within(
            input_tokens, cache_read, cache_write, input_audio, input_image
        )
        reasoning, output_audio, output_image = _within(output_tokens, reasoning, output_audio, output_image)
        return cls(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_input_tokens=cache_read,
            cache_creation_input_tokens=cache_write,
            input_audio_tokens=input_audio,
            input_image_tokens=input_image,
            output_audio_tokens=output_audio,
            output_image_tokens=output_image,
            reasoning_tokens=reasoning,
        )

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def counts(self) -> dict[str, int]:
        """The totals and the parts, by the names UsageRecorded gives them."""
        return {**msgspec.structs.asdict(self), "total_tokens": self.total_tokens}

    def by_kind(self) -> dict[TokenKind, int]:
        """Each kind's own tokens (`input` and `output` are the plain-text remainders), zero kinds
        left out."""
        counts: dict[TokenKind, int] = {
            "input": self.input_tokens
            - self.cached_input_tokens
            - self.cache_creation_input_tokens
            - self.input_audio_tokens
            - self.input_image_tokens,
            "cache_read": self.cached_input_tokens,
            "cache_write": self.cache_creation_input_tokens,
            "input_audio": self.input_audio_tokens,
            "input_image": self.input_image_tokens,
            "output": self.output_tokens
            - self.reasoning_tokens
            - self.output_audio_tokens
            - self.output_image_tokens,
            "reasoning": self.reasoning_tokens,
            "output_audio": self.output_audio_tokens,
            "output_image": self.output_image_tokens,
        }
        return {kind: n for kind, n in counts.items() if n}


def _within(total: int, *parts: int) -> list[int]:
    """Each part cut to what the total leaves once the parts before it are taken."""
    kept = []
    for part in parts:
        part = min(part, total)
        total -= part
        kept.append(part)
    return kept
