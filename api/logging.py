"""structlog set-up: JSON lines when not on a TTY (or with `json_logs`), readable lines on one.

Every line is one of ours: the standard library's loggers (uvicorn's, asyncpg's, alembic's) go
through the same processors and renderer, and a line logged while a request is served carries its
`call_id` (the `x-litellm-call-id` it answers with; api/proxy.py binds it). Keys, prompts and
completions are never passed to a logger; a processor also drops any field whose name says it holds
a secret, so a mistake elsewhere cannot print one.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Final

import structlog

_SECRET_FIELDS: Final = frozenset(
    {
        "key",
        "api_key",
        "master_key",
        "authorization",
        "token",
        "password",
        "prompt",
        "messages",
        "body",
        "lago_api_key",
        "secret",
    }
)


def _drop_secrets(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for name in list(event_dict):
        if name.lower() in _SECRET_FIELDS:
            event_dict[name] = "[redacted]"
    return event_dict


def configure_logging(level: str = "INFO", json: bool | None = None) -> None:
    """`json`: JSON lines (True), readable ones (False), or JSON unless stderr is a terminal (None)."""
    renderer: Any
    as_json = json if json is not None else not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_secrets,
    ]
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # The standard library's records, rendered as ours (with the logger's name).
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # The libraries' own INFO chatter (alembic's plugin set-up, uvicorn's start-up) only at DEBUG:
    # their warnings and errors always.
    root.setLevel(numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING))
    # httpx logs every request line at INFO: noise on the hot path, and URLs are not its to print.
    logging.getLogger("httpx").setLevel(logging.WARNING)
