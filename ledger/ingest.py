"""Usage of calls made outside the gateway (the SDK's calls): what the ledger already holds of them
(idempotency), and the budget periods their cost is added to.

Each ingested call is a `UsageRecorded` on the stream `request:<call_id>` — the proxy's own
namespace, version 1 — so the event store itself refuses a second one: a call is billed once
whatever retries, processes and restarts do. Its metadata says `source: "ingest"`, who sent it, and
the digest of what was sent, so that a resend is told apart from a different call reusing the id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

import msgspec

from spendledger.ledger.connections import Queryable
from spendledger.ledger.events import UsageRecorded, decode_event
from spendledger.ledger.scopes import BudgetSettings, Scopes

_digest_encoder: Final = msgspec.json.Encoder(order="sorted", decimal_format="string")


def digest(content: Any) -> str:
    """The SHA-256 of a record's content as sent (keys sorted): a resend has the same digest."""
    return hashlib.sha256(_digest_encoder.encode(content)).hexdigest()


class Recorded(msgspec.Struct, frozen=True, kw_only=True):
    """A call the ledger holds already: its event, and the digest it was ingested with (None: it
    came through the proxy, or before digests)."""

    event: UsageRecorded
    digest: str | None


_RECORDED: Final = """
select data::text as data, metadata->>'ingest_digest' as digest
from events
where stream = any($1::text[]) and type = 'UsageRecorded'
"""


async def recorded_calls(conn: Queryable, call_ids: Sequence[str]) -> dict[str, Recorded]:
    """The calls among `call_ids` that have their UsageRecorded already."""
    rows = await conn.fetch(_RECORDED, [f"request:{call_id}" for call_id in call_ids])
    found: dict[str, Recorded] = {}
    for row in rows:
        event = decode_event(row["data"])
        assert isinstance(event, UsageRecorded)
        found[event.call_id] = Recorded(event=event, digest=row["digest"])
    return found


# A batch's customers seen for the first time, created as admission creates them (with the default
# budget persisted on them), in one order so that racing batches never wait on each other in a circle.
_FIRST_SEEN: Final = """
select count(sl_customer_first_seen(c, $2, $3::jsonb))
from unnest($1::text[]) as c
where not exists (select from customers k where k.user_id = c)
"""

# The periods admission would give a request of these scopes now: the budget rows its cost is added
# to (sl_request_scopes and sl_period_start are the rules; this only asks them, for a batch). The
# period start is computed once per (duration, anchor class): anchors of a class share their
# periods (sl_period_class), and a batch's scopes have few classes.
_PERIODS: Final = """
with scopes as materialized (
    select e.i, s.ord, s.scope, s.scope_id, s.anchor, coalesce(s.budget_duration, '') as duration,
           sl_period_class(s.anchor) as class
    from unnest($1::text[], $2::text[], $3::text[], $4::text[])
         with ordinality as e(key_hash, user_id, team_id, customer_id, i),
         sl_request_scopes($6::jsonb || jsonb_build_object('key_hash', e.key_hash, 'user_id', e.user_id,
                                                           'team_id', e.team_id, 'customer_id', e.customer_id)) as s
    where s.max_budget is not null or s.budget_duration is not null
),
starts as materialized (
    select duration, class, sl_period_start(min(anchor), nullif(duration, ''), $5) as period
    from scopes group by duration, class
)
select s.i, s.scope, s.scope_id, t.period
from scopes s join starts t on t.duration = s.duration and t.class = s.class
order by s.i, s.ord
"""

_json: Final = msgspec.json.Encoder(decimal_format="number")

Periods = tuple[tuple[str, str, str], ...]


async def budget_periods(
    conn: Queryable, scopes: Sequence[Scopes], at: datetime, settings: BudgetSettings, meta: dict[str, Any]
) -> list[Periods]:
    """For each request's scopes, the (scope, scope_id, period start) of its budgets at `at`: the
    key's, user's, team's, customer's (its own tier, or the config's default for a customer seen
    for the first time, created here with `meta` as the proxy's admission creates it) and the
    global budget's.

    Ingested usage counts in the periods current when it is recorded, whatever times it claims: a
    backdated record cannot slip its cost into a period that is over."""
    distinct = list(dict.fromkeys(scopes))  # a batch names few scope sets: each is asked once
    customers = sorted({s.customer_id for s in distinct if s.customer_id is not None})
    if customers:
        await conn.execute(_FIRST_SEEN, customers, settings.default_budget_id, _json.encode(meta).decode())
    rows = await conn.fetch(
        _PERIODS,
        [s.key_hash for s in distinct],
        [s.user_id for s in distinct],
        [s.team_id for s in distinct],
        [s.customer_id for s in distinct],
        at,
        _json.encode(settings).decode(),
    )
    periods: list[list[tuple[str, str, str]]] = [[] for _ in distinct]
    for row in rows:
        periods[row["i"] - 1].append((row["scope"], row["scope_id"], row["period"].isoformat()))
    of_scopes = {s: tuple(p) for s, p in zip(distinct, periods, strict=True)}
    return [of_scopes[s] for s in scopes]
