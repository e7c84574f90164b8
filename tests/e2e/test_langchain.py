"""The seed's LangChain example (langchain_openai.ChatOpenAI) against a real `spendledger serve`."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal

import httpx
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI

from tests.e2e.conftest import INPUT_PRICE, MASTER_KEY, OUTPUT_PRICE
from tests.fakes.upstream import REPLY_WORDS, RunningUpstream, prompt_tokens_for_messages, reply_for
from tests.support import RunningServer

AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
SYSTEM = "You are a helpful assistant that im using to make a test request to."
HUMAN = "test from litellm. tell me why it's amazing in 1 sentence"


def test_chat_openai_with_extra_body_user_bills_the_customer_exactly(
    server: RunningServer, upstream: RunningUpstream
) -> None:
    customer = f"lc-{uuid.uuid4().hex[:10]}"
    chat = ChatOpenAI(
        base_url=server.base_url,
        api_key=MASTER_KEY,
        model="fake-openai-endpoint",
        temperature=0.1,
        extra_body={"user": customer},
        max_retries=0,
    )
    response = chat.invoke([SystemMessage(content=SYSTEM), HumanMessage(content=HUMAN)])

    wire_messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": HUMAN}]
    prompt_tokens = prompt_tokens_for_messages(wire_messages)
    assert isinstance(response, AIMessage)
    assert response.content == reply_for(wire_messages)
    assert response.usage_metadata is not None
    assert response.usage_metadata["input_tokens"] == prompt_tokens
    assert response.usage_metadata["output_tokens"] == REPLY_WORDS

    forwarded = upstream.app.requests[-1]
    assert forwarded.path == "/v1/chat/completions"
    assert forwarded.json["user"] == customer
    assert forwarded.json["temperature"] == 0.1
    assert forwarded.json["model"] == "fake"
    assert forwarded.json["messages"] == wire_messages

    expected = prompt_tokens * Decimal(INPUT_PRICE) + REPLY_WORDS * Decimal(OUTPUT_PRICE)
    info = httpx.get(f"{server.base_url}/customer/info", params={"end_user_id": customer}, headers=AUTH)
    assert info.status_code == 200, info.text
    body = json.loads(info.text, parse_float=Decimal)
    assert body["user_id"] == customer
    assert body["spend"] == expected

    # A second call through the same ChatOpenAI adds exactly one more request's cost.
    chat.invoke([SystemMessage(content=SYSTEM), HumanMessage(content=HUMAN)])
    info = httpx.get(f"{server.base_url}/customer/info", params={"end_user_id": customer}, headers=AUTH)
    assert json.loads(info.text, parse_float=Decimal)["spend"] == 2 * expected
