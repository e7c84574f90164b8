"""The translating transport as api/upstream.py uses it (`Upstream.send` to an `anthropic/` deployment,
against the fake Messages API): Anthropic's headers kept for the router and the client, a stream that
breaks ended with the usage so far and a transport error, an answer that is not Anthropic's a 502;
and the default `max_tokens` never above the output the hold is taken for."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import msgspec
import pytest

from spendledger.api.anthropic.transport import TRANSLATOR, AnthropicTransport, default_max_tokens
from spendledger.api.anthropic.wire import DEFAULT_MAX_TOKENS
from spendledger.api.upstream import Upstream
from spendledger.ledger.config import Deployment
from spendledger.ledger.holds import RequestShape, worst_case_tokens
from spendledger.ledger.pricing import limits_for
from tests.fakes.anthropic import RunningAnthropic, run_fake_anthropic
from tests.fakes.anthropic_rules import prompt_tokens

KEY = "sk-ant-unit-4c1e"
CHAT = msgspec.json.encode({"model": "claude", "messages": [{"role": "user", "content": "Hello there"}]})
STREAM = msgspec.json.encode(
    {"model": "claude", "messages": [{"role": "user", "content": "Hello there"}], "stream": True}
)


def deployment(api_base: str, model: str = "claude-3-5-haiku-20241022", max_output: int | None = None) -> Deployment:
    return Deployment(
        model_name="claude", deployment_id=f"d-{model}-{max_output}", provider="anthropic", upstream_model=model,
        api_base=api_base, api_key=KEY, wire="anthropic", timeout_s=10, max_output_tokens=max_output,
    )  # fmt: skip


@pytest.fixture(scope="module")
def anthropic() -> Iterator[RunningAnthropic]:
    with run_fake_anthropic() as running:
        yield running


@pytest.fixture
async def upstream(anthropic: RunningAnthropic) -> AsyncIterator[Upstream]:
    anthropic.app.reset()
    anthropic.app.required_api_key = KEY
    client = Upstream(max_connections=4)
    yield client
    await client.aclose()


async def test_an_answer_keeps_anthropics_request_id_and_rate_limit_headers(
    upstream: Upstream, anthropic: RunningAnthropic
) -> None:
    response = await upstream.send(deployment(anthropic.base_url), "/chat/completions", CHAT, stream=False)
    assert response.status_code == 200
    assert response.json()["object"] == "chat.completion"
    assert response.headers["request-id"].startswith("req_")
    assert response.headers["anthropic-ratelimit-requests-remaining"] == "3999"
    assert "anthropic-organization-id" not in response.headers  # nothing else of Anthropic's


async def test_a_rate_limit_keeps_its_retry_after(upstream: Upstream, anthropic: RunningAnthropic) -> None:
    anthropic.app.fail_status, anthropic.app.retry_after_s = 429, 12
    response = await upstream.send(deployment(anthropic.base_url), "/chat/completions", CHAT, stream=True)
    await response.aread()
    assert response.status_code == 429
    assert response.headers["retry-after"] == "12"
    assert response.headers["request-id"].startswith("req_")
    assert response.json()["error"]["type"] == "rate_limit_error"


async def test_a_stream_cut_short_ends_with_a_transport_error_and_its_translator_keeps_the_usage_so_far(
    upstream: Upstream, anthropic: RunningAnthropic
) -> None:
    anthropic.app.cut_stream_after = 2
    response = await upstream.send(deployment(anthropic.base_url), "/chat/completions", STREAM, stream=True)
    received = b""
    with pytest.raises(httpx.RemoteProtocolError, match="before message_stop"):
        async for data in response.aiter_bytes():
            received += data
    await response.aclose()
    # The relay bills what the translator kept and sends the usage chunk itself (to those who ask).
    translator = response.extensions[TRANSLATOR]
    assert translator.usage is not None and translator.usage_estimated
    assert translator.usage.prompt_tokens == prompt_tokens(anthropic.app.requests[-1].json or {})[0]
    assert b'"usage"' not in received and b"[DONE]" not in received
    assert all(e.startswith(b"data: ") for e in received.strip().split(b"\n\n"))  # whole events only


async def test_a_200_that_is_not_a_messages_answer_is_a_502() -> None:
    def broken_proxy(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>gateway</html>", headers={"content-type": "text/html"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(broken_proxy)) as inner:
        transport = AnthropicTransport(inner, deployment("http://anthropic.invalid"), "/chat/completions")
        request = httpx.Request("POST", "http://anthropic.invalid/v1/messages", content=CHAT)
        response = await transport.handle_async_request(request)
    assert response.status_code == 502
    assert msgspec.json.decode(response.content)["error"]["code"] == "502"


@pytest.mark.parametrize(
    ("model", "max_output", "expected"),
    [("claude-3-5-haiku-20241022", None, DEFAULT_MAX_TOKENS),  # the catalogue's window, 200k
     ("claude-3-5-haiku-20241022", 1000, 1000),  # model_info's limit, lower
     ("claude-of-the-future", None, DEFAULT_MAX_TOKENS)],  # unknown: the hold assumes 4096 too
)  # fmt: skip
def test_the_default_max_tokens_is_within_the_holds_worst_case(model: str, max_output: int | None, expected: int) -> None:
    target = deployment("https://api.anthropic.com", model, max_output)
    assert default_max_tokens(target) == expected
    worst = worst_case_tokens(RequestShape(text_tokens=10), limits_for(target))  # no max_tokens sent
    assert worst.output_tokens >= expected
