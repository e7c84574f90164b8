"""The event log (append-only), the key directory, customers and spend totals.

Revision ID: 0001
Revises:
"""

from alembic import op
from spendledger.ledger.db import execute_script

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
"""

DOWNGRADE = """
drop table spend_totals;
drop table customers;
drop table keys;
drop table events;
drop function events_refuse_change();
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
