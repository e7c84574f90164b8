"""The event log, the key directory, customers and spend totals.

Revision ID: 0001
Revises:
"""

from alembic import op
from ledger.db import split_sql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UPGRADE = r"""
create table events (
    position    bigint generated always as identity primary key,
    stream      text        not null,
    version     integer     not null check (version > 0),
    type        text        not null,
    data        jsonb       not null,
    metadata    jsonb       not null default '{}',
    recorded_at timestamptz not null default now(),
    -- Followers read by (txid, position) below the snapshot's xmin: identity values commit out of
    -- order, so position alone would let a follower skip an event for good.
    txid        xid8        not null default pg_current_xact_id(),
    constraint events_stream_version_key unique (stream, version)
);
create index events_txid_position on events (txid, position);
create index events_type_recorded on events (type, recorded_at);

create function events_refuse_change() returns trigger language plpgsql as $$
begin
    raise exception 'events are append-only: % refused', tg_op using errcode = 'insufficient_privilege';
end $$;
create trigger events_no_update_delete before update or delete on events
    for each row execute function events_refuse_change();
create trigger events_no_truncate before truncate on events
    for each statement execute function events_refuse_change();

create table keys (
    key_hash              text primary key,
    key_name              text not null,
    key_alias             text unique,
    user_id               text,
    team_id               text,
    models                text[] not null default '{}',
    metadata              jsonb not null default '{}',
    max_budget            numeric,
    budget_duration       text,
    budget_id             text,
    rpm_limit             integer,
    tpm_limit             integer,
    max_parallel_requests integer,
    expires               timestamptz,
    blocked               boolean not null default false,
    created_at            timestamptz not null,
    updated_at            timestamptz not null
);
create index keys_user on keys (user_id);
create index keys_team on keys (team_id);

create table customers (
    user_id              text primary key,
    alias                text,
    blocked              boolean not null default false,
    budget_id            text,
    allowed_model_region text,
    default_model        text,
    created_at           timestamptz not null
);

-- Lifetime totals per scope; scope is one of key, user, team, customer, model.
create table spend_totals (
    scope         text    not null,
    scope_id      text    not null,
    spend         numeric not null default 0,
    requests      bigint  not null default 0,
    input_tokens  bigint  not null default 0,
    output_tokens bigint  not null default 0,
    last_at       timestamptz,
    primary key (scope, scope_id)
);

-- Projection of one UsageRecorded event: used live (in the recording transaction) and by rebuilds.
-- Rows are touched in (scope, scope_id) order so concurrent recorders never deadlock.
create function sl_apply_usage(d jsonb) returns void language sql as $$
    insert into spend_totals as t (scope, scope_id, spend, requests, input_tokens, output_tokens, last_at)
    select s.scope, s.scope_id, (d->>'cost')::numeric, 1,
           (d->>'input_tokens')::bigint, (d->>'output_tokens')::bigint, (d->>'ended_at')::timestamptz
    from (values ('customer', d->>'customer_id'), ('key', d->>'key_hash'), ('model', d->>'model_group'),
                 ('team', d->>'team_id'), ('user', d->>'user_id')) as s(scope, scope_id)
    where s.scope_id is not null
    order by s.scope, s.scope_id
    on conflict (scope, scope_id) do update set
        spend = t.spend + excluded.spend,
        requests = t.requests + 1,
        input_tokens = t.input_tokens + excluded.input_tokens,
        output_tokens = t.output_tokens + excluded.output_tokens,
        last_at = greatest(t.last_at, excluded.last_at)
$$;

-- Record one request in one round trip: the customer on first sight, the UsageRecorded event, and
-- its projections, all in the caller's transaction.
create function sl_record_usage(d jsonb, meta jsonb, default_budget_id text)
returns table (event_position bigint, key_spend numeric)
language plpgsql as $$
declare
    customer text := d->>'customer_id';
begin
    if customer is not null then
        insert into customers (user_id, budget_id, created_at)
        values (customer, default_budget_id, now())
        on conflict (user_id) do nothing;
        if found then
            insert into events (stream, version, type, data, metadata)
            values ('customer:' || customer, 1, 'CustomerCreated',
                    jsonb_build_object('type', 'CustomerCreated', 'user_id', customer, 'alias', null,
                                       'blocked', false, 'budget_id', default_budget_id,
                                       'source', 'first_sight'),
                    meta);
        end if;
    end if;
    insert into events (stream, version, type, data, metadata)
    values ('request:' || (d->>'call_id'), 1, 'UsageRecorded', d, meta)
    returning position into event_position;
    perform sl_apply_usage(d);
    select trim_scale(t.spend) into key_spend from spend_totals t where t.scope = 'key' and t.scope_id = d->>'key_hash';
    return next;
end $$;
"""

DOWNGRADE = """
drop function sl_record_usage(jsonb, jsonb, text);
drop function sl_apply_usage(jsonb);
drop table spend_totals;
drop table customers;
drop table keys;
drop table events;
drop function events_refuse_change();
"""


def upgrade() -> None:
    for statement in split_sql(UPGRADE):
        op.get_bind().exec_driver_sql(statement)


def downgrade() -> None:
    for statement in split_sql(DOWNGRADE):
        op.get_bind().exec_driver_sql(statement)
