"""`wrap_openai(client, ledger)`: an `openai.OpenAI` / `openai.AsyncOpenAI` whose
`chat.completions.create` and `embeddings.create` record each call in the ledger.

Call id: a chat completion's `id` (a stream's chunks share it); an embedding response has none, so
its request id (`x-request-id`) and else a new uuid4. Customer: the call's `user=`, else the
wrapper's `user`. A call that raises is recorded as a failure with no usage (by the error's request
id when it has one). A stream is recorded once, when it ends (exhausted, raised, or closed early —
then with the usage seen so far, if any, and `metadata.stream_closed_early`); a stream neither read to
its end nor closed is never recorded. Streams are asked for `stream_options.include_usage` unless the
caller set it; when the wrapper asked, the usage-only last chunk (no choices) is not passed on.

Everything else (`client.models`, `with_raw_response` …) is the client's own, unrecorded.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from .calls import RecordFields
from .client import log
from .recorder import Recorder
from .records import Route

try:
    import openai as _openai
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "spendledger_client.openai needs the openai package: pip install 'spendledger-client[openai]'"
    ) from exc


def wrap_openai(client: Any, ledger: Recorder, *, user: str | None = None) -> OpenAIWrapper:
    """The client with its chat completions and embeddings recorded in `ledger`."""
    return OpenAIWrapper(client, _Tracker(ledger, user, isinstance(client, _openai.AsyncOpenAI)))


class _Tracker:
    """Turns a call's kwargs and what came back into one record."""

    def __init__(self, ledger: Recorder, user: str | None, is_async: bool) -> None:
        self.ledger = ledger
        self.user = user
        self.is_async = is_async

    def record(
        self,
        kwargs: dict[str, Any],
        started: datetime,
        *,
        call_id: str | None,
        usage: object = None,
        failed: bool = False,
        metadata: dict[str, Any] | None = None,
        route: Route = "chat.completions",
    ) -> None:
        fields = RecordFields(
            route=route,
            model=str(kwargs.get("model", "")),
            usage=None if failed else usage,
            call_id=call_id or str(uuid.uuid4()),
            user=kwargs.get("user") or self.user,
            start_time=started,
            end_time=datetime.now(UTC),
            status="failure" if failed else "success",
            metadata=metadata or {},
        )
        try:
            self.ledger.record(**fields)
        except Exception:  # recording must never break the caller's LLM call
            log.exception("spendledger: could not record OpenAI call %s", fields.get("call_id"))

    def failed(self, kwargs: dict[str, Any], started: datetime, exc: BaseException) -> None:
        self.record(kwargs, started, call_id=getattr(exc, "request_id", None), failed=True)


class OpenAIWrapper:
    """The wrapped client: `.chat.completions.create` and `.embeddings.create` recorded."""

    def __init__(self, client: Any, tracker: _Tracker) -> None:
        self._client = client
        self.chat = _Namespace(client.chat, completions=_ChatCompletions(client.chat.completions, tracker))
        self.embeddings = _Embeddings(client.embeddings, tracker)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


class _Namespace:
    def __init__(self, inner: Any, **overrides: Any) -> None:
        self._inner = inner
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _ChatCompletions(_Namespace):
    def __init__(self, inner: Any, tracker: _Tracker) -> None:
        super().__init__(inner)
        self._tracker = tracker

    def create(self, **kwargs: Any) -> Any:
        asked = bool(kwargs.get("stream")) and _ask_for_usage(kwargs)
        if self._tracker.is_async:
            return self._acreate(kwargs, asked)
        started = datetime.now(UTC)
        try:
            response = self._inner.create(**kwargs)
        except Exception as exc:
            self._tracker.failed(kwargs, started, exc)
            raise
        return self._done(kwargs, started, response, asked)

    async def _acreate(self, kwargs: dict[str, Any], asked: bool) -> Any:
        started = datetime.now(UTC)
        try:
            response = await self._inner.create(**kwargs)
        except Exception as exc:
            self._tracker.failed(kwargs, started, exc)
            raise
        return self._done(kwargs, started, response, asked)

    def _done(self, kwargs: dict[str, Any], started: datetime, response: Any, asked: bool) -> Any:
        if kwargs.get("stream"):
            tap = _Tap(lambda tap, failed: tap.record(self._tracker, kwargs, started, failed), asked)
            return _AsyncStream(response, tap) if self._tracker.is_async else _SyncStream(response, tap)
        self._tracker.record(
            kwargs,
            started,
            call_id=getattr(response, "id", None),
            usage=getattr(response, "usage", None),
            metadata=_response_model(response),
        )
        return response


