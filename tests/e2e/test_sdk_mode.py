"""Seed 003's SDK tab against the real gateway: the LiteLLM SDK (with spendledger-client's callback)
and the OpenAI SDK (wrapped) call the fake provider directly, and each call becomes exactly one
UsageRecorded and one Lago event, with its customer and the cost the gateway's own prices give.
The client's spool carries records across a gateway outage and a client restart."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
from spendledger_client import SpendLedger
from spendledger_client.openai import wrap_openai

from tests.e2e.conftest import INPUT_PRICE, MASTER_KEY, OUTPUT_PRICE
from tests.e2e.enforcement_support import wait_until
from tests.e2e.outbox_support import lago_env, outbox_config
from tests.e2e.test_roles import fetch
from tests.fakes.lago import FakeLago, RunningLago, run_fake_lago
from tests.fakes.upstream import RunningUpstream
from tests.support import PostgresForTests, RunningServer, free_port, run_server

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download at import: the network is closed
import litellm
from spendledger_client.litellm import SpendledgerCallback

MODEL = "fake-openai-endpoint"  # a model group of the gateway's config, priced there


@pytest.fixture(scope="module")
def lago() -> Iterator[RunningLago]:
    with run_fake_lago(FakeLago()) as running:
        yield running


@pytest.fixture(scope="module")
def database(postgres: PostgresForTests) -> Iterator[str]:
    url = postgres.new_database()
    yield url
    postgres.drop_database(url)


@pytest.fixture(scope="module")
def server(database: str, upstream: RunningUpstream, lago: RunningLago) -> Iterator[RunningServer]:
    with run_server(outbox_config(upstream.base_url, lago=True), database, env=lago_env(lago.base_url)) as running:
        yield running


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def usage_events(database_url: str, customer: str) -> list[dict[str, Any]]:
    return fetch(
        database_url,
        "select data->>'call_id' as call_id, (data->>'cost')::numeric as cost, (data->>'input_tokens')::int as input, "
        "(data->>'output_tokens')::int as output, data->>'route' as route, metadata->>'source' as source "
        "from events where type = 'UsageRecorded' and data->>'customer_id' = $1 order by position",
        customer,
    )


def priced(event: dict[str, Any]) -> Decimal:
    return Decimal(INPUT_PRICE) * event["input"] + Decimal(OUTPUT_PRICE) * event["output"]


class AwaitableCallback(SpendledgerCallback):  # type: ignore[misc]
    """LiteLLM logs an async call from a task it leaves running after the call returns: the test
    waits for that task, as a long-lived application's event loop would run it."""

    async def async_log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        await super().async_log_success_event(kwargs, response_obj, start_time, end_time)
        self.logged.set()

    async def acompletion_logged(self, **kwargs: Any) -> str:
        self.logged = asyncio.Event()
        response = await litellm.acompletion(**kwargs)
        await asyncio.wait_for(self.logged.wait(), 30)
        return str(response.id)


