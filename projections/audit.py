"""The audit view of the event log: filtered, cursor-paginated, and safe to page while writers append.

Why a page never skips nor repeats an event
-------------------------------------------
`position` is an identity value handed out when a row is inserted, but the rows become visible when
their transaction *commits*, and transactions commit in any order: position 11 can be visible while
position 10 (a slower transaction) is not yet. A reader that pages by `position > last` would step
over 10 and never see it. So pages are ordered by `(txid, position)` and take only rows with
`txid < pg_snapshot_xmin(pg_current_snapshot())`:

- `txid` is the id of the inserting transaction (`pg_current_xact_id()`), and the snapshot's `xmin`
  is the oldest transaction id still running when the statement's snapshot was taken. Every
  transaction with an id below it has ended — committed (its rows are visible to this very statement,
  since `pg_current_snapshot()` is the statement's own snapshot) or rolled back (its rows never exist).
- No row with a `txid` below that `xmin` can appear later: transactions still running have ids at or
  above it, and transactions not yet begun will get ids above every id handed out so far.
- So the rows below the horizon, in `(txid, position)` order, grow only at their end: a row that
  joins them between two statements has a `txid` at or above the first statement's `xmin` (had it
  been below, its transaction would already have ended, committed, and been counted), hence above
  every row that was below it. (`xmin` itself never goes backwards.)

A page is the next `limit` rows of that ordered, append-only sequence strictly after the cursor (the
last `(txid, position)` returned): nothing can later appear before the cursor, so nothing is skipped,
and the cursor only moves forward, so nothing repeats. Filters look only at a row's own immutable
columns, so the same holds for every filter. An event whose transaction is still open simply shows up
on a later page, once it has committed.

The price is a short delay: one long transaction holding an id (not necessarily one that writes
events) holds the horizon back, and the audit log shows nothing newer until it ends.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Final, get_args

import asyncpg
import msgspec

from spendledger.ledger.events import AnyEvent
from spendledger.ledger.keys import find_key_by_alias, key_stream

#: Every event type the ledger writes (the tag of each member of the union).
EVENT_TYPES: Final = frozenset(cls.__name__ for cls in get_args(AnyEvent))

MAX_LIMIT: Final = 1000
_MAX_XID8: Final = 2**64 - 1
_MAX_BIGINT: Final = 2**63 - 1
_CURSOR_PREFIX: Final = "v1"
_HEX_HASH: Final = re.compile(r"^[0-9a-f]{64}$")


class InvalidCursor(ValueError):
    """The cursor was not made by `encode_cursor` (or was damaged on the way)."""


class AuditEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One event as the audit log shows it; `data` and `metadata` are PostgreSQL's JSON text passed
    through untouched, so money keeps every digit it was recorded with."""

    position: int
    txid: str
    stream: str
    version: int
    type: str
    data: msgspec.Raw
    metadata: msgspec.Raw
    recorded_at: datetime


class AuditFilters(msgspec.Struct, frozen=True, kw_only=True):
    """What to select; every filter given must hold (they are intersected).

    `customer`, `user`, `team` and `key` match an event that names the entity in its data or that
    belongs to the entity's own stream. `scope_key` is the same test as `key`, kept apart so that a
    caller restricted to one key can add a `key` filter of its own without widening anything.
    `actor` is who appended the event (`metadata.actor`: "master_key", or "key:<sha256>" for a
    generated key). `start` is inclusive and `end` exclusive, on `recorded_at`.
    """

    customer: str | None = None
    user: str | None = None
    team: str | None = None
    key: str | None = None
    scope_key: str | None = None
    model: str | None = None
    actor: str | None = None
    types: tuple[str, ...] = ()
    start: datetime | None = None
    end: datetime | None = None


# --- cursor ---------------------------------------------------------------------------------------


