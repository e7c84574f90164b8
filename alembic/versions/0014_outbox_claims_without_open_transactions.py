"""Outbox rows claimed in short transactions, never held open across a send.

A publisher used to claim its rows with `FOR UPDATE SKIP LOCKED` in a transaction it held open for
the HTTP send. That transaction has an xid (from FOR UPDATE), so a receiver answering in seconds
held back the snapshot horizon (`pg_snapshot_xmin`) below which every follower of the log reads
(`/audit/events`, the daily spend, the webhook follower) for as long.

Now a claim is one short statement, `sl_outbox_claim`: it takes the due rows with SKIP LOCKED and
moves their `next_attempt_at` forward by a lease, out of the due set, and commits. The send runs
with no transaction open; `sl_outbox_mark` then records each row's outcome in another short
statement. A publisher that dies between the two leaves its rows pending: they are due again when
the lease passes, and are re-sent with the same ids (receivers dedupe). The lease's end, returned
by the claim, is the claim's fence: a retry or dead mark applies only while `next_attempt_at`
still holds it (a publisher that overran its lease does not overwrite a newer claim's outcome); a
delivered mark applies to any pending row, as the receiver has it either way.

Both commit without waiting for their flush to disk (`synchronous_commit = off`, set for their own
transaction): a claim or mark lost to a database crash leaves the rows pending, to be sent again
with the same ids, as after a publisher killed between send and mark.

`own_failures` counts a row's failures of its own (an exception while building or sending that row,
not the receiver being down); the publisher dead-letters a row when they reach its bound
(`ledger.outbox.MAX_OWN_FAILURES`). A retried dead letter starts again from 0.

The claim reads in the order of `outbox_due` (sink, next_attempt_at, id, pending rows only).

Revision ID: 0014
Revises: 0013
"""

from alembic import op
from ledger.db import execute_script

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

UPGRADE = r"""
alter table outbox add column own_failures integer not null default 0;

-- Up to `n` due rows of one sink, leased: pushed out of the due set until `lease_until`.
create function sl_outbox_claim(p_sink text, n integer, lease interval)
returns table (id bigint, dedupe_key text, payload text, attempts integer, own_failures integer,
               created_at timestamptz, lease_until timestamptz)
language plpgsql as $$
begin
    perform set_config('synchronous_commit', 'off', true);
    return query
    with due as (
        select o.id from outbox o
        where o.sink = p_sink and o.state = 'pending' and o.next_attempt_at <= now()
        order by o.next_attempt_at, o.id  -- the order of outbox_due
        limit n
        for update skip locked
    )
    update outbox o set next_attempt_at = now() + lease
    from due where o.id = due.id
    returning o.id, o.dedupe_key, o.payload::text, o.attempts, o.own_failures, o.created_at,
              o.next_attempt_at;
end $$;

-- The outcome of each claimed row: 'delivered', 'dead' or 'retry' (due again after `wait_s`);
-- `own` when it failed on its own; `lease_until` the claim's fence (null: none). Returns the rows
-- marked (a stale claim's are not).
create function sl_outbox_mark(ids bigint[], outcomes text[], errors text[], waits_s double precision[],
                               own boolean[], leases timestamptz[])
returns integer language plpgsql as $$
declare
    marked integer;
begin
    perform set_config('synchronous_commit', 'off', true);
    update outbox o set
        state = case m.outcome when 'retry' then 'pending' else m.outcome end,
        attempts = o.attempts + 1,
        own_failures = o.own_failures + m.own::integer,
        last_error = m.error,
        delivered_at = case when m.outcome = 'delivered' then clock_timestamp() end,
        next_attempt_at = case when m.outcome = 'retry' then now() + make_interval(secs => m.wait_s)
                               else o.next_attempt_at end
    from unnest(ids, outcomes, errors, waits_s, own, leases) as m(id, outcome, error, wait_s, own, lease_until)
    where o.id = m.id and o.state = 'pending'
      and (m.outcome = 'delivered' or m.lease_until is null or o.next_attempt_at = m.lease_until);
    get diagnostics marked = row_count;
    return marked;
end $$;
"""

DOWNGRADE = """
drop function sl_outbox_mark(bigint[], text[], text[], double precision[], boolean[], timestamptz[]);
drop function sl_outbox_claim(text, integer, interval);
alter table outbox drop column own_failures;
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
