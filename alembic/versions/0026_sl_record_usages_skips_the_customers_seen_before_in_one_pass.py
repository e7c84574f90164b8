"""sl_record_usages skips the customers seen before in one pass

Functions: sl_record_usages. Written by scripts/sql_migration.py from ledger/sql/, which holds their
current text; the downgrade carries the text the previous revision left.

Revision ID: 0026
Revises: 0025
"""

from alembic import op
from spendledger.ledger.db import execute_script

revision = "0026"
down_revision = "0025"
branch_labels = None
depends_on = None

UPGRADE = r"""
-- Record requests in one transaction: their events (marked for the webhook follower when
-- ctx.webhooks), their Lago rows, their holds released (or their cost drawn from the lease they
-- were admitted under), and their projection (sl_project_usage). Returns each request's key's
-- lifetime spend once it is counted.
create or replace function sl_record_usages(ds jsonb, metas jsonb, ctx jsonb, outboxes jsonb) returns table (idx integer, key_spend numeric)
language plpgsql set plan_cache_mode = force_generic_plan as $$
declare
    c record;
    released jsonb;
    spends numeric[];
    call_ids text[] := array(select d->>'call_id' from jsonb_array_elements(ds) as d);
    marks jsonb := case when coalesce((ctx->>'webhooks')::boolean, false)
                   then '{"webhooks": true}' else '{}' end;
begin
    for c in
        select d->>'customer_id' as customer, min(i) as first
        from jsonb_array_elements(ds) with ordinality as e(d, i)
        where d->>'customer_id' is not null
          -- Customers seen before are skipped here, in one pass, rather than one call each that
          -- finds them and does nothing; a customer made meanwhile is left to the call's conflict.
          and not exists (select from customers k where k.user_id = e.d->>'customer_id')
        group by 1 order by 1
    loop
        perform sl_customer_first_seen(c.customer, ctx->>'default_budget_id', metas->(c.first::integer - 1));
    end loop;
    -- The requests' holds: no other writer wants them (the sweeper skips locked holds).
    with gone as (
        delete from holds where call_id = any(call_ids)
        returning call_id, amount, budget_rows, parallel_rows, tpm_rows
    )
    select coalesce(jsonb_object_agg(call_id, to_jsonb(gone)), '{}') into released from gone;
    -- Requests admitted under a lease (ledger/leases.py) draw their cost from it.
    released := released || sl_draw_leases(ds, metas);
    insert into events (stream, version, type, data, metadata)
    select 'request:' || (e.d->>'call_id'), 1, 'UsageRecorded', e.d, (metas->(e.i::integer - 1)) || marks
    from jsonb_array_elements(ds) with ordinality as e(d, i)
    order by e.i;
    insert into outbox (sink, dedupe_key, payload, state, call_id)
    select o->>'sink', o->>'dedupe_key', o->'payload', o->>'state', e.d->>'call_id'
    from jsonb_array_elements(ds) with ordinality as e(d, i),
         jsonb_array_elements(coalesce(outboxes->(e.i::integer - 1), '[]')) as o
    order by e.i;
    spends := sl_key_spends(ds, sl_project_usage(array(select jsonb_array_elements(ds)), released));
    if coalesce((ctx->>'notify')::boolean, true)
       and (marks <> '{}' or jsonb_path_exists(outboxes, '$[*][*]')) then
        perform pg_notify('sl_outbox', '');
    end if;
    for i in 1 .. cardinality(spends) loop
        idx := i - 1;
        key_spend := spends[i];
        return next;
    end loop;
end $$;
"""

DOWNGRADE = r"""
CREATE OR REPLACE FUNCTION public.sl_record_usages(ds jsonb, metas jsonb, ctx jsonb, outboxes jsonb)
 RETURNS TABLE(idx integer, key_spend numeric)
 LANGUAGE plpgsql
 SET plan_cache_mode TO 'force_generic_plan'
AS $function$
declare
    c record;
    released jsonb;
    spends numeric[];
    call_ids text[] := array(select d->>'call_id' from jsonb_array_elements(ds) as d);
    marks jsonb := case when coalesce((ctx->>'webhooks')::boolean, false)
                   then '{"webhooks": true}' else '{}' end;
begin
    for c in
        select d->>'customer_id' as customer, min(i) as first
        from jsonb_array_elements(ds) with ordinality as e(d, i)
        where d->>'customer_id' is not null
        group by 1 order by 1
    loop
        perform sl_customer_first_seen(c.customer, ctx->>'default_budget_id', metas->(c.first::integer - 1));
    end loop;
    -- The requests' holds: no other writer wants them (the sweeper skips locked holds).
    with gone as (
        delete from holds where call_id = any(call_ids)
        returning call_id, amount, budget_rows, parallel_rows, tpm_rows
    )
    select coalesce(jsonb_object_agg(call_id, to_jsonb(gone)), '{}') into released from gone;
    -- Requests admitted under a lease (ledger/leases.py) draw their cost from it.
    released := released || sl_draw_leases(ds, metas);
    insert into events (stream, version, type, data, metadata)
    select 'request:' || (e.d->>'call_id'), 1, 'UsageRecorded', e.d, (metas->(e.i::integer - 1)) || marks
    from jsonb_array_elements(ds) with ordinality as e(d, i)
    order by e.i;
    insert into outbox (sink, dedupe_key, payload, state, call_id)
    select o->>'sink', o->>'dedupe_key', o->'payload', o->>'state', e.d->>'call_id'
    from jsonb_array_elements(ds) with ordinality as e(d, i),
         jsonb_array_elements(coalesce(outboxes->(e.i::integer - 1), '[]')) as o
    order by e.i;
    spends := sl_key_spends(ds, sl_project_usage(array(select jsonb_array_elements(ds)), released));
    if coalesce((ctx->>'notify')::boolean, true)
       and (marks <> '{}' or jsonb_path_exists(outboxes, '$[*][*]')) then
        perform pg_notify('sl_outbox', '');
    end if;
    for i in 1 .. cardinality(spends) loop
        idx := i - 1;
        key_spend := spends[i];
        return next;
    end loop;
end $function$;
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
