"""wrap_openai against a fake OpenAI transport, and SpendledgerCallback inside the LiteLLM SDK
against a fake OpenAI server: each call exactly one record, with the SDK's own call id."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from conftest import FAST
from sl_client_fakes import FakeLedger, FakeOpenAI, openai_handler
from spendledger_client import SpendLedger
from spendledger_client.openai import wrap_openai

# LiteLLM's own types warn as pydantic builds their schemas (at its first calls, inside these tests).
pytestmark = pytest.mark.filterwarnings("ignore:.*ReadOnly.*:UserWarning")

MESSAGES = [{"role": "user", "content": "hi"}]
CHAT_USAGE = {
    "prompt_tokens": 11,
    "completion_tokens": 7,
    "total_tokens": 18,
    "prompt_tokens_details": {"cached_tokens": 3, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 2, "audio_tokens": 0},
}
EMBEDDING_USAGE = {"prompt_tokens": 5, "completion_tokens": 0, "total_tokens": 5}


@pytest.fixture
def ledger(ledger_server: FakeLedger) -> Iterator[SpendLedger]:
    with SpendLedger(ledger_server.url, ledger_server.api_key, **FAST) as client:
        yield client


def only_record(server: FakeLedger, ledger: SpendLedger) -> dict[str, Any]:
    assert ledger.flush(timeout_s=5)
    [record] = server.records.values()
    assert server.received() == [record["call_id"]]  # sent once
    return record


# -- wrap_openai -----------------------------------------------------------------------------


def sync_openai(requests: list[dict[str, Any]]) -> openai.OpenAI:
    transport = httpx.MockTransport(openai_handler(requests))
    return openai.OpenAI(base_url="http://upstream/v1", api_key="sk-up", http_client=httpx.Client(transport=transport), max_retries=0)


def async_openai(requests: list[dict[str, Any]]) -> openai.AsyncOpenAI:
    transport = httpx.MockTransport(openai_handler(requests))
    return openai.AsyncOpenAI(
        base_url="http://upstream/v1", api_key="sk-up", http_client=httpx.AsyncClient(transport=transport), max_retries=0
    )


def test_openai_chat(ledger_server: FakeLedger, ledger: SpendLedger) -> None:
    client = wrap_openai(sync_openai([]), ledger, user="default-customer")
    response = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, user="c1")
    record = only_record(ledger_server, ledger)
    assert record["call_id"] == response.id and record["model"] == "gpt-4o" and record["user"] == "c1"
    assert record["usage"] == CHAT_USAGE and record["status"] == "success"
    assert client.models is not None  # the rest of the client is the client's


def test_openai_chat_stream(ledger_server: FakeLedger, ledger: SpendLedger) -> None:
    requests: list[dict[str, Any]] = []
    client = wrap_openai(sync_openai(requests), ledger, user="default-customer")
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    assert requests[0]["stream_options"] == {"include_usage": True}
    assert all(c.choices for c in chunks)  # the usage chunk the wrapper asked for is not passed on
    record = only_record(ledger_server, ledger)
    assert record["call_id"] == chunks[0].id and record["usage"] == CHAT_USAGE
    assert record["user"] == "default-customer"


def test_openai_stream_where_the_caller_asked_for_usage(ledger_server: FakeLedger, ledger: SpendLedger) -> None:
    client = wrap_openai(sync_openai([]), ledger)
    with client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    ) as stream:
        chunks = list(stream)
    assert chunks[-1].usage is not None  # theirs to see
    assert only_record(ledger_server, ledger)["usage"] == CHAT_USAGE


def test_openai_embeddings(ledger_server: FakeLedger, ledger: SpendLedger) -> None:
    client = wrap_openai(sync_openai([]), ledger)
    response = client.embeddings.create(model="text-embedding-3-small", input="hi", user="c2")
    record = only_record(ledger_server, ledger)
    assert record["call_id"] == response._request_id and record["usage"] == EMBEDDING_USAGE
    assert record["user"] == "c2"


def test_openai_failure_is_recorded(ledger_server: FakeLedger, ledger: SpendLedger) -> None:
    client = wrap_openai(sync_openai([]), ledger, user="c1")
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="boom", messages=MESSAGES)
    record = only_record(ledger_server, ledger)
    assert record["call_id"] == "req-boom" and record["status"] == "failure" and record["usage"] is None


async def test_openai_async(ledger_server: FakeLedger, ledger: SpendLedger) -> None:
    client = wrap_openai(async_openai([]), ledger, user="c1")
    response = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    chunks = [chunk async for chunk in stream]
    embedding = await client.embeddings.create(model="text-embedding-3-small", input="hi")
    assert ledger.flush(timeout_s=5)
    records = ledger_server.records
    assert sorted(ledger_server.received()) == sorted([response.id, chunks[0].id, embedding._request_id])
    assert records[response.id]["usage"] == records[chunks[0].id]["usage"] == CHAT_USAGE
    assert records[embedding._request_id]["usage"] == EMBEDDING_USAGE


async def asettle_litellm(server: FakeLedger, ledger: SpendLedger, count: int = 1) -> list[dict[str, Any]]:
    """acompletion's success hooks are tasks on this loop: it must turn while they are awaited."""
    for _ in range(500):
        if len(server.records) >= count:
            break
        await asyncio.sleep(0.01)
    return settle_litellm(server, ledger, count)


