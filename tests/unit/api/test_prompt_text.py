"""The prompt's text bound: bytes of what the provider tokenizes, OpenAI's chat format on top, and
nothing for the JSON around it or the parameters that never reach the prompt."""

from __future__ import annotations

from typing import Any

import msgspec

from spendledger.api.prompt_text import MESSAGE_OVERHEAD, NAME_OVERHEAD, REPLY_PRIMING, prompt_text_tokens
from spendledger.api.request_body import decode_body


def bound(body: dict[str, Any]) -> int:
    return prompt_text_tokens(decode_body(msgspec.json.encode(body)).fields)


def chat(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": list(messages), **fields}


def test_a_message_is_its_role_and_text_bytes_plus_the_chat_format() -> None:
    assert bound(chat({"role": "user", "content": "what time is it"})) == REPLY_PRIMING + MESSAGE_OVERHEAD + 4 + 15


def test_parameters_and_the_customer_are_not_prompt() -> None:
    plain = bound(chat({"role": "user", "content": "hi"}))
    tuned = chat(
        {"role": "user", "content": "hi"}, max_tokens=16, temperature=0.2, user="a-customer-with-a-long-id",
        metadata={"note": "x" * 500}, stop=["y" * 50], stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    assert bound(tuned) == plain


def test_text_is_counted_in_utf8_bytes_and_a_name_adds_one() -> None:
    named = bound(chat({"role": "user", "content": "日本", "name": "ada"}))
    assert named == REPLY_PRIMING + MESSAGE_OVERHEAD + 4 + 6 + 3 + NAME_OVERHEAD


def test_media_parts_are_left_to_the_per_part_bound_and_text_parts_counted() -> None:
    parts = [
        {"type": "text", "text": "describe"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 10_000}},
        {"type": "input_audio", "input_audio": {"data": "B" * 5_000, "format": "wav"}},
    ]
    counted = bound(chat({"role": "user", "content": parts}))
    assert counted == REPLY_PRIMING + MESSAGE_OVERHEAD + 4 + len("text") + len("describe")


def test_tool_calls_and_their_results_are_counted() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "clock", "arguments": '{"tz":"UTC"}'}}
    messages = (
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    )
    strings = "assistant" + "call_1" + "function" + "clock" + '{"tz":"UTC"}' + "tool" + "call_1" + "12:00"
    assert bound(chat(*messages)) == REPLY_PRIMING + 2 * MESSAGE_OVERHEAD + len(strings)


def test_tools_and_unknown_fields_count_as_the_json_sent() -> None:
    tools = [{"type": "function", "function": {"name": "clock", "parameters": {"type": "object"}}}]
    plain = bound(chat({"role": "user", "content": "hi"}))
    assert bound(chat({"role": "user", "content": "hi"}, tools=tools)) == plain + len(msgspec.json.encode(tools))
    assert bound(chat({"role": "user", "content": "hi"}, documents=["zz"])) == plain + len(b'["zz"]')


def test_completions_and_embeddings_count_strings_by_bytes_and_token_ids_one_each() -> None:
    assert bound({"model": "m", "prompt": ["abc", "défg"]}) == 3 + 5
    assert bound({"model": "m", "prompt": [15496, 11, 995]}) == 3
    assert bound({"model": "m", "input": [[1, 2], [3]]}) == 3
    assert bound({"model": "m", "input": "hello"}) == 5
