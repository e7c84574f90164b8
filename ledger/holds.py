"""The worst case of a request: an upper bound of what it can cost, held before it goes upstream.

Budgets are strict only if the hold bounds the real cost of every request shape the gateway
forwards. The bound, per token kind:

- input: the prompt's text tokens, bounded by its text's bytes plus the chat format's overhead
  (api/prompt_text.py: no token is shorter than a byte), plus, for each image, audio or file part,
  the model's input limit (`max_input_tokens`: one part cannot cost more than the context window
  holds). The whole is at most the input limit per independent prompt, when the limit is known: a
  provider refuses a longer input rather than bill it.
- output: per completion, the request's `max_completion_tokens` / `max_tokens`, else the model's
  output limit (`max_output_tokens`, else its context window); times the completions generated per
  prompt (`n`, and `best_of`, which the provider generates and bills in full), times the prompts.

Where neither the request nor the model bounds a quantity, a documented default is assumed
(`DEFAULT_OUTPUT_CAP`, `DEFAULT_MEDIA_TOKENS`) and named in `WorstCase.assumed`, so that
`reject_unbounded_requests` can refuse such a request instead.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Final

import msgspec

from spendledger.ledger.money import ZERO, add, cost_of
from spendledger.ledger.pricing import ModelLimits, Price

# Output tokens per completion assumed when neither the request nor the model bounds them.
DEFAULT_OUTPUT_CAP: Final = 4096
# Input tokens assumed per image, audio or file part when the model's input limit is unknown
# (OpenAI bills a high-detail image at most 1,445 tokens on the gpt-4o family).
DEFAULT_MEDIA_TOKENS: Final = 4096


class RequestShape(msgspec.Struct, frozen=True, kw_only=True):
    """What bounds a request's tokens, read from its body."""

    text_tokens: int  # at most, in the prompt's text (api/prompt_text.py)
    media_parts: int = 0  # image, audio and file parts of the messages
    prompts: int = 1  # independent inputs: a /completions prompt list
    completions: int = 1  # generated per prompt: n, best_of
    output_cap: int | None = None  # max_completion_tokens / max_tokens, if the request sets one
    generates: bool = True  # False for embeddings: no output tokens
    bounded_by_context: bool = True  # False where `prompts` is not counted (embeddings)


class WorstCase(msgspec.Struct, frozen=True, kw_only=True):
    input_tokens: int
    output_tokens: int
    assumed: tuple[str, ...] = ()  # "output" / "media": where a default stood in for a limit


def worst_case_tokens(shape: RequestShape, limits: ModelLimits) -> WorstCase:
    assumed: list[str] = []
    per_part = limits.max_input_tokens
    if per_part is None:
        per_part = DEFAULT_MEDIA_TOKENS
        if shape.media_parts:
            assumed.append("media")
    input_tokens = shape.text_tokens + shape.media_parts * per_part
    if limits.max_input_tokens is not None and shape.bounded_by_context:
        input_tokens = min(input_tokens, limits.max_input_tokens * shape.prompts)
    output_tokens = 0
    if shape.generates:
        cap = shape.output_cap
        if cap is None:
            cap = limits.max_output_tokens
            if cap is None:
                cap = DEFAULT_OUTPUT_CAP
                assumed.append("output")
        elif limits.max_output_tokens is not None:
            cap = min(cap, limits.max_output_tokens)  # the provider refuses a larger max_tokens
        output_tokens = cap * shape.completions * shape.prompts
    return WorstCase(input_tokens=input_tokens, output_tokens=output_tokens, assumed=tuple(assumed))


def worst_case_cost(price: Price | None, worst: WorstCase) -> Decimal:
    """The hold: the worst case's tokens at the deployment's prices (0 for an unpriced model), each
    token at the highest price its side (input or output) can be charged in a request of that
    size: any kind (a prompt-cache write costs more than plain input) and any tier it may reach."""
    if price is None:
        return ZERO
    most_in, most_out = price.most_per_token(worst.input_tokens)
    return add(cost_of(worst.input_tokens, most_in), cost_of(worst.output_tokens, most_out))
