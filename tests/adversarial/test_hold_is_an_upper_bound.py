"""Property: for every request shape the gateway forwards, the hold bounds the real cost.

Random request bodies (chat with text, image, audio and file parts; /completions with prompt lists,
`n` and `best_of`; embeddings), with or without `max_tokens`, against models with and without
known limits, go through the proxy's own decoding (api/request_body.py) and bound (ledger/holds.py);
the same forwarded body goes to the fake provider (in process), which bills it as OpenAI does and
never runs past the model's limits — with its prompt counted by words, or by the worst tokenizer
there is (a token per byte of text, OpenAI's chat format in full). Its cost at the deployment's price never exceeds the hold.
Where the bound had to assume a default (no limit known), the fake stays within that assumption,
which is exactly what `reject_unbounded_requests` refuses to rely on.

On 8e40733 this fails at once: `n`, prompt lists, media parts and a reply longer than 4,096 tokens
all cost more than that revision's hold.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spendledger.api.proxy import Usage
from spendledger.api.request_body import decode_body, shape_of, upstream_body
from spendledger.ledger.config import Deployment
from spendledger.ledger.holds import (
    DEFAULT_MEDIA_TOKENS,
    DEFAULT_OUTPUT_CAP,
    worst_case_cost,
    worst_case_tokens,
)
from spendledger.ledger.pricing import ModelLimits, Price, PriceTier, charge
from tests.fakes.upstream import MEDIA_PART_TOKENS, FakeUpstream

PATHS = {
    "chat.completions": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
}

words = st.lists(
    st.sampled_from(["hello", "a", "naïve", "日本語", "x" * 30, "budget", "?"]), max_size=40
).map(" ".join)
text_part = words.map(lambda text: {"type": "text", "text": text})
image_part = st.sampled_from(["low", "high", "auto"]).map(
    lambda detail: {"type": "image_url", "image_url": {"url": "https://e.x/i.png", "detail": detail}}
)
audio_part = st.just({"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}})
file_part = st.just({"type": "file", "file": {"file_id": "file-abc"}})
content = st.one_of(
    words, st.lists(st.one_of(text_part, image_part, audio_part, file_part), min_size=1, max_size=6)
)
message = st.builds(
    lambda role, c, name: {"role": role, "content": c} | ({"name": name} if name else {}),
    st.sampled_from(["system", "user", "developer"]),
    content,
    st.sampled_from([None, "ada", "名前"]),
)
max_tokens = st.one_of(st.none(), st.integers(1, 9000))


@st.composite
def request(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    route = draw(st.sampled_from(list(PATHS)))
    body: dict[str, Any] = {"model": "group"}
    if route == "embeddings":
        body["input"] = draw(st.one_of(words, st.lists(words, min_size=1, max_size=8)))
        return route, body
    if route == "chat.completions":
        body["messages"] = draw(st.lists(message, min_size=1, max_size=5))
    else:
        body["prompt"] = draw(st.one_of(words, st.lists(words, min_size=1, max_size=6)))
        if draw(st.booleans()):
            body["best_of"] = draw(st.integers(1, 20))
    if draw(st.booleans()):
        body["n"] = (
            draw(st.integers(1, 128)) if "best_of" not in body else draw(st.integers(1, body["best_of"]))
        )
    cap = draw(max_tokens)
    if cap is not None:
        body[draw(st.sampled_from(["max_tokens", "max_completion_tokens"]))] = cap
    return route, body


limits = st.builds(
    ModelLimits,
    max_input_tokens=st.one_of(st.none(), st.integers(300, 200_000)),
    max_output_tokens=st.one_of(st.none(), st.integers(1, 100_000)),
)
# Flat prices, and prices with kinds dearer than plain tokens (prompt-cache writes, reasoning) and
# cheaper (cache reads), and a tier past a threshold the request may reach.
kinds = st.fixed_dictionaries(
    {},
    optional={
        "cache_read": st.sampled_from([Decimal("0.00000015"), Decimal(0)]),
        "cache_write": st.sampled_from([Decimal("0.00000375"), Decimal("0.0002")]),
        "reasoning": st.sampled_from([Decimal("0.00002"), Decimal("0.001")]),
    },
)
tiers = st.lists(
    st.builds(
        lambda above, i, o: PriceTier(above=above, unit_prices={"input": Decimal(i), "output": Decimal(o)}),
        st.integers(0, 5_000), st.sampled_from(["0.000003", "0.0003"]), st.sampled_from(["0.00003", "0.003"]),
    ),
    max_size=2,
    unique_by=lambda t: t.above,
).map(lambda ts: tuple(sorted(ts, key=lambda t: t.above)))
prices = st.builds(
    lambda i, o, k, t: Price(input_cost_per_token=Decimal(i), output_cost_per_token=Decimal(o), kinds=k, tiers=t,
                             source="config"),
    st.sampled_from(["0.0000015", "0.000005", "0.0001", "0"]),
    st.sampled_from(["0.000002", "0.000015", "0.0006", "0"]),
    kinds,
    tiers,
)  # fmt: skip


def call_fake(fake: FakeUpstream, path: str, body: bytes) -> tuple[int, Any]:
    """One request to the fake ASGI app, in process."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(b"content-type", b"application/json")],
    }
    asyncio.run(fake(scope, receive, send))
    return sent[0]["status"], msgspec.json.decode(b"".join(m.get("body", b"") for m in sent[1:]))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    request(), limits, prices, st.integers(1, 20_000), st.integers(0, 50_000), st.integers(0, 20_000),
    st.booleans(),
)
def test_the_real_cost_never_exceeds_the_hold(
    shaped: tuple[str, dict[str, Any]], model: ModelLimits, price: Price, reply_words: int, cached: int,
    reasoning: int, bytes_as_tokens: bool,
) -> None:  # fmt: skip
    route, sent = shaped
    deployment = Deployment(
        model_name="group", deployment_id="d", provider="openai", upstream_model="gpt-x", api_base="http://x"
    )
    raw = msgspec.json.encode(sent)
    body = decode_body(raw)
    forwarded = upstream_body(body, raw, deployment)
    worst = worst_case_tokens(shape_of(route, body), model)
    hold = worst_case_cost(price, worst)

    # The provider: the model's limits where known; where not, the defaults the bound assumed.
    fake = FakeUpstream(
        reply_words=reply_words,
        context_window=model.max_input_tokens,
        max_output_tokens=model.max_output_tokens or DEFAULT_OUTPUT_CAP,
        cached_prompt_tokens=cached,
        reasoning_tokens=reasoning,
        bytes_as_tokens=bytes_as_tokens,  # the worst tokenizer: every byte of text a token
    )
    if model.max_input_tokens is None:
        assert MEDIA_PART_TOKENS <= DEFAULT_MEDIA_TOKENS
    status, answer = call_fake(fake, PATHS[route], forwarded)
    if status != 200:
        assert status == 400  # refused by the provider: billed nothing
        return
    usage = answer["usage"]
    cost = charge(price, msgspec.convert(usage, Usage).tokens()).total
    assert cost <= hold, (worst, usage)
    assert usage["prompt_tokens"] <= worst.input_tokens
    assert usage.get("completion_tokens", 0) <= worst.output_tokens