# -- LiteLLM ---------------------------------------------------------------------------------

litellm = pytest.importorskip("litellm")


@pytest.fixture
def callback(ledger: SpendLedger) -> Iterator[Any]:
    from spendledger_client.litellm import SpendledgerCallback

    callback = SpendledgerCallback(ledger)
    litellm.callbacks = [callback]
    yield callback
    # LiteLLM copies its callbacks into its success/failure lists at the first call: each test's
    # callback (holding that test's closed ledger) must leave all of them.
    litellm.logging_callback_manager.remove_callback_from_all_lists(callback)


def upstream(server: FakeOpenAI) -> dict[str, Any]:
    return {"api_base": server.url, "api_key": "sk-up"}


def settle_litellm(server: FakeLedger, ledger: SpendLedger, count: int = 1) -> list[dict[str, Any]]:
    """LiteLLM runs its success callbacks in a thread pool, after the call returns."""
    server.wait_for(count)
    assert ledger.flush(timeout_s=5)
    assert len(server.received()) == count  # no call recorded twice (sync and async hooks both)
    return list(server.records.values())


def test_litellm_completion(ledger_server: FakeLedger, ledger: SpendLedger, openai_server: FakeOpenAI, callback: Any) -> None:
    response = litellm.completion(model="openai/fake", messages=MESSAGES, user="c1", **upstream(openai_server))
    [record] = settle_litellm(ledger_server, ledger)
    assert record["call_id"] == response._hidden_params["litellm_call_id"]
    assert record["usage"]["prompt_tokens"] == 11 and record["usage"]["completion_tokens"] == 7
    assert record["user"] == "c1" and record["status"] == "success" and record["model"] == "fake"
    assert record["start_time"] and record["end_time"]


async def test_litellm_acompletion(ledger_server: FakeLedger, ledger: SpendLedger, openai_server: FakeOpenAI, callback: Any) -> None:
    response = await litellm.acompletion(
        model="openai/fake", messages=MESSAGES, metadata={"user": "c-meta"}, **upstream(openai_server)
    )
    [record] = await asettle_litellm(ledger_server, ledger)
    assert record["call_id"] == response._hidden_params["litellm_call_id"]
    assert record["user"] == "c-meta" and record["usage"]["total_tokens"] == 18


def test_litellm_stream(ledger_server: FakeLedger, ledger: SpendLedger, openai_server: FakeOpenAI, callback: Any) -> None:
    stream = litellm.completion(model="openai/fake", messages=MESSAGES, stream=True, user="c1", **upstream(openai_server))
    chunks = list(stream)
    assert chunks
    [record] = settle_litellm(ledger_server, ledger)
    assert record["call_id"] == stream.logging_obj.litellm_call_id
    assert record["usage"]["prompt_tokens"] > 0 and record["usage"]["completion_tokens"] > 0


async def test_litellm_astream(ledger_server: FakeLedger, ledger: SpendLedger, openai_server: FakeOpenAI, callback: Any) -> None:
    stream = await litellm.acompletion(
        model="openai/fake", messages=MESSAGES, stream=True, user="c1", litellm_call_id="mine-1", **upstream(openai_server)
    )
    chunks = [chunk async for chunk in stream]
    assert chunks
    [record] = await asettle_litellm(ledger_server, ledger)
    assert record["call_id"] == "mine-1"  # an id the caller gave LiteLLM is its call id
    assert record["usage"]["completion_tokens"] > 0


def test_litellm_embedding(ledger_server: FakeLedger, ledger: SpendLedger, openai_server: FakeOpenAI, callback: Any) -> None:
    response = litellm.embedding(model="openai/fake-embed", input=["hi"], user="c3", **upstream(openai_server))
    [record] = settle_litellm(ledger_server, ledger)
    assert record["call_id"] == response._hidden_params["litellm_call_id"]
    assert record["usage"]["prompt_tokens"] == 5 and record["user"] == "c3"


def test_litellm_failure(ledger_server: FakeLedger, ledger: SpendLedger, openai_server: FakeOpenAI, callback: Any) -> None:
    with pytest.raises(Exception):  # noqa: B017 (LiteLLM's own exception types)
        litellm.completion(model="openai/boom", messages=MESSAGES, user="c1", num_retries=0, **upstream(openai_server))
    [record] = settle_litellm(ledger_server, ledger)
    assert record["status"] == "failure" and record["usage"] is None and record["user"] == "c1"
