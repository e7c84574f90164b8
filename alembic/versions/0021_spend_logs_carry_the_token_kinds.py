"""spend_logs carry the parts of the token totals billed apart and each kind's cost (issue 18)

Functions: sl_spend_log_row, whose columns grow (so it is dropped and created, and the view on it
with it). Written by hand: scripts/sql_migration.py replaces functions, not the views on them.
ledger/sql/settle.sql holds the function's current text.

Revision ID: 0021
Revises: 0020
"""

from alembic import op
from spendledger.ledger.db import execute_script

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None

UPGRADE = r"""
drop view spend_logs;

drop function sl_spend_log_row(jsonb);

create or replace function sl_spend_log_row(d jsonb) returns table (request_id text, call_type text, api_key text, spend numeric, total_tokens bigint, prompt_tokens bigint, completion_tokens bigint, start_time timestamptz, end_time timestamptz, model text, model_id text, model_group text, user_id text, team_id text, end_user text, status text, usage_estimated boolean, cached_input_tokens bigint, cache_creation_input_tokens bigint, input_audio_tokens bigint, input_image_tokens bigint, reasoning_tokens bigint, output_audio_tokens bigint, output_image_tokens bigint, costs jsonb)
language sql immutable as $$
    select d->>'call_id', d->>'route', d->>'key_hash', (d->>'cost')::numeric,
           (d->>'total_tokens')::bigint, (d->>'input_tokens')::bigint, (d->>'output_tokens')::bigint,
           (d->>'started_at')::timestamptz, (d->>'ended_at')::timestamptz, d->>'upstream_model',
           d->>'deployment_id', d->>'model_group', d->>'user_id', d->>'team_id', d->>'customer_id',
           d->>'status', coalesce((d->>'usage_estimated')::boolean, false),
           coalesce((d->>'cached_input_tokens')::bigint, 0), coalesce((d->>'cache_creation_input_tokens')::bigint, 0),
           coalesce((d->>'input_audio_tokens')::bigint, 0), coalesce((d->>'input_image_tokens')::bigint, 0),
           coalesce((d->>'reasoning_tokens')::bigint, 0), coalesce((d->>'output_audio_tokens')::bigint, 0),
           coalesce((d->>'output_image_tokens')::bigint, 0), coalesce(d->'costs', '{}')
$$;

create view spend_logs as
select l.*, e.recorded_at, e.stream
from events e, sl_spend_log_row(e.data) as l
where e.type = 'UsageRecorded';
"""

DOWNGRADE = r"""
drop view spend_logs;

drop function sl_spend_log_row(jsonb);

create or replace function sl_spend_log_row(d jsonb) returns table (request_id text, call_type text, api_key text, spend numeric, total_tokens bigint, prompt_tokens bigint, completion_tokens bigint, start_time timestamptz, end_time timestamptz, model text, model_id text, model_group text, user_id text, team_id text, end_user text, status text, usage_estimated boolean)
language sql immutable as $$
    select d->>'call_id', d->>'route', d->>'key_hash', (d->>'cost')::numeric,
           (d->>'total_tokens')::bigint, (d->>'input_tokens')::bigint, (d->>'output_tokens')::bigint,
           (d->>'started_at')::timestamptz, (d->>'ended_at')::timestamptz, d->>'upstream_model',
           d->>'deployment_id', d->>'model_group', d->>'user_id', d->>'team_id', d->>'customer_id',
           d->>'status', coalesce((d->>'usage_estimated')::boolean, false)
$$;

create view spend_logs as
select l.*, e.recorded_at, e.stream
from events e, sl_spend_log_row(e.data) as l
where e.type = 'UsageRecorded';
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
