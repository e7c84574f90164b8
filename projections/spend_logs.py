"""Spend logs and spend reports in LiteLLM's shapes, read from the `spend_logs` view of the usage events.

Days are UTC days of `recorded_at`, the moment each usage was committed (indexed on the log).
"""

from __future__ import annotations

import json
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Final

import asyncpg

_COLUMNS: Final = (
    "request_id, call_type, api_key, trim_scale(spend) as spend, total_tokens, prompt_tokens, "
    "completion_tokens, start_time, end_time, model, model_id, model_group, user_id, team_id, end_user, "
    "status, usage_estimated, cached_input_tokens, cache_creation_input_tokens, input_audio_tokens, "
    "input_image_tokens, reasoning_tokens, output_audio_tokens, output_image_tokens, costs"
)


def day_range(start_date: date | None, end_date: date | None) -> tuple[datetime | None, datetime | None]:
    """Inclusive calendar days (UTC) → a half-open instant range.

    Any day a client can name is accepted: the last one there is (9999-12-31) ends no earlier than
    everything recorded, so it leaves the range open instead of overflowing into the year 10000.
    """
    from datetime import UTC

    start = datetime.combine(start_date, time.min, UTC) if start_date else None
    end = None
    if end_date is not None and end_date < date.max:
        end = datetime.combine(end_date + timedelta(days=1), time.min, UTC)
    return start, end


def log_view(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "request_id": row["request_id"],
        "call_type": row["call_type"],
        "api_key": row["api_key"],
        "spend": row["spend"],
        "total_tokens": row["total_tokens"],
        "prompt_tokens": row["prompt_tokens"],
        "completion_tokens": row["completion_tokens"],
        "startTime": row["start_time"].isoformat(),
        "endTime": row["end_time"].isoformat(),
        "model": row["model"],
        "model_id": row["model_id"],
        "model_group": row["model_group"],
        "user": row["user_id"] or "",
        "team_id": row["team_id"],
        "end_user": row["end_user"] or "",
        "status": row["status"],
        "usage_estimated": row["usage_estimated"],
        # As LiteLLM's spend logs keep it: the usage block with its details, and the cost of each
        # kind of token (docs/ledger.md, "How a request is priced").
        "metadata": {
            "usage_object": {
                "prompt_tokens": row["prompt_tokens"],
                "completion_tokens": row["completion_tokens"],
                "total_tokens": row["total_tokens"],
                "prompt_tokens_details": {
                    "cached_tokens": row["cached_input_tokens"],
                    "cache_creation_tokens": row["cache_creation_input_tokens"],
                    "audio_tokens": row["input_audio_tokens"],
                    "image_tokens": row["input_image_tokens"],
                },
                "completion_tokens_details": {
                    "reasoning_tokens": row["reasoning_tokens"],
                    "audio_tokens": row["output_audio_tokens"],
                    "image_tokens": row["output_image_tokens"],
                },
            },
            "cost_breakdown": {kind: Decimal(str(cost)) for kind, cost in _costs(row["costs"]).items()},
        },
    }


def _costs(value: Any) -> dict[str, Any]:
    # jsonb arrives as text unless a codec is set; numbers keep their digits either way.
    return json.loads(value, parse_float=Decimal) if isinstance(value, str) else dict(value or {})


async def spend_logs(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    api_key: str | None = None,
    user_id: str | None = None,
    request_id: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f"select {_COLUMNS} from spend_logs "
        "where ($1::text is null or api_key = $1) and ($2::text is null or user_id = $2) "
        "and ($3::text is null or stream = 'request:' || $3) and ($4::timestamptz is null or recorded_at >= $4) "
        "and ($5::timestamptz is null or recorded_at < $5) order by recorded_at, request_id limit $6",
        api_key,
        user_id,
        request_id,
        start,
        end,
        limit,
    )
    return [log_view(row) for row in rows]


async def daily_spend(
    conn: asyncpg.Connection | asyncpg.Pool, start: datetime | None, end: datetime | None
) -> list[dict[str, Any]]:
    """LiteLLM's `/spend/logs?start_date&end_date` shape: per day, spend by model and by user."""
    rows = await conn.fetch(
        "select (recorded_at at time zone 'UTC')::date as day, model_group, coalesce(user_id, '') as user_id, "
        "trim_scale(sum(spend)) as spend from spend_logs "
        "where ($1::timestamptz is null or recorded_at >= $1) and ($2::timestamptz is null or recorded_at < $2) "
        "group by 1, 2, 3 order by 1, 2, 3",
        start,
        end,
    )
    days: dict[date, dict[str, Any]] = {}
    for row in rows:
        day = days.setdefault(
            row["day"], {"startTime": row["day"].isoformat(), "spend": 0, "models": {}, "users": {}}
        )
        day["spend"] += row["spend"]
        day["models"][row["model_group"]] = day["models"].get(row["model_group"], 0) + row["spend"]
        day["users"][row["user_id"]] = day["users"].get(row["user_id"], 0) + row["spend"]
    return list(days.values())


_GROUPS: Final = {
    "team": ("team_id", "teams", "team_name"),
    "customer": ("end_user", "customers", "customer"),
    "api_key": ("api_key", "api_keys", "api_key"),
}


async def global_spend_report(
    conn: asyncpg.Connection | asyncpg.Pool, start: datetime | None, end: datetime | None, group_by: str
) -> list[dict[str, Any]]:
    """LiteLLM's `/global/spend/report` shape: per day, per team (or customer), spend by model."""
    column, plural, name_field = _GROUPS[group_by]
    rows = await conn.fetch(
        f"select (recorded_at at time zone 'UTC')::date as day, {column} as grp, model_group, "
        "trim_scale(sum(spend)) as spend, sum(total_tokens) as total_tokens from spend_logs "
        "where ($1::timestamptz is null or recorded_at >= $1) and ($2::timestamptz is null or recorded_at < $2) "
        "group by 1, 2, 3 order by 1, 2, 3",
        start,
        end,
    )
    days: dict[date, dict[str, dict[str, Any]]] = {}
    for row in rows:
        groups = days.setdefault(row["day"], {})
        group = groups.setdefault(row["grp"], {name_field: row["grp"], "total_spend": 0, "metadata": []})
        group["total_spend"] += row["spend"]
        group["metadata"].append(
            {"model": row["model_group"], "spend": row["spend"], "total_tokens": int(row["total_tokens"])}
        )
    return [{"group_by_day": day.isoformat(), plural: list(groups.values())} for day, groups in days.items()]
