"""`reconcile --against-lago`: the ledger held against what Lago itself holds.

`spendledger reconcile` alone compares the ledger with its own outbox (what Lago acknowledged). This
reads Lago back (ledger/sinks/lago_reader.py) and lists every difference:

- `missing_in_lago`: a billable usage whose event Lago does not have (`GET /events/{call_id}`: 404);
- `value_differs`: Lago's event is not the one the ledger's usage makes (code, subscription,
  timestamp or a property; numbers by value, exactly) — only the differing fields, both sides;
- `rejected_by_lago`: Lago's `events.errors` webhook named the usage (a `LagoEventRejected`);
- `not_in_ledger`: an event of ours in Lago (`GET /events` of each charged subscription and our
  code) with no usage in the ledger;
- `usage_differs`: a subscription's current period at Lago (`GET /customers/{id}/current_usage`)
  counts another number of our events than the ledger has in that period.

Events are read one by one, `concurrency` at a time, in batches (memory stays bounded however long
the ledger). The ledger side is one snapshot; what the ledger expects of each event is the Lago
event its sink makes (`ledger.sinks.lago.lago_row`), so the two can never disagree on the format.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final, TypeVar

import asyncpg

from spendledger.ledger.config import LagoSettings
from spendledger.ledger.events import UsageRecorded, decode_event
from spendledger.ledger.sinks.lago import lago_row
from spendledger.ledger.sinks.lago_reader import LagoReader
from spendledger.projections.reconciliation import CHARGE_BY_FIELD, read_snapshot

BATCH: Final = 500  # events read per batch; `concurrency` of them in flight at once
T = TypeVar("T")
R = TypeVar("R")

_USAGE: Final = "select data::text as data from events where type = 'UsageRecorded' and data->>$1::text is not null order by position"
_REJECTED: Final = (
    "select data->>'transaction_id' as call_id, data->>'error' as error, data->>'webhook_id' as webhook_id "
    "from events where type = 'LagoEventRejected' order by position"
)


async def against_lago(
    conn: asyncpg.Connection | asyncpg.Pool, settings: LagoSettings, reader: LagoReader, concurrency: int = 8
) -> list[dict[str, Any]]:
    """Every difference between the ledger's billable usage and Lago's own records."""
    field = CHARGE_BY_FIELD[settings.charge_by]
    async with read_snapshot(conn) as snapshot:
        usage = [_usage_event(row["data"]) for row in await snapshot.fetch(_USAGE, field)]
        rejected = await snapshot.fetch(_REJECTED)
    expected = {event.call_id: lago_row(event, settings).payload for event in usage}
    differences: list[dict[str, Any]] = []
    found = await bounded(list(expected), reader.event, concurrency)
    for call_id, lago in zip(expected, found, strict=True):
        ours = expected[call_id]
        if lago is None:
            differences.append({"kind": "missing_in_lago", "call_id": call_id, "ledger": ours, "lago": None})
        elif differing := _differing(ours, lago):
            ledger_side = {name: pair[0] for name, pair in differing.items()}
            lago_side = {name: pair[1] for name, pair in differing.items()}
            differences.append({"kind": "value_differs", "call_id": call_id, "ledger": ledger_side, "lago": lago_side})
    for row in rejected:
        differences.append({
            "kind": "rejected_by_lago", "call_id": row["call_id"], "ledger": expected.get(row["call_id"]),
            "lago": {"error": row["error"], "webhook_id": row["webhook_id"]},
        })  # fmt: skip
    subscriptions = sorted({str(payload["external_subscription_id"]) for payload in expected.values()})
    for subscription in subscriptions:
        async for event in reader.events_of(subscription, settings.event_code):
            if event.get("transaction_id") not in expected:
                differences.append({
                    "kind": "not_in_ledger", "call_id": event.get("transaction_id"), "ledger": None, "lago": event,
                })  # fmt: skip
    usages = await bounded(subscriptions, lambda s: reader.current_usage(s, s), concurrency)
    for subscription, current in zip(subscriptions, usages, strict=True):
        if current is not None and (difference := _usage_difference(subscription, current, expected, settings)):
            differences.append(difference)
    return differences


def _usage_event(data: str) -> UsageRecorded:
    event = decode_event(data)
    assert isinstance(event, UsageRecorded)
    return event


async def bounded(items: list[T], read: Callable[[T], Awaitable[R]], concurrency: int) -> list[R]:
    """`read` of each item in order, at most `concurrency` at once, `BATCH` items at a time."""
    gate = asyncio.Semaphore(max(1, concurrency))

    async def one(item: T) -> R:
        async with gate:
            return await read(item)

    results: list[R] = []
    for start in range(0, len(items), BATCH):
        results += await asyncio.gather(*(one(item) for item in items[start : start + BATCH]))
    return results


def _differing(ours: dict[str, Any], lago: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The fields of Lago's event that are not ours: (ledger's, Lago's) by name."""
    pairs: dict[str, tuple[Any, Any]] = {
        name: (ours.get(name), lago.get(name)) for name in ("code", "external_subscription_id")
    }
    pairs["timestamp"] = (_iso(ours["timestamp"]), lago.get("timestamp"))
    properties = lago.get("properties")
    theirs: dict[str, Any] = properties if isinstance(properties, dict) else {}
    for name, value in ours["properties"].items():
        pairs[f"properties.{name}"] = (value, theirs.get(name))
    return {name: pair for name, pair in pairs.items() if not _same(*pair, timestamp=name == "timestamp")}


