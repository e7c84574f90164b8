"""SpendLedger: records queued (and spooled), sent in batches by one background thread."""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Unpack

import httpx

from .calls import Call, RecordFields
from .delivery import (
    Attempt,
    Backoff,
    Verdict,
    admit_body,
    hold_from,
    interpret,
    rejected,
    unreachable,
)
from .errors import APIError, DeliveryDeferred, SpendLedgerError, Unreachable
from .records import Hold, Result, WireRecord, encode_batch, make_record
from .spool import Entry, RecordQueue

log = logging.getLogger("spendledger_client")

MAX_BATCH = 1000  # the contract's most records per POST /usage
OnError = Callable[[WireRecord, Result], None]


def log_rejected(record: WireRecord, result: Result) -> None:
    """The default `on_error`: a record the server refused is not retried, so it is at least logged."""
    log.error("spendledger refused record %s: %s", record.get("call_id"), result.error)


class SpendLedger:
    """A thread-safe client of the usage-ingest API.

    `record()` queues a record (appended to the spool file first, when there is one) and returns at
    once; a background thread sends batches of up to `batch_size`, as soon as that many are queued
    or `flush_interval_s` after the oldest was, retrying through outages with exponential backoff
    (see `delivery.py` for which answers are retried). `close()` (or leaving a `with` block) sends
    what is queued, trying for up to `close_timeout_s`; what is still unsent then stays in the spool
    and a later client on the same `spool_path` sends it. Without a spool it is lost (and logged).
    """

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
        http_client: httpx.Client | None = None,
    ) -> None:
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be 1 to {MAX_BATCH}, got {batch_size}")
        self._base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self._http = http_client or httpx.Client(timeout=timeout_s)
        self._owns_http = http_client is None
        self._batch_size = batch_size
        self._batch_limit = batch_size  # halved while a 400/413 is being narrowed down to its record
        self._flush_interval_s = flush_interval_s
        self._timeout_s = timeout_s
        self._close_timeout_s = close_timeout_s
        self._backoff = Backoff(initial_backoff_s, max_backoff_s)
        self._on_error = on_error or log_rejected
        self._cond = threading.Condition()
        self._queue = RecordQueue(spool_path)
        self._spooled = spool_path is not None
        self._flush_target = self._queue.last_seq  # what an earlier client left goes out at once
        self._halted: APIError | None = None
        self._closing_at: float | None = None  # the close deadline, once close() began
        self._closed = False
        self._sender_idle = False  # waiting with nothing to send: the next record must wake it
        self._thread = threading.Thread(target=self._run, name="spendledger-sender", daemon=True)
        self._thread.start()
        # A ledger never closed still sends (or spools) what it queued when the interpreter exits.
        atexit.register(self.close)

    # -- the public API ------------------------------------------------------------------------

    def record(self, **fields: Unpack[RecordFields]) -> str:
        """Queue one record for the background sender; returns its call_id."""
        record = make_record(**fields)
        with self._cond:
            self._check_open()
            self._queue.add(record)
            if self._sender_idle or len(self._queue) >= self._batch_limit:
                self._cond.notify_all()
        return str(record["call_id"])

    def record_now(self, **fields: Unpack[RecordFields]) -> Result:
        """Send one record now, in this thread, retrying for up to `timeout_s`; its result (outcome
        "error" included: not passed to `on_error`). Raises `DeliveryDeferred` when it could not be
        delivered in time (it stays queued), the `APIError` of a 401/403/404."""
        entry = self._enqueue_in_flight(make_record(**fields))
        deadline = time.monotonic() + self._timeout_s
        for n in itertools.count():
            attempt = self._post([entry])
            if attempt.verdict is not Verdict.RETRY:
                return self._finish_now(entry, attempt)
            delay = self._backoff.delay(n, attempt.retry_after_s)
            if time.monotonic() + delay > deadline:
                raise self._defer(entry, attempt)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def admit(
        self,
        model: str,
        *,
        user: str | None = None,
        prompt_tokens: int | None = None,
        messages: list[Any] | None = None,
        max_tokens: int | None = None,
        n: int | None = None,
    ) -> Hold:
        """Ask for a hold before making a call. One attempt (it is on the caller's path): raises
        `BudgetExceeded`, `RateLimited`, `CustomerBlocked`, another `APIError`, or `Unreachable`."""
        body = admit_body(model, user, prompt_tokens, messages, max_tokens, n)
        try:
            response = self._http.post(self._url("/usage/admit"), json=body, headers=self._headers)
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
    ) -> CallScope:
        """`with ledger.call(model, user=..., max_tokens=...) as call:` admits (a refusal raises
        before the block runs), then records the call when the block ends: `call.usage` as set by
        the block, or a failure with no usage if the block raised (the exception goes on). With
        `fail_open`, a server that cannot be reached (or answers 5xx) lets the call go ahead without
        a hold; refusals still raise."""
        call = Call(model=model, user=user, user_id=user_id, team_id=team_id, metadata=dict(metadata or {}))
        admission = {"prompt_tokens": prompt_tokens, "messages": messages, "max_tokens": max_tokens, "n": n}
        return CallScope(self, call, admission, fail_open)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every record queued before this call is settled; False on timeout. Raises the
        `APIError` that stopped the sender (401/403/404: wrong key or URL)."""
        with self._cond:
            target = self._queue.last_seq
            self._flush_target = max(self._flush_target, target)
            self._cond.notify_all()
            done = self._cond.wait_for(lambda: self._halted is not None or self._settled(target), timeout_s)
            if self._halted is not None:
                raise self._halted
            return done

    def close(self, timeout_s: float | None = None) -> None:
        """Send what is queued (for up to `timeout_s`, default `close_timeout_s`), then stop."""
        with self._cond:
            if self._closing_at is not None:
                return
            wait = self._close_timeout_s if timeout_s is None else timeout_s
            self._closing_at = time.monotonic() + wait
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join()
        with self._cond:
            self._closed = True
            left = len(self._queue)
            self._queue.close()
        self._report_left(left)
        if self._owns_http:
            self._http.close()
        atexit.unregister(self.close)

    def __enter__(self) -> SpendLedger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- shared with AsyncSpendLedger ----------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self._base_url

    @property
    def headers(self) -> dict[str, str]:
        return dict(self._headers)

    @property
    def backoff(self) -> Backoff:
        return self._backoff

    @property
    def timeout_s(self) -> float:
        return self._timeout_s

    def _url(self, path: str) -> str:
        return self._base_url + path

    def _enqueue_in_flight(self, record: WireRecord) -> Entry:
        """A record_now's record: spooled like any, but the sender leaves it alone while it is sent."""
        with self._cond:
            self._check_open()
            return self._queue.add(record, in_flight=True)

    def _finish_now(self, entry: Entry, attempt: Attempt) -> Result:
        with self._cond:
            self._settle([entry], attempt)
        if attempt.verdict is Verdict.DELIVERED:
            assert attempt.results is not None
            return attempt.results[0]
        if attempt.verdict is Verdict.SPLIT:
            return rejected(str(entry.record["call_id"]), attempt.error)
        assert attempt.error is not None
        raise attempt.error

    def _defer(self, entry: Entry, attempt: Attempt) -> SpendLedgerError:
        with self._cond:
            self._queue.release([entry])
            self._cond.notify_all()
        return DeliveryDeferred(str(entry.record["call_id"]), attempt.error)

    # -- the sender ----------------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while True:
            with self._cond:
                batch = self._next_batch()
            if batch is None:
                return
            attempt = self._post(batch)
            with self._cond:
                refused = self._settle(batch, attempt)
            self._report(refused)
            if attempt.verdict is not Verdict.RETRY:
                failures = 0
                continue
            delay = self._backoff.delay(failures, attempt.retry_after_s)
            if failures == 0:
                log.warning("spendledger: %s; %d record(s) queued, retrying", attempt.error, len(self._queue))
            failures += 1
            self._sleep(delay)

    def _next_batch(self) -> list[Entry] | None:
        """Under the lock: wait until a batch is due and take it; None once the sender must stop."""
        while True:
            closing = self._closing_at is not None
            if self._halted is not None or (closing and time.monotonic() >= (self._closing_at or 0)):
                if closing:
                    return None
                self._cond.wait()
                continue
            due = self._due_in()
            if due == 0:
                return self._queue.take(self._batch_limit)
            if closing:
                return None
            self._sender_idle = due is None
            self._cond.wait(due)
            self._sender_idle = False

    def _due_in(self) -> float | None:
        """Seconds until the next batch is due: 0 now, None when nothing is waiting to be sent."""
        first = next(self._queue.unsent(), None)
        if first is None:
            return None
        if self._closing_at is not None or first.seq <= self._flush_target:
            return 0.0
        if sum(1 for _ in itertools.islice(self._queue.unsent(), self._batch_limit)) >= self._batch_limit:
            return 0.0
        return max(0.0, first.queued_at + self._flush_interval_s - time.monotonic())

    def _sleep(self, delay: float) -> None:
        """The backoff, cut short by close()'s deadline (not by new records)."""
        end = time.monotonic() + delay
        with self._cond:
            while True:
                stop = end if self._closing_at is None else min(end, self._closing_at)
                remaining = stop - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(remaining)

    def _post(self, entries: list[Entry]) -> Attempt:
        body = encode_batch([e.record for e in entries])
        try:
            response = self._http.post(self._url("/usage"), content=body, headers=self._headers)
        except httpx.HTTPError as exc:
            return unreachable(exc)
        return interpret(response, len(entries))

    def _settle(self, batch: list[Entry], attempt: Attempt) -> list[tuple[WireRecord, Result]]:
        """Under the lock: the batch's fate by the verdict; the refused records, for `on_error`."""
        refused: list[tuple[WireRecord, Result]] = []
        verdict = attempt.verdict
        if verdict is Verdict.DELIVERED:
            assert attempt.results is not None
            self._queue.remove(batch)
            self._batch_limit = min(self._batch_size, self._batch_limit * 2)
            refused = [
                (e.record, r)
                for e, r in zip(batch, attempt.results, strict=True)
                if r.outcome not in ("recorded", "duplicate")
            ]
        elif verdict is Verdict.SPLIT and len(batch) == 1:
            self._queue.remove(batch)
            refused = [(batch[0].record, rejected(str(batch[0].record["call_id"]), attempt.error))]
        else:
            self._queue.release(batch)
            if verdict is Verdict.SPLIT:
                self._batch_limit = max(1, len(batch) // 2)
            elif verdict is Verdict.HALT:
                assert isinstance(attempt.error, APIError)
                self._halted = attempt.error
                log.error("spendledger: %s; sending stopped, records kept", attempt.error)
        self._cond.notify_all()
        return refused

    def _report(self, refused: list[tuple[WireRecord, Result]]) -> None:
        for record, result in refused:
            try:
                self._on_error(record, result)
            except Exception:
                log.exception("spendledger: on_error raised")

    def _report_left(self, left: int) -> None:
        if not left:
            return
        if self._spooled:
            log.warning("spendledger: %d record(s) not delivered by close(); kept in the spool", left)
        else:
            log.error("spendledger: %d record(s) not delivered by close() and no spool_path: lost", left)

    def _settled(self, target: int) -> bool:
        oldest = self._queue.oldest_seq()
        return oldest is None or oldest > target

    def _check_open(self) -> None:
        if self._closing_at is not None:
            raise RuntimeError("this SpendLedger is closed")


class CallScope:
    """The context manager of `SpendLedger.call`."""

    def __init__(self, ledger: SpendLedger, call: Call, admission: dict[str, Any], fail_open: bool) -> None:
        self._ledger = ledger
        self._call = call
        self._admission = admission
        self._fail_open = fail_open

    def __enter__(self) -> Call:
        call = self._call
        try:
            call.hold = self._ledger.admit(call.model, user=call.user, **self._admission)
        except (Unreachable, APIError) as exc:
            if not (self._fail_open and _unavailable(exc)):
                raise
            log.warning("spendledger: admit failed (%s); the call goes ahead without a hold", exc)
        return call

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._ledger.record(**self._call.fields(failed=exc_type is not None))


def _unavailable(exc: SpendLedgerError) -> bool:
    """Whether an admit failed for the server's state (not a refusal, not a wrong key)."""
    return isinstance(exc, Unreachable) or (isinstance(exc, APIError) and exc.status_code >= 500)