class _Embeddings(_Namespace):
    def __init__(self, inner: Any, tracker: _Tracker) -> None:
        super().__init__(inner)
        self._tracker = tracker

    def create(self, **kwargs: Any) -> Any:
        if self._tracker.is_async:
            return self._acreate(kwargs)
        started = datetime.now(UTC)
        try:
            response = self._inner.create(**kwargs)
        except Exception as exc:
            self._tracker.failed(kwargs, started, exc)
            raise
        self._done(kwargs, started, response)
        return response

    async def _acreate(self, kwargs: dict[str, Any]) -> Any:
        started = datetime.now(UTC)
        try:
            response = await self._inner.create(**kwargs)
        except Exception as exc:
            self._tracker.failed(kwargs, started, exc)
            raise
        self._done(kwargs, started, response)
        return response

    def _done(self, kwargs: dict[str, Any], started: datetime, response: Any) -> None:
        call_id = getattr(response, "_request_id", None)
        self._tracker.record(
            kwargs, started, call_id=call_id, usage=getattr(response, "usage", None),
            metadata=_response_model(response), route="embeddings",
        )  # fmt: skip


def _ask_for_usage(kwargs: dict[str, Any]) -> bool:
    """Sets stream_options.include_usage unless the caller decided it; whether the wrapper set it."""
    options = kwargs.get("stream_options")
    if isinstance(options, dict) and "include_usage" in options:
        return False
    kwargs["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return True


def _response_model(response: Any) -> dict[str, Any]:
    model = getattr(response, "model", None)
    return {"response_model": model} if isinstance(model, str) else {}


class _Tap:
    """What a stream's chunks tell: its id, the last usage, the model; recorded once, at its end."""

    def __init__(self, on_end: Callable[[_Tap, bool], None], hide_usage_chunk: bool) -> None:
        self.call_id: str | None = None
        self.usage: object = None
        self.model: str | None = None
        self.closed_early = False
        self._on_end = on_end
        self._hide_usage_chunk = hide_usage_chunk
        self._ended = False

    def see(self, chunk: Any) -> bool:
        """Takes note of a chunk; whether the caller gets it."""
        self.call_id = self.call_id or getattr(chunk, "id", None)
        self.model = self.model or getattr(chunk, "model", None)
        usage = getattr(chunk, "usage", None)
        if usage is not None:
            self.usage = usage
        return not (self._hide_usage_chunk and usage is not None and not getattr(chunk, "choices", None))

    def end(self, failed: bool, *, early: bool = False) -> None:
        if self._ended:
            return
        self._ended = True
        self.closed_early = early
        self._on_end(self, failed)

    def record(self, tracker: _Tracker, kwargs: dict[str, Any], started: datetime, failed: bool) -> None:
        metadata: dict[str, Any] = {"response_model": self.model} if self.model else {}
        if self.closed_early:
            metadata["stream_closed_early"] = True
        tracker.record(kwargs, started, call_id=self.call_id, usage=self.usage, failed=failed, metadata=metadata)


class _SyncStream:
    """An `openai.Stream` that records when it ends; iterate it, or use it as a context manager."""

    def __init__(self, stream: Any, tap: _Tap) -> None:
        self._stream = stream
        self._chunks: Iterator[Any] = iter(stream)
        self._tap = tap

    def __iter__(self) -> _SyncStream:
        return self

    def __next__(self) -> Any:
        while True:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                self._tap.end(failed=False)
                raise
            except Exception:
                self._tap.end(failed=True)
                raise
            if self._tap.see(chunk):
                return chunk

    def close(self) -> None:
        self._stream.close()
        self._tap.end(failed=False, early=True)

    def __enter__(self) -> _SyncStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _AsyncStream:
    """An `openai.AsyncStream` that records when it ends."""

    def __init__(self, stream: Any, tap: _Tap) -> None:
        self._stream = stream
        self._chunks: AsyncIterator[Any] = stream.__aiter__()
        self._tap = tap

    def __aiter__(self) -> _AsyncStream:
        return self

    async def __anext__(self) -> Any:
        while True:
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                self._tap.end(failed=False)
                raise
            except Exception:
                self._tap.end(failed=True)
                raise
            if self._tap.see(chunk):
                return chunk

    async def close(self) -> None:
        await self._stream.close()
        self._tap.end(failed=False, early=True)

    async def __aenter__(self) -> _AsyncStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)