def _same(ours: Any, theirs: Any, timestamp: bool = False) -> bool:
    """Equal as Lago keeps them: numbers by value (Lago may echo a number as a string), instants
    to the millisecond."""
    if timestamp:
        return _instant(ours) == _instant(theirs)
    if isinstance(ours, bool) or isinstance(theirs, bool):
        return ours is theirs
    if isinstance(ours, int | Decimal) and isinstance(theirs, int | Decimal | str):
        try:
            return Decimal(ours) == Decimal(theirs)
        except ArithmeticError:
            return False
    return bool(ours == theirs)


def _instant(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _iso(seconds: Decimal) -> str:
    moment = datetime.fromtimestamp(int(seconds), tz=UTC) + timedelta(milliseconds=int(seconds % 1 * 1000))
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _usage_difference(
    subscription: str, current: dict[str, Any], expected: dict[str, dict[str, Any]], settings: LagoSettings
) -> dict[str, Any] | None:
    """Our events in Lago's current period of the subscription, counted by Lago and by the ledger."""
    start, end = _instant(current.get("from_datetime")), _instant(current.get("to_datetime"))
    if start is None or end is None:
        return None
    found = current.get("charges_usage")
    charges: list[Any] = found if isinstance(found, list) else []
    lago_count = sum(
        int(c.get("events_count") or 0)
        for c in charges
        if isinstance(c, dict) and (c.get("billable_metric") or {}).get("code") == settings.event_code
    )
    ledger_count = len([
        payload for payload in expected.values()
        if payload["external_subscription_id"] == subscription
        and start <= datetime.fromtimestamp(float(payload["timestamp"]), tz=UTC) <= end
    ])  # fmt: skip
    if lago_count == ledger_count:
        return None
    period = {"from_datetime": current.get("from_datetime"), "to_datetime": current.get("to_datetime")}
    return {
        "kind": "usage_differs", "subscription": subscription, "period": period,
        "ledger": {"events_count": ledger_count}, "lago": {"events_count": lago_count},
    }  # fmt: skip


def counted(differences: Iterable[dict[str, Any]]) -> dict[str, int]:
    """How many differences of each kind (the CLI's summary line)."""
    return dict(Counter(d["kind"] for d in differences))

