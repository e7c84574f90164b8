"""Lago: usage events, batched ≤ 100 to `POST /api/v1/events/batch`, handled as Lago behaves.

- 200: every event stored.
- 422 with `error_details` keyed by the index of the event: a batch is all-or-nothing at Lago, so
  nothing was stored. Events whose only error is `value_already_exist` on `transaction_id` were
  stored before (a retry after a lost answer): delivered. Events with any other error are poison:
  dead letters. The rest are re-sent at once, without them.
- 401/403: our key is refused — nothing is lost, delivery waits and says so (logs, health, metrics).
- 429, 5xx, timeouts, connection errors: retried later with backoff and jitter (`Retry-After` honoured).

Any other exception out of a batch's send is caught by the publisher, which then sends each row
alone, so that it fails only the row that causes it (ledger/outbox.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any, Final

import httpx
import msgspec

from spendledger.ledger.config import LagoSettings
from spendledger.ledger.events import UsageRecorded
from spendledger.ledger.outbox import Claimed, Delivery, OutboxRow
from spendledger.ledger.sinks.http import PostTarget
from spendledger.ledger.tokens import PART_FIELDS

NAME: Final = "lago"
MAX_BATCH: Final = 100
_MILLISECOND: Final = Decimal("0.001")
_decoder: Final = msgspec.json.Decoder()


def charge_by_id(event: UsageRecorded, charge_by: str) -> str | None:
    return {"end_user_id": event.customer_id, "user_id": event.user_id, "team_id": event.team_id}.get(
        charge_by
    )


def token_kind_properties(event: UsageRecorded) -> dict[str, int]:
    """The parts of input_tokens and output_tokens billed apart (ledger/tokens.py), each present
    when the request used it, for billable metrics that price them apart."""
    return {name: n for name in PART_FIELDS if (n := getattr(event, name))}


def lago_row(event: UsageRecorded, settings: LagoSettings) -> OutboxRow:
    """The frozen Lago event of a recorded request; without a charge-by id it is kept as unbillable."""
    subscriber = charge_by_id(event, settings.charge_by)
    seconds = Decimal(int(event.ended_at.timestamp() * 1000)) * _MILLISECOND
    payload = {
        "transaction_id": event.call_id,
        "external_subscription_id": subscriber,
        "external_customer_id": subscriber,
        "code": settings.event_code,
        "timestamp": seconds,
        "properties": {
            "input_tokens": event.input_tokens,
            "output_tokens": event.output_tokens,
            "total_tokens": event.total_tokens,
            "model": event.model_group,
            "response_cost": event.cost,
            **token_kind_properties(event),
        },
    }
    return OutboxRow(
        sink=NAME,
        dedupe_key=event.call_id,
        payload=payload,
        state="pending" if subscriber else "unbillable",
    )


def _index_errors(body: bytes) -> dict[int, dict[str, Any]] | None:
    """`error_details` keyed by batch index, or None if the answer is not in that shape."""
    try:
        details = _decoder.decode(body).get("error_details")
    except (msgspec.DecodeError, AttributeError):
        return None
    if not isinstance(details, dict) or not details or not all(str(k).isdigit() for k in details):
        return None
    return {int(k): v if isinstance(v, dict) else {"error": v} for k, v in details.items()}


def _already_stored(errors: dict[str, Any]) -> bool:
    codes = [code for value in errors.values() for code in (value if isinstance(value, list) else [value])]
    return bool(codes) and all(code == "value_already_exist" for code in codes)


class LagoSink:
    name = NAME
    batch_size = MAX_BATCH

    def __init__(self, settings: LagoSettings, client: httpx.AsyncClient, timeout_s: float = 10.0) -> None:
        headers = {"Authorization": f"Bearer {settings.api_key}", "Content-Type": "application/json"}
        url = settings.api_base.rstrip("/") + "/api/v1/events/batch"
        self._target = PostTarget(client, url, headers, httpx.Timeout(timeout_s))
        self._client = client

    async def deliver(self, rows: Sequence[Claimed]) -> Delivery:
        delivery = Delivery()
        pending = list(rows)
        while pending:
            body = b'{"events":[' + b",".join(row.payload for row in pending) + b"]}"
            try:
                response = await self._client.send(self._target.request(body))
            except httpx.HTTPError as exc:
                return self._retry_all(delivery, pending, f"lago unreachable: {type(exc).__name__}")
            status = response.status_code
            if status < 300:
                delivery.delivered += [row.id for row in pending]
                return delivery
            if status in (401, 403):
                delivery.unauthorized = True
                return self._retry_all(delivery, pending, f"lago answered {status}: API key refused")
            if status == 422:
                errors = _index_errors(response.content)
                if errors is None:
                    if len(pending) == 1:
                        delivery.dead[pending[0].id] = f"lago 422: {response.text[:500]}"
                        return delivery
                    # Not keyed by index: isolate the culprit by sending one event at a time.
                    for row in pending:
                        delivery.merge(await self.deliver([row]))
                    return delivery
                resend = []
                for index, row in enumerate(pending):
                    if index not in errors:
                        resend.append(row)
                    elif _already_stored(errors[index]):
                        delivery.delivered.append(row.id)
                    else:
                        delivery.dead[row.id] = f"lago 422: {msgspec.json.encode(errors[index]).decode()}"
                pending = resend
                continue
            retry_after = _retry_after(response)
            delivery.retry_after_s = retry_after
            return self._retry_all(delivery, pending, f"lago answered {status}")
        return delivery

    @staticmethod
    def _retry_all(delivery: Delivery, rows: Sequence[Claimed], error: str) -> Delivery:
        for row in rows:
            delivery.retry[row.id] = error
        return delivery


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value else None
    except ValueError:
        return None
