"""Audit filters, and the asynchronous reporting projection (daily spend) with its checkpoint.

Revision ID: 0004
Revises: 0003
"""

from alembic import op
from spendledger.ledger.db import execute_script

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UPGRADE = r"""
-- Audit filters look into the events' data: one index per filter, in the cursor's order.
create index events_customer on events ((data->>'customer_id'), txid, position);
create index events_user on events ((data->>'user_id'), txid, position);
create index events_team on events ((data->>'team_id'), txid, position);
create index events_key on events ((data->>'key_hash'), txid, position);
create index events_model on events ((data->>'model_group'), txid, position);
create index events_stream_txid on events (stream, txid, position);
create index events_recorded on events (recorded_at);

-- Daily spend per scope (customer, user, team, key, model), kept by a follower of the log.
create table daily_spend (
    day           date    not null,
    scope         text    not null,
    scope_id      text    not null,
    requests      bigint  not null default 0,
    input_tokens  bigint  not null default 0,
    output_tokens bigint  not null default 0,
    spend         numeric not null default 0,
    primary key (day, scope, scope_id)
);

-- Where each follower of the log stands: the last (txid, position) it applied, written in the
-- same transaction as what it applied, so every event is applied exactly once across crashes.
create table projection_checkpoints (
    name          text   primary key,
    last_txid     xid8   not null default '0',
    last_position bigint not null default 0,
    updated_at    timestamptz not null default now()
);
insert into projection_checkpoints (name) values ('daily_spend');

-- Daily spend of a set of UsageRecorded events (the one definition, used by the follower and by
-- rebuilds).
create function sl_daily_rows(ds jsonb) returns table (
    day date, scope text, scope_id text, requests bigint, input_tokens bigint, output_tokens bigint, spend numeric
) language sql immutable as $$
    select ((d->>'ended_at')::timestamptz at time zone 'UTC')::date, s.scope, s.scope_id, count(*),
           sum((d->>'input_tokens')::bigint), sum((d->>'output_tokens')::bigint), sum((d->>'cost')::numeric)
    from jsonb_array_elements(ds) as d
    cross join lateral (values ('customer', d->>'customer_id'), ('user', d->>'user_id'),
                               ('team', d->>'team_id'), ('key', d->>'key_hash'),
                               ('model', d->>'model_group')) as s(scope, scope_id)
    where s.scope_id is not null
    group by 1, 2, 3
$$;

-- Follow the log one batch further: apply the next events after the checkpoint, in (txid,
-- position) order and only those below the snapshot's xmin (every transaction before it is over,
-- so no event can still appear behind the checkpoint), and move the checkpoint — in one
-- transaction, so a crash applies the batch entirely or not at all. Returns the events read, or
-- -1 when another process holds the checkpoint.
create function sl_follow_daily_spend(batch integer) returns integer language plpgsql as $$
declare
    cp projection_checkpoints;
    next_txid xid8;
    next_position bigint;
    usage jsonb;
    n integer;
begin
    select * into cp from projection_checkpoints where name = 'daily_spend' for update skip locked;
    if not found then
        return -1;
    end if;
    with next_events as (
        select txid, position, type, data from events
        where (txid, position) > (cp.last_txid, cp.last_position)
          and txid < pg_snapshot_xmin(pg_current_snapshot())
        order by txid, position
        limit batch
    )
    select count(*), coalesce(jsonb_agg(data) filter (where type = 'UsageRecorded'), '[]'),
           (array_agg(txid order by txid desc, position desc))[1],
           (array_agg(position order by txid desc, position desc))[1]
    into n, usage, next_txid, next_position
    from next_events;
    if n = 0 then
        return 0;
    end if;
    insert into daily_spend as t (day, scope, scope_id, requests, input_tokens, output_tokens, spend)
    select * from sl_daily_rows(usage) order by 1, 2, 3
    on conflict (day, scope, scope_id) do update set
        requests = t.requests + excluded.requests,
        input_tokens = t.input_tokens + excluded.input_tokens,
        output_tokens = t.output_tokens + excluded.output_tokens,
        spend = t.spend + excluded.spend;
    update projection_checkpoints
    set last_txid = next_txid, last_position = next_position,
        updated_at = now()
    where name = 'daily_spend';
    return n;
end $$;
"""

DOWNGRADE = """
drop function sl_follow_daily_spend(integer);
drop function sl_daily_rows(jsonb);
drop table projection_checkpoints;
drop table daily_spend;
drop index events_recorded;
drop index events_stream_txid;
drop index events_model;
drop index events_key;
drop index events_team;
drop index events_user;
drop index events_customer;
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
