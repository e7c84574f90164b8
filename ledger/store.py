"""The event store: append with an expected stream version, read by stream and by position.

Appends run inside the caller's transaction so that projections and outbox rows written in the same
transaction commit or vanish with the events. The table refuses UPDATE, DELETE and TRUNCATE.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

import asyncpg
import msgspec

from spendledger.ledger.connections import Connection
from spendledger.ledger.events import AnyEvent, Event, decode_event, encode_event, event_type

_meta_encoder: Final = msgspec.json.Encoder()


def command_metadata(actor: str, at: datetime | None) -> dict[str, Any]:
    """Who appended, and the time the command's projection used (`at`): a replay projects with the
    same time, so rebuilt rows equal live ones to the microsecond (periods are anchored on them)."""
    metadata: dict[str, Any] = {"actor": actor}
    if at is not None:
        metadata["at"] = at.isoformat()
    return metadata


class ConcurrencyError(Exception):
    """The stream moved on since the caller read it: another command won the race."""

    def __init__(self, stream: str, expected_version: int) -> None:
        super().__init__(f"stream {stream!r} is no longer at version {expected_version}")
        self.stream = stream
        self.expected_version = expected_version


class StoredEvent(msgspec.Struct, frozen=True, kw_only=True):
    position: int
    stream: str
    version: int
    event: AnyEvent
    metadata: dict[str, Any]
    recorded_at: datetime


_INSERT: Final = """
insert into events (stream, version, type, data, metadata)
select $1, $2 + ord, t, d::jsonb, $5::jsonb
from unnest($3::text[], $4::text[]) with ordinality as e(t, d, ord)
where $2 = (select coalesce(max(version), 0) from events where stream = $1)
returning position
"""


async def append(
    conn: Connection,
    stream: str,
    expected_version: int,
    events: Sequence[Event],
    metadata: dict[str, Any] | None = None,
) -> list[int]:
    """Append `events` to `stream`, which must be at `expected_version` (0 = a new stream)."""
    types = [event_type(e) for e in events]
    payloads = [encode_event(e).decode() for e in events]
    meta = _meta_encoder.encode(metadata or {}).decode()
    try:
        rows = await conn.fetch(_INSERT, stream, expected_version, types, payloads, meta)
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name == "events_stream_version_key":
            raise ConcurrencyError(stream, expected_version) from None
        raise
    if events and not rows:  # the stream is not at expected_version (ahead of it, or moved on)
        raise ConcurrencyError(stream, expected_version)
    return [row["position"] for row in rows]


async def stream_version(conn: Connection, stream: str) -> int:
    version = await conn.fetchval("select max(version) from events where stream = $1", stream)
    return int(version or 0)


def _stored(row: asyncpg.Record) -> StoredEvent:
    return StoredEvent(
        position=row["position"],
        stream=row["stream"],
        version=row["version"],
        event=decode_event(row["data"]),
        metadata=msgspec.json.decode(row["metadata"]),
        recorded_at=row["recorded_at"],
    )


async def read_stream(conn: Connection, stream: str) -> list[StoredEvent]:
    rows = await conn.fetch(
        "select position, stream, version, data::text as data, metadata::text as metadata, recorded_at "
        "from events where stream = $1 order by version",
        stream,
    )
    return [_stored(row) for row in rows]


async def read_all(conn: Connection, after_position: int = 0, limit: int = 1000) -> list[StoredEvent]:
    """Events by position. Only for readers that hold no cursor across transactions (tests, rebuild
    under a lock); followers of the live log must use the (txid, position) snapshot rule."""
    rows = await conn.fetch(
        "select position, stream, version, data::text as data, metadata::text as metadata, recorded_at "
        "from events where position > $1 order by position limit $2",
        after_position,
        limit,
    )
    return [_stored(row) for row in rows]
