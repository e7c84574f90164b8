"""structlog set-up: JSON lines when not on a TTY, readable lines when on one.

Keys, prompts and completions are never passed to a logger; a processor also drops any field whose
name says it holds a secret, so a mistake elsewhere cannot print one.
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


def configure_logging(level: str = "INFO") -> None:
    renderer: Any
    renderer = structlog.dev.ConsoleRenderer() if sys.stderr.isatty() else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _drop_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # httpx logs every request line at INFO: noise on the hot path, and URLs are not its to print.
    logging.getLogger("httpx").setLevel(logging.WARNING)
