"""Property: any OpenAI conversation translates to one Anthropic takes (the fake's copy of its
rules: first turn the user's, roles alternating, no blank text, every tool call answered in the
next turn), or to the 400 LiteLLM answers for a conversation that does not begin with the user —
and no text, image or tool call is lost on the way."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from spendledger.api.anthropic.request import to_messages_request
from spendledger.api.errors import ApiError
from tests.fakes.anthropic_rules import check_request

TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
texts = st.one_of(st.just(""), st.just("  "), st.text(min_size=1, max_size=12))
parts = st.one_of(
    texts.map(lambda t: {"type": "text", "text": t}),
    st.sampled_from(["data:image/png;base64,iVBORw0KGgo=", "https://example.com/a.jpg"]).map(
        lambda url: {"type": "image_url", "image_url": {"url": url}}
    ),
)
contents = st.one_of(texts, st.lists(parts, max_size=3))


@st.composite
def conversation(draw: st.DrawFn) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": draw(texts)}] if draw(st.booleans()) else []
    if draw(st.integers(min_value=0, max_value=3)):  # mostly, as clients do, the user speaks first
        messages.append({"role": "user", "content": "Hello"})
    calls = 0
    for kind in draw(st.lists(st.sampled_from(["system", "developer", "user", "assistant", "tools"]), max_size=10)):
        if kind in ("system", "developer"):
            messages.append({"role": kind, "content": draw(texts)})
        elif kind == "user":
            messages.append({"role": "user", "content": draw(contents)})
        elif kind == "assistant":
            messages.append({"role": "assistant", "content": draw(st.one_of(st.none(), texts))})
        else:  # an assistant's tool calls, each answered by a tool message
            ids = [f"call_{calls + i}" for i in range(draw(st.integers(min_value=1, max_value=3)))]
            calls += len(ids)
            tool_calls = [{"id": i, "type": "function", "function": {"name": "lookup", "arguments": '{"q": 1}'}} for i in ids]
            messages.append({"role": "assistant", "content": draw(st.one_of(st.none(), texts)), "tool_calls": tool_calls})
            messages += [{"role": "tool", "tool_call_id": i, "content": draw(texts)} for i in ids]
    return messages


def _visible(messages: list[dict[str, Any]]) -> tuple[int, int]:
    """The non-blank texts and the images of the conversation (system included)."""
    texts_, images = 0, 0
    for message in messages:
        content = message.get("content")
        items = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        texts_ += sum(1 for p in items if p["type"] == "text" and p["text"].strip())
        images += sum(1 for p in items if p["type"] == "image_url")
    return texts_, images


@settings(max_examples=250, deadline=None)
@given(conversation())
def test_every_conversation_translates_to_one_anthropic_takes_or_to_a_clear_400(messages: list[dict[str, Any]]) -> None:
    body = msgspec.json.encode({"model": "m", "messages": messages, "tools": [TOOL]})
    try:
        translated = msgspec.json.decode(to_messages_request(body, "claude"))
    except ApiError as exc:
        assert exc.status == 400 and exc.param == "messages"
        assert "user message" in exc.message
        return
    check_request(translated)
    roles = [m["role"] for m in translated["messages"]]
    assert roles[0] == "user" and all(a != b for a, b in pairwise(roles))
    blocks = [b for m in translated["messages"] for b in m["content"]] + translated.get("system", [])
    results = [b for b in blocks if b["type"] == "tool_result"]
    sent_texts = sum(1 for b in blocks if b["type"] == "text") + sum(len(b["content"]) for b in results)
    expected_texts, expected_images = _visible(messages)
    assert sent_texts == expected_texts
    assert sum(1 for b in blocks if b["type"] == "image") == expected_images
    assert sum(1 for b in blocks if b["type"] == "tool_use") == len(results) == sum(
        len(m.get("tool_calls") or ()) for m in messages
    )