def test_the_litellm_sdk_with_the_callback_bills_each_call_once(
    server: RunningServer, upstream: RunningUpstream, lago: RunningLago
) -> None:
    customer = unique("litellm-customer")
    messages = [{"role": "user", "content": "what is the capital of france"}]
    with SpendLedger(server.base_url, MASTER_KEY, flush_interval_s=0.05) as ledger:
        callback = AwaitableCallback(ledger)
        litellm.callbacks = [callback]
        try:
            common: dict[str, Any] = {"api_base": upstream.base_url, "api_key": "sk-upstream", "user": customer}
            ids = [litellm.completion(model=f"openai/{MODEL}", messages=messages, **common).id]
            ids.append(asyncio.run(callback.acompletion_logged(model=f"openai/{MODEL}", messages=messages, **common)))
            stream = litellm.completion(model=f"openai/{MODEL}", messages=messages, stream=True,
                                        stream_options={"include_usage": True}, **common)
            assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
            litellm.embedding(model="openai/text-embedding-3-small", input=["hello there"], **common)
            assert wait_until(lambda: len(usage_events(server.database_url, customer)) >= 4, 30)
            ledger.flush(timeout_s=30)
        finally:
            litellm.logging_callback_manager.remove_callback_from_all_lists(callback)
            litellm.callbacks = []
    events = usage_events(server.database_url, customer)
    assert len(events) == 4 and len({e["call_id"] for e in events}) == 4  # one each, no more
    assert all(e["source"] == "ingest" for e in events)
    chats = [e for e in events if e["route"] == "chat.completions"]
    assert len(chats) == 3 and all(e["cost"] == priced(e) and e["cost"] > 0 for e in chats)
    assert [e["route"] for e in events if e not in chats] == ["embeddings"]
    assert all(e["input"] > 0 for e in events)
    calls = {e["call_id"] for e in events}
    assert wait_until(lambda: calls <= {tid for _, tid in dict(lago.app.accepted)}, 30)


def test_the_openai_sdk_wrapped_bills_each_call_once(server: RunningServer, upstream: RunningUpstream) -> None:
    customer = unique("openai-customer")
    messages = [{"role": "user", "content": "tell me a joke about ledgers"}]
    with SpendLedger(server.base_url, MASTER_KEY, flush_interval_s=0.05) as ledger:
        client = wrap_openai(openai.OpenAI(base_url=upstream.base_url, api_key="sk-upstream"), ledger, user=customer)
        first = client.chat.completions.create(model=MODEL, messages=messages)
        chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True))
        assert chunks
        client.embeddings.create(model="text-embedding-3-small", input="hello")

        async def async_call() -> str:
            async_client = wrap_openai(openai.AsyncOpenAI(base_url=upstream.base_url, api_key="sk-upstream"), ledger,
                                       user=customer)
            answer = await async_client.chat.completions.create(model=MODEL, messages=messages)
            return answer.id

        second_id = asyncio.run(async_call())
        ledger.flush(timeout_s=30)
    events = usage_events(server.database_url, customer)
    assert len(events) == 4
    assert {first.id, second_id} <= {e["call_id"] for e in events}
    chats = [e for e in events if e["route"] == "chat.completions"]
    assert len(chats) == 3 and all(e["cost"] == priced(e) for e in chats)


def test_the_spool_carries_records_across_a_gateway_outage_and_a_client_restart(
    database: str, upstream: RunningUpstream, lago: RunningLago, tmp_path: Path
) -> None:
    """The client first knows only a gateway address where nothing listens (the outage); a gateway
    on that database is started only after the client was closed with its records spooled."""
    customer = unique("spooled")
    spool = tmp_path / "usage.spool"
    down = f"http://127.0.0.1:{free_port()}"
    first = SpendLedger(down, MASTER_KEY, spool_path=str(spool), flush_interval_s=0.05, close_timeout_s=0.5,
                        initial_backoff_s=0.05, max_backoff_s=0.2)
    call_ids = [first.record(model=MODEL, user=customer, usage={"prompt_tokens": 10, "completion_tokens": 5,
                                                                 "total_tokens": 15}) for _ in range(5)]
    first.close()  # the gateway is down: nothing delivered, all kept in the spool
    assert usage_events(database, customer) == []
    assert spool.exists()
    config = outbox_config(upstream.base_url, lago=True)
    with run_server(config, database, env=lago_env(lago.base_url)) as gateway:
        with SpendLedger(gateway.base_url, MASTER_KEY, spool_path=str(spool), flush_interval_s=0.05) as second:
            second.flush(timeout_s=30)  # the restarted client sends what the first one left
        events = usage_events(database, customer)
    assert sorted(e["call_id"] for e in events) == sorted(call_ids)
    assert all(e["cost"] == Decimal(INPUT_PRICE) * 10 + Decimal(OUTPUT_PRICE) * 5 for e in events)

