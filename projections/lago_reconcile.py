"""`reconcile`: every difference between the ledger and what the Lago sink acknowledged — billable
usage with no Lago row, Lago rows with no usage, Lago events still pending or dead, and delivered
events whose payload is not the usage's. Amounts compare by value, exactly."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Final

import asyncpg
import msgspec

from spendledger.projections.reconciliation import CHARGE_BY_FIELD, read_snapshot

_decoder: Final = msgspec.json.Decoder(float_hook=Decimal)

# Lago payload field → how the ledger's UsageRecorded gives it (compared for delivered events).
_PROPERTIES: Final = {
    "input_tokens": "input_tokens",
    "output_tokens": "output_tokens",
    "total_tokens": "total_tokens",
    "model": "model_group",
    "response_cost": "cost",
}

_RECONCILE_SQL: Final = """
select e.data::text as data, o.id, o.dedupe_key, o.state, o.payload::text as payload, o.attempts,
       o.last_error
from (select data from events where type = 'UsageRecorded') e
full join (select * from outbox where sink = 'lago') o on o.dedupe_key = e.data->>'call_id'
where (o.id is null and e.data->>$1::text is not null)
   or e.data is null
   or o.state in ('pending', 'dead')
   or (o.state = 'unbillable' and e.data->>$1::text is not null)
   or (o.state = 'delivered' and (
          o.payload->'transaction_id' is distinct from e.data->'call_id'
       or nullif(o.payload->'external_subscription_id', 'null') is distinct from nullif(e.data->$1::text, 'null')
       or nullif(o.payload->'external_customer_id', 'null') is distinct from nullif(e.data->$1::text, 'null')
       or o.payload->'properties'->'input_tokens' is distinct from e.data->'input_tokens'
       or o.payload->'properties'->'output_tokens' is distinct from e.data->'output_tokens'
       or o.payload->'properties'->'total_tokens' is distinct from e.data->'total_tokens'
       or o.payload->'properties'->'model' is distinct from e.data->'model_group'
       or o.payload->'properties'->'response_cost' is distinct from e.data->'cost'))
order by coalesce(e.data->>'call_id', o.dedupe_key), o.id
"""


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON values: numbers by value (0.10 = 0.1), but a string is never a number."""
    numbers = (int, Decimal)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, numbers) and isinstance(b, numbers):
        return Decimal(a) == Decimal(b)
    return type(a) is type(b) and a == b


def _ledger_side(data: dict[str, Any], charge_field: str) -> dict[str, Any]:
    return {
        "external_subscription_id": data.get(charge_field),
        "input_tokens": data.get("input_tokens"),
        "output_tokens": data.get("output_tokens"),
        "total_tokens": data.get("total_tokens"),
        "model": data.get("model_group"),
        "response_cost": data.get("cost"),
        "ended_at": data.get("ended_at"),
    }


def _lago_side(record: asyncpg.Record, payload: dict[str, Any]) -> dict[str, Any]:
    properties = payload.get("properties") or {}
    side = {
        "state": record["state"],
        "transaction_id": payload.get("transaction_id"),
        "external_subscription_id": payload.get("external_subscription_id"),
        **{name: properties.get(name) for name in _PROPERTIES},
    }
    if record["state"] in ("pending", "dead"):
        side |= {"attempts": record["attempts"], "last_error": record["last_error"]}
    return side


def _payload_differences(
    data: dict[str, Any], payload: dict[str, Any], charge_field: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fields of a delivered Lago event that are not the usage's: (ledger's, Lago's)."""
    properties = payload.get("properties") or {}
    expected = {
        "transaction_id": (data.get("call_id"), payload.get("transaction_id")),
        "external_subscription_id": (data.get(charge_field), payload.get("external_subscription_id")),
        "external_customer_id": (data.get(charge_field), payload.get("external_customer_id")),
        **{name: (data.get(field), properties.get(name)) for name, field in _PROPERTIES.items()},
    }
    ledger: dict[str, Any] = {}
    lago: dict[str, Any] = {}
    for name, (ours, theirs) in expected.items():
        if not _same(ours, theirs):
            ledger[name], lago[name] = ours, theirs
    return ledger, lago


async def reconcile(
    conn: asyncpg.Connection | asyncpg.Pool, charge_by: str = "end_user_id"
) -> list[dict[str, Any]]:
    """Every difference between the ledger and the Lago sink, by call id:

    - `missing_in_lago`: usage with a charge-by id and no Lago row;
    - `unbillable_with_charge_by_id`: usage with a charge-by id whose Lago row was kept unbillable;
    - `not_in_ledger`: a Lago row with no UsageRecorded;
    - `pending` / `dead`: a Lago event not (yet) acknowledged, or rejected by Lago;
    - `payload_mismatch`: a delivered event whose payload is not the usage's (only the differing
      fields are listed, on both sides).

    `charge_by` is LAGO_API_CHARGE_BY (end_user_id, user_id or team_id).
    """
    if charge_by not in CHARGE_BY_FIELD:
        raise ValueError(f"charge_by must be one of {', '.join(CHARGE_BY_FIELD)}, got {charge_by!r}")
    charge_field = CHARGE_BY_FIELD[charge_by]
    async with read_snapshot(conn) as snapshot:
        records = await snapshot.fetch(_RECONCILE_SQL, charge_field)
    differences: list[dict[str, Any]] = []
    for record in records:
        data: dict[str, Any] | None = _decoder.decode(record["data"]) if record["data"] is not None else None
        payload: dict[str, Any] = _decoder.decode(record["payload"]) if record["payload"] is not None else {}
        call_id = data["call_id"] if data is not None else record["dedupe_key"]
        ledger = _ledger_side(data, charge_field) if data is not None else None
        state = record["state"]
        if data is None:
            kind, lago = "not_in_ledger", _lago_side(record, payload)
        elif state is None:
            kind, lago = "missing_in_lago", None
        elif state in ("pending", "dead"):
            kind, lago = state, _lago_side(record, payload)
        elif state == "unbillable":
            kind, lago = "unbillable_with_charge_by_id", _lago_side(record, payload)
        else:
            ours, theirs = _payload_differences(data, payload, charge_field)
            if not ours:
                continue
            kind, ledger, lago = "payload_mismatch", ours, theirs
        differences.append({"call_id": call_id, "kind": kind, "ledger": ledger, "lago": lago})
    return differences
