"""`SpendledgerCallback`: a LiteLLM `CustomLogger` that records every call the LiteLLM SDK makes.

    import litellm
    from spendledger_client import SpendLedger
    from spendledger_client.litellm import SpendledgerCallback

    ledger = SpendLedger("https://gateway.example/", "sk-...", spool_path="usage.spool")
    litellm.callbacks = [SpendledgerCallback(ledger)]

LiteLLM calls the sync hooks for `completion` / `embedding` and the async ones for `acompletion` /
`aembedding` (never both for one call); a stream reaches the success hooks once, with the response
LiteLLM aggregated from its chunks. Each call is one record whose call_id is LiteLLM's own
`litellm_call_id` (what its `x-litellm-call-id` header and its logs carry), so a record sent twice
is one record at the server. The customer is the call's `user=`, else its `metadata` under one of
`user_keys`, else the callback's `user`. Failures are recorded with status "failure" and no usage.

LiteLLM downloads its model cost map at import unless `LITELLM_LOCAL_MODEL_COST_MAP=True`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from .calls import RecordFields
from .client import log
from .recorder import Recorder
from .records import Route

try:
    from litellm.integrations.custom_logger import CustomLogger
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "spendledger_client.litellm needs the litellm package: pip install 'spendledger-client[litellm]'"
    ) from exc

USER_KEYS = ("user", "end_user", "end_user_id", "customer", "customer_id")


class SpendledgerCallback(CustomLogger):  # type: ignore[misc]  # litellm's classes are untyped here
    def __init__(
        self,
        ledger: Recorder,
        *,
        user: str | None = None,
        user_keys: Sequence[str] = USER_KEYS,
        send_cost: bool = False,
        **kwargs: Any,
    ) -> None:
        """`send_cost`: send LiteLLM's `response_cost` as the record's cost (only admin keys may)."""
        super().__init__(**kwargs)
        self._ledger = ledger
        self._user = user
        self._user_keys = tuple(user_keys)
        self._send_cost = send_cost

    def log_success_event(self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._record(kwargs, response_obj, start_time, end_time, failed=False)

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        self._record(kwargs, response_obj, start_time, end_time, failed=False)

    def log_failure_event(self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._record(kwargs, response_obj, start_time, end_time, failed=True)

    async def async_log_failure_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        self._record(kwargs, response_obj, start_time, end_time, failed=True)

    def _record(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any, *, failed: bool
    ) -> None:
        # record() only queues (no network), so the async hooks call it as it is.
        try:
            self._ledger.record(**self._fields(kwargs, response_obj, start_time, end_time, failed))
        except Exception:  # a callback must never break the caller's LLM call
            log.exception("spendledger: could not record LiteLLM call %s", kwargs.get("litellm_call_id"))

    def _fields(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any, failed: bool
    ) -> RecordFields:
        standard = kwargs.get("standard_logging_object") or {}
        # A stream's final event carries the response LiteLLM assembled from the chunks.
        response = kwargs.get("complete_streaming_response") or response_obj
        fields = RecordFields(
            route=_ROUTES.get(str(kwargs.get("call_type") or ""), "chat.completions"),
            model=str(kwargs.get("model") or standard.get("model") or ""),
            usage=None if failed else getattr(response, "usage", None),
            call_id=kwargs.get("litellm_call_id") or standard.get("id"),
            user=self._customer(kwargs),
            start_time=_time(start_time),
            end_time=_time(end_time),
            status="failure" if failed else "success",
            metadata=_metadata(kwargs, standard),
        )
        cost = kwargs.get("response_cost")
        if self._send_cost and not failed and isinstance(cost, int | float):
            fields["cost"] = cost
        return fields

    def _customer(self, kwargs: Mapping[str, Any]) -> str | None:
        optional = kwargs.get("optional_params") or {}
        litellm_params = kwargs.get("litellm_params") or {}
        metadata = litellm_params.get("metadata") or kwargs.get("metadata") or {}
        candidates = [kwargs.get("user"), optional.get("user")]
        candidates += [metadata.get(key) for key in self._user_keys]
        return next((str(c) for c in candidates if c), self._user)


# LiteLLM's call types, by the kind of call the ledger bills them as (chat completions otherwise).
_ROUTES: dict[str, Route] = {
    "embedding": "embeddings", "aembedding": "embeddings",
    "text_completion": "completions", "atext_completion": "completions",
}  # fmt: skip


def _time(value: Any) -> datetime | str | None:
    if isinstance(value, datetime | str):
        return value
    if isinstance(value, int | float):  # a Unix time (some LiteLLM paths pass floats)
        return datetime.fromtimestamp(value).astimezone()
    return None


def _metadata(kwargs: Mapping[str, Any], standard: Mapping[str, Any]) -> dict[str, Any]:
    """What LiteLLM knows that the record has no field for, where it says it."""
    found = {
        "source": "litellm",
        "call_type": kwargs.get("call_type") or standard.get("call_type"),
        "provider": standard.get("custom_llm_provider"),
        "stream": bool(kwargs.get("stream")),
    }
    return {k: v for k, v in found.items() if v is not None}