def encode_cursor(txid: str | int, position: int) -> str:
    raw = f"{_CURSOR_PREFIX}:{int(txid)}:{int(position)}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, int]:
    """→ (txid, position); `InvalidCursor` for anything `encode_cursor` did not make."""
    if not cursor or len(cursor) > 100 or not re.fullmatch(r"[A-Za-z0-9_-]+", cursor):
        raise InvalidCursor("malformed cursor")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidCursor("malformed cursor") from None
    prefix, _, rest = raw.partition(":")
    txid_text, _, position_text = rest.partition(":")
    if prefix != _CURSOR_PREFIX or not txid_text.isdigit() or not position_text.isdigit():
        raise InvalidCursor("malformed cursor")
    txid, position = int(txid_text), int(position_text)
    if txid > _MAX_XID8 or position > _MAX_BIGINT:
        raise InvalidCursor("malformed cursor")
    return txid, position


# --- query building -------------------------------------------------------------------------------


class _Query:
    def __init__(self) -> None:
        self.args: list[Any] = []

    def arg(self, value: Any) -> str:
        self.args.append(value)
        return f"${len(self.args)}"


class _EntityTest(msgspec.Struct, frozen=True):
    """`data_test or stream_test`: an event names the entity, or lives in the entity's stream."""

    data_test: str
    stream_test: str

    def either(self) -> str:
        return f"({self.data_test} or {self.stream_test})"


def _entity_tests(filters: AuditFilters, q: _Query) -> list[_EntityTest]:
    """In the order of preference for driving the scan (the most selective first)."""
    tests: list[_EntityTest] = []
    for key_hash in (filters.scope_key, filters.key):
        if key_hash is not None:
            tests.append(
                _EntityTest(
                    f"data->>'key_hash' = {q.arg(key_hash)}", f"stream = {q.arg(key_stream(key_hash))}"
                )
            )
    if filters.customer is not None:
        tests.append(
            _EntityTest(
                f"data->>'customer_id' = {q.arg(filters.customer)}",
                f"stream = {q.arg('customer:' + filters.customer)}",
            )
        )
    if filters.user is not None:
        # Customer events name their customer in `user_id` (LiteLLM's name for an end user): they
        # are no internal user's events, so a user filter leaves the customer streams out.
        tests.append(
            _EntityTest(
                f"(data->>'user_id' = {q.arg(filters.user)} and stream not like 'customer:%')",
                f"stream = {q.arg('user:' + filters.user)}",
            )
        )
    if filters.team is not None:
        tests.append(
            _EntityTest(
                f"data->>'team_id' = {q.arg(filters.team)}", f"stream = {q.arg('team:' + filters.team)}"
            )
        )
    return tests


# `txid` stays an xid8 for the ordering (as text, 1000 would sort before 999): its text is apart.
_COLUMNS: Final = (
    "position, txid, txid::text as txid_text, stream, version, type, data::text as data, "
    "metadata::text as metadata, recorded_at"
)


def _build(
    filters: AuditFilters, cursor: tuple[int, int] | None, limit: int, horizon: int | None
) -> tuple[str, list[Any]]:
    q = _Query()
    common: list[str] = ["txid < pg_snapshot_xmin(pg_current_snapshot())"]
    if horizon is not None:
        common.append(f"txid < {q.arg(str(horizon))}::text::xid8")
    if cursor is not None:
        common.append(f"(txid, position) > ({q.arg(str(cursor[0]))}::text::xid8, {q.arg(cursor[1])}::bigint)")
    if filters.model is not None:
        common.append(f"data->>'model_group' = {q.arg(filters.model)}")
    if filters.actor is not None:  # read in order from the partial index events_actor (0015)
        common.append(f"metadata->>'actor' = {q.arg(filters.actor)}")
    if filters.types:
        common.append(f"type = any({q.arg(list(filters.types))}::text[])")
    if filters.start is not None:
        common.append(f"recorded_at >= {q.arg(filters.start)}")
    if filters.end is not None:
        common.append(f"recorded_at < {q.arg(filters.end)}")
    entities = _entity_tests(filters, q)
    n = q.arg(limit)
    if not entities:
        where = " and ".join(common)
        return f"select {_COLUMNS} from events where {where} order by txid, position limit {n}", q.args
    # An OR of two indexed tests cannot be read in (txid, position) order from one index, so the
    # driving entity test becomes two branches, each an ordered range scan from the cursor on its
    # own index ((data->>…, txid, position) and (stream, txid, position)), merged and cut to the
    # page. The second branch leaves out rows the first one already has.
    driver, others = entities[0], [t.either() for t in entities[1:]]
    rest = " and ".join([*common, *others])
    first = (
        f"select {_COLUMNS} from events where {driver.data_test} and {rest} order by txid, position limit {n}"
    )
    second = (
        f"select {_COLUMNS} from events where {driver.stream_test} and not coalesce({driver.data_test}, false) "
        f"and {rest} order by txid, position limit {n}"
    )
    sql = f"select * from (({first}) union all ({second})) page order by txid, position limit {n}"
    return sql, q.args


