"""The router's parts that need no server: the backoff, the provider's headers, the shuffle's
spread, cooldowns (api/attempts.py, api/upstream.py, api/routing.py, api/cooldowns.py)."""

from __future__ import annotations

import email.utils
import time
from collections import Counter

import httpx

from spendledger.api.attempts import backoff_s, context_window_error, retried
from spendledger.api.cooldowns import Cooldowns
from spendledger.api.routing import ModelRouter
from spendledger.api.upstream import provider_headers, retry_after_s
from spendledger.ledger.config import Deployment
from spendledger.ledger.router_settings import RouterSettings


def deployment(name: str, group: str = "g", **limits: int) -> Deployment:
    return Deployment(
        model_name=group, deployment_id=name, provider="openai", upstream_model=name, api_base="https://u", **limits
    )


def test_retry_after_is_read_in_its_three_spellings_and_bounded() -> None:
    assert retry_after_s(httpx.Headers({"retry-after-ms": "1500", "retry-after": "9"})) == 1.5
    assert retry_after_s(httpx.Headers({"retry-after": "2"})) == 2.0
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    wait = retry_after_s(httpx.Headers({"retry-after": date}))
    assert wait is not None and 25 < wait <= 30
    for ignored in ("0", "-1", "3600", "soon"):
        assert retry_after_s(httpx.Headers({"retry-after": ignored})) is None
    assert retry_after_s(httpx.Headers()) is None


def test_backoff_doubles_to_its_cap_with_jitter_and_honours_the_provider() -> None:
    for retry, base in ((0, 0.5), (1, 1.0), (2, 2.0), (5, 8.0), (9, 8.0)):
        assert base <= backoff_s(retry, None) <= base + 0.75
    assert 3.0 <= backoff_s(0, 3.0) <= 3.75


def test_what_is_retried_and_what_is_a_context_window_error() -> None:
    assert all(retried(s) for s in (401, 403, 404, 408, 409, 429, 500, 502, 503, 504))
    assert not any(retried(s) for s in (400, 413, 422))
    assert context_window_error(400, b'{"error": {"code": "context_length_exceeded"}}')
    assert not context_window_error(400, b'{"error": {"message": "bad temperature"}}')
    assert not context_window_error(500, b"context_length_exceeded")


def test_provider_headers_as_litellm_names_them_and_nothing_else() -> None:
    passed = provider_headers(
        httpx.Headers(
            {"x-request-id": "req_1", "x-ratelimit-remaining-tokens": "99", "set-cookie": "s=1", "server": "x"}
        )
    )
    assert passed == {
        "llm_provider-x-request-id": "req_1",
        "x-ratelimit-remaining-tokens": "99",
        "llm_provider-x-ratelimit-remaining-tokens": "99",
    }


def test_simple_shuffle_spreads_by_weight_else_rpm_and_evenly_without() -> None:
    weighted = ModelRouter((deployment("a", rpm=300), deployment("b", rpm=100)))
    picks = Counter(weighted.pick("g").deployment_id for _ in range(400))  # type: ignore[union-attr]
    assert picks == {"a": 300, "b": 100}
    by_weight = ModelRouter((deployment("a", rpm=300, weight=1), deployment("b", weight=3)))  # weight over rpm
    assert Counter(by_weight.pick("g").deployment_id for _ in range(400)) == {"a": 100, "b": 300}  # type: ignore[union-attr]
    even = ModelRouter((deployment("a"), deployment("b")))
    assert [even.pick("g").deployment_id for _ in range(4)] == ["a", "b", "a", "b"]  # type: ignore[union-attr]


def test_tried_and_cooling_deployments_go_last() -> None:
    router = ModelRouter((deployment("a"), deployment("b"), deployment("c")), RouterSettings(allowed_fails=0))
    assert router.cooldowns.failed("a", "g", 500)  # allowed_fails 0: the first failure cools it down
    assert [d.deployment_id for d in router.order("g", {"b"})][-2:] == ["b", "a"]


def test_cooldowns_count_a_minutes_failures_and_spare_a_groups_only_deployment() -> None:
    cooldowns = Cooldowns(RouterSettings(allowed_fails=2, cooldown_time_s=60), {"g": 2, "solo": 1})
    assert not cooldowns.failed("a", "g", 500) and not cooldowns.failed("a", "g", 429)
    assert not cooldowns.failed("a", "g", 400)  # the caller's own error does not count
    assert cooldowns.failed("a", "g", 503) and cooldowns.cooling("a")
    for _ in range(5):
        assert not cooldowns.failed("s", "solo", 500)
    assert not cooldowns.cooling("s")
