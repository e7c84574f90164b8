"""What travels: a usage record as the wire's JSON object, the per-record result, a hold.

A record is kept as its wire dict from `make_record` on (in memory and in the spool alike), with one
exception: `cost` is held as a decimal string and written into the body as a JSON number by
`encode_batch`, so money never passes through a float.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from .errors import ErrorInfo

Status = Literal["success", "failure"]
Route = Literal["chat.completions", "completions", "embeddings"]  # how the call is billed: its kind of output
ROUTES: tuple[Route, ...] = ("chat.completions", "completions", "embeddings")
Outcome = Literal["recorded", "duplicate", "error"]
WireRecord = dict[str, Any]
Cost = Decimal | int | float | str

MAX_CALL_ID = 256
_DETAILS = ("prompt_tokens_details", "completion_tokens_details")
# OpenAI's Responses API (and Anthropic) name the same counts differently.
_ALIASES = {
    "prompt_tokens": "input_tokens",
    "completion_tokens": "output_tokens",
    "prompt_tokens_details": "input_tokens_details",
    "completion_tokens_details": "output_tokens_details",
}


@dataclass(frozen=True, slots=True)
class Result:
    """The server's answer for one record."""

    call_id: str
    outcome: Outcome | str
    cost: Decimal | None = None
    error: ErrorInfo | None = None

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Result:
        error = value.get("error")
        cost = value.get("cost")
        return cls(
            call_id=str(value.get("call_id", "")),
            outcome=str(value.get("outcome", "error")),
            cost=None if cost is None else Decimal(str(cost)),
            error=None if error is None else ErrorInfo.from_json(error),
        )


@dataclass(frozen=True, slots=True)
class Hold:
    """An admitted call's hold: its id goes into the call's record; it expires at `expires_at`."""

    hold_id: str
    expires_at: datetime | None
    model: str
    user: str | None


def make_record(
    *,
    model: str,
    usage: object = None,
    call_id: str | None = None,
    user: str | None = None,
    user_id: str | None = None,
    team_id: str | None = None,
    start_time: datetime | str | None = None,
    end_time: datetime | str | None = None,
    status: Status = "success",
    metadata: Mapping[str, Any] | None = None,
    cost: Cost | None = None,
    hold_id: str | None = None,
    route: Route = "chat.completions",
) -> WireRecord:
    """The wire record, validated here so a caller's mistake raises in the caller, not in the sender."""
    call_id = str(uuid.uuid4()) if call_id is None else call_id
    if not 1 <= len(call_id) <= MAX_CALL_ID:
        raise ValueError(f"call_id must be 1 to {MAX_CALL_ID} characters, got {len(call_id)}")
    if status not in ("success", "failure"):
        raise ValueError(f"status must be 'success' or 'failure', got {status!r}")
    if route not in ROUTES:
        raise ValueError(f"route must be one of {', '.join(ROUTES)}, got {route!r}")
    record: WireRecord = {
        "call_id": call_id,
        "model": model,
        "usage": normalize_usage(usage),
        "user": user,
        "user_id": user_id,
        "team_id": team_id,
        "start_time": _iso(start_time),
        "end_time": _iso(end_time),
        "status": status,
        "metadata": dict(metadata or {}),
        "hold_id": hold_id,
        "route": route,
    }
    # Checked now: a metadata value json cannot write would otherwise fail every batch it is in.
    json.dumps(record["metadata"])
    if cost is not None:
        record["cost"] = _decimal_text(cost)
    return record


def normalize_usage(usage: object) -> dict[str, Any] | None:
    """OpenAI's usage shape from a dict or an SDK object (`.model_dump()`): the three counts (total
    computed when absent, as embeddings' usage has no completion tokens) and the two details objects
    with their integer counts only; other keys (a provider's extras, None fields) are dropped."""
    if usage is None:
        return None
    raw = _as_dict(usage)
    prompt = _count(raw, "prompt_tokens")
    completion = _count(raw, "completion_tokens")
    total = _count(raw, "total_tokens") or prompt + completion
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}
    for key in _DETAILS:
        details = _field(raw, key)
        if details is None:
            continue
        counts = {k: v for k, v in _as_dict(details).items() if _is_int(v)}
        if counts:
            out[key] = counts
    return out


def encode_batch(records: Sequence[WireRecord]) -> bytes:
    """The POST /usage body. `cost` is spliced in as the decimal's own digits (json would need a
    float); every record has a call_id, so its JSON object is never empty."""
    parts = []
    for record in records:
        cost = record.get("cost")
        text = json.dumps({k: v for k, v in record.items() if k != "cost"}, separators=(",", ":"))
        parts.append(text if cost is None else f'{text[:-1]},"cost":{cost}}}')
    return ('{"records":[' + ",".join(parts) + "]}").encode()


def _as_dict(value: object) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return dict(value)
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        dumped = dump()
        if isinstance(dumped, Mapping):
            return dict(dumped)
    raise TypeError(f"usage must be a mapping or have .model_dump(), got {type(value).__name__}")


def _field(raw: Mapping[str, Any], key: str) -> Any:
    value = raw.get(key)
    return raw.get(_ALIASES[key]) if value is None and key in _ALIASES else value


def _count(raw: Mapping[str, Any], key: str) -> int:
    value = _field(raw, key)
    return value if _is_int(value) else 0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _iso(value: datetime | str | None) -> str | None:
    """ISO-8601 with an offset: a naive datetime (LiteLLM's are) is read as local time."""
    if value is None or isinstance(value, str):
        return value
    return (value if value.tzinfo is not None else value.astimezone()).isoformat()


def _decimal_text(cost: Cost) -> str:
    """A JSON number's text for the cost: plain digits (no exponent), finite; a float by its repr
    (its shortest round-trip decimal), never by its binary expansion."""
    try:
        value = Decimal(repr(cost)) if isinstance(cost, float) else Decimal(cost)
    except InvalidOperation:
        raise ValueError(f"cost must be a number, got {cost!r}") from None
    if not value.is_finite():
        raise ValueError(f"cost must be finite, got {cost!r}")
    return format(value, "f")