def _event(row: asyncpg.Record) -> AuditEvent:
    return AuditEvent(
        position=row["position"],
        txid=row["txid_text"],
        stream=row["stream"],
        version=row["version"],
        type=row["type"],
        data=msgspec.Raw(row["data"].encode()),
        metadata=msgspec.Raw(row["metadata"].encode()),
        recorded_at=row["recorded_at"],
    )


# --- reading --------------------------------------------------------------------------------------


async def read_events(
    conn: asyncpg.Connection | asyncpg.Pool,
    filters: AuditFilters,
    cursor: str | None = None,
    limit: int = 100,
    horizon: int | None = None,
) -> tuple[list[AuditEvent], str | None]:
    """The next page of events matching `filters`, strictly after `cursor`, in `(txid, position)`
    order, and the cursor of the page after it (None when nothing more is visible yet).

    Each page is one statement (no transaction is held between pages). `horizon` (from
    `current_horizon`) caps the read at what had committed when it was taken, so that a reader
    paging through "everything" finishes even while writers keep appending.
    Raises `InvalidCursor` and `ValueError` (limit out of range, unknown event type).
    """
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIMIT}")
    unknown = sorted(set(filters.types) - EVENT_TYPES)
    if unknown:
        raise ValueError(f"unknown event type(s): {', '.join(unknown)}")
    after = decode_cursor(cursor) if cursor is not None else None
    # One row more than the page tells whether another page follows.
    sql, args = _build(filters, after, limit + 1, horizon)
    rows = await conn.fetch(sql, *args)
    events = [_event(row) for row in rows[:limit]]
    next_cursor = encode_cursor(events[-1].txid, events[-1].position) if len(rows) > limit else None
    return events, next_cursor


async def current_horizon(conn: asyncpg.Connection | asyncpg.Pool) -> int:
    """The snapshot xmin now: every event below it has committed (or never will)."""
    value = await conn.fetchval("select pg_snapshot_xmin(pg_current_snapshot())::text")
    return int(value)


async def key_hash_for_alias(conn: asyncpg.Connection | asyncpg.Pool, alias: str) -> str | None:
    """The key with this alias now, else the key that most recently took it (a deleted or renamed
    key still owns its past events); None if no key ever had it."""
    record = await find_key_by_alias(conn, alias)
    if record is not None:
        return record.key_hash
    value = await conn.fetchval(
        "select data->>'key_hash' from events "
        "where type = any('{KeyGenerated,KeyUpdated}'::text[]) and data->>'key_alias' = $1 "
        "order by txid desc, position desc limit 1",
        alias,
    )
    return str(value) if value is not None else None


def looks_like_key_hash(value: str) -> bool:
    return _HEX_HASH.match(value) is not None


def event_types(values: Iterable[str]) -> tuple[str, ...]:
    """Repeated and comma-separated type names → a tuple without blanks or duplicates, in order."""
    seen: dict[str, None] = {}
    for value in values:
        for name in value.split(","):
            if name.strip():
                seen[name.strip()] = None
    return tuple(seen)
