"""AsyncSpendLedger: SpendLedger's API for asyncio code.

The batches still go out from the sync ledger's background thread: it is work off every request's
path, and one sender (one queue, one spool) whatever mix of sync and async code records. What is on
a request's path is native async: `admit`, `record_now`, and `call`'s admission. `record()` stays a
plain method (it only queues: an append and an fsync when there is a spool), so LiteLLM's and the
OpenAI wrapper's async paths can call it too; `flush` and `close` wait in a worker thread.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from types import TracebackType
from typing import Any, Unpack

import httpx

from .calls import Call, RecordFields
from .client import OnError, SpendLedger, _unavailable, log
from .delivery import Attempt, Verdict, admit_body, hold_from, interpret, unreachable
from .errors import APIError, Unreachable
from .records import Hold, Result, encode_batch, make_record
from .spool import Entry


class AsyncSpendLedger:
    """`SpendLedger` with awaitable `admit`, `record_now`, `flush`, `close` and `async with`."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        spool_path: str | os.PathLike[str] | None = None,
        batch_size: int = 100,
        flush_interval_s: float = 1.0,
        timeout_s: float = 10.0,
        max_backoff_s: float = 60.0,
        initial_backoff_s: float = 0.5,
        close_timeout_s: float = 10.0,
        on_error: OnError | None = None,
        http_client: httpx.AsyncClient | None = None,
        sender_http_client: httpx.Client | None = None,
    ) -> None:
        self._ledger = SpendLedger(
            base_url,
            api_key,
            spool_path=spool_path,
            batch_size=batch_size,
            flush_interval_s=flush_interval_s,
            timeout_s=timeout_s,
            max_backoff_s=max_backoff_s,
            initial_backoff_s=initial_backoff_s,
            close_timeout_s=close_timeout_s,
            on_error=on_error,
            http_client=sender_http_client,
        )
        self._http = http_client or httpx.AsyncClient(timeout=timeout_s)
        self._owns_http = http_client is None

    @property
    def sync(self) -> SpendLedger:
        """The sync ledger underneath (same queue and spool), for code that cannot await."""
        return self._ledger

    def record(self, **fields: Unpack[RecordFields]) -> str:
        """Queue one record (no await: it does not wait on the network); returns its call_id."""
        return self._ledger.record(**fields)

    async def record_now(self, **fields: Unpack[RecordFields]) -> Result:
        """As `SpendLedger.record_now`, awaiting the network and the backoff."""
        ledger = self._ledger
        entry = ledger._enqueue_in_flight(make_record(**fields))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ledger.timeout_s
        for n in itertools.count():
            attempt = await self._post([entry])
            if attempt.verdict is not Verdict.RETRY:
                return ledger._finish_now(entry, attempt)
            delay = ledger.backoff.delay(n, attempt.retry_after_s)
            if loop.time() + delay > deadline:
                raise ledger._defer(entry, attempt)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def admit(
        self,
        model: str,
        *,
        user: str | None = None,
        prompt_tokens: int | None = None,
        messages: list[Any] | None = None,
        max_tokens: int | None = None,
        n: int | None = None,
    ) -> Hold:
        """As `SpendLedger.admit`."""
        body = admit_body(model, user, prompt_tokens, messages, max_tokens, n)
        try:
            response = await self._http.post(
                self._ledger._url("/usage/admit"), json=body, headers=self._ledger.headers
            )
        except httpx.HTTPError as exc:
            raise Unreachable(f"{type(exc).__name__}: {exc}") from exc
        return hold_from(response, model, user)

    def call(
        self,
        model: str,
        *,
        user: str | None = None,
        user_id: str | None = None,
        team_id: str | None = None,
        prompt_tokens: int | None = None,
        messages: list[Any] | None = None,
        max_tokens: int | None = None,
        n: int | None = None,
        metadata: dict[str, Any] | None = None,
        fail_open: bool = False,
    ) -> AsyncCallScope:
        """`async with ledger.call(...) as call:`, as `SpendLedger.call`."""
        call = Call(model=model, user=user, user_id=user_id, team_id=team_id, metadata=dict(metadata or {}))
        admission = {"prompt_tokens": prompt_tokens, "messages": messages, "max_tokens": max_tokens, "n": n}
        return AsyncCallScope(self, call, admission, fail_open)

    async def flush(self, timeout_s: float | None = None) -> bool:
        return await asyncio.to_thread(self._ledger.flush, timeout_s)

    async def close(self, timeout_s: float | None = None) -> None:
        await asyncio.to_thread(self._ledger.close, timeout_s)
        if self._owns_http:
            await self._http.aclose()

    aclose = close

    async def __aenter__(self) -> AsyncSpendLedger:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _post(self, entries: list[Entry]) -> Attempt:
        body = encode_batch([e.record for e in entries])
        try:
            response = await self._http.post(
                self._ledger._url("/usage"), content=body, headers=self._ledger.headers
            )
        except httpx.HTTPError as exc:
            return unreachable(exc)
        return interpret(response, len(entries))


class AsyncCallScope:
    """The async context manager of `AsyncSpendLedger.call`."""

    def __init__(
        self, ledger: AsyncSpendLedger, call: Call, admission: dict[str, Any], fail_open: bool
    ) -> None:
        self._ledger = ledger
        self._call = call
        self._admission = admission
        self._fail_open = fail_open

    async def __aenter__(self) -> Call:
        call = self._call
        try:
            call.hold = await self._ledger.admit(call.model, user=call.user, **self._admission)
        except (Unreachable, APIError) as exc:
            if not (self._fail_open and _unavailable(exc)):
                raise
            log.warning("spendledger: admit failed (%s); the call goes ahead without a hold", exc)
        return call

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._ledger.record(**self._call.fields(failed=exc_type is not None))
