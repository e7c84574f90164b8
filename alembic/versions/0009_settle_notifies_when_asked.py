"""A settle batch wakes the publishers only when its caller asks (`ctx.notify`, default true).

Each `NOTIFY` costs its transaction a global lock at commit and wakes every listening publisher
(their backend and their process): at 1 connection about 0.1 ms of every request's latency
(the floor app of scripts/bench/floor.py, a durable insert without and with it: +0.58 against
+0.68 ms over the upstream direct). A publisher
that is woken lingers 50 ms and then claims every row due, so a notification per batch is
wasted while one is pending: `GroupRecorder` asks for one at most every 50 ms and sends a trailing
one itself when it let a batch go without.

`sl_record_usages` is 0006's definition with that one condition changed (the whole function is
carried here, and 0006's for the downgrade).

Revision ID: 0009
Revises: 0008
"""

from alembic import op
from spendledger.ledger.db import execute_script

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# Every statement this revision runs, in full: it stands alone, reading no other revision.
UPGRADE = r"""
create or replace function sl_record_usages(ds jsonb, metas jsonb, ctx jsonb, outboxes jsonb)
returns table (idx integer, key_spend numeric)
language plpgsql as $$
declare
    c record;
    w record;
    released jsonb;
    seen jsonb;
    actual jsonb := '{}';
    spends numeric[];
    new_value numeric;
    call_ids text[] := array(select d->>'call_id' from jsonb_array_elements(ds) as d);
    webhooks boolean := coalesce((ctx->>'webhooks')::boolean, false);
begin
    for c in
        select d->>'customer_id' as customer, min(i) as first
        from jsonb_array_elements(ds) with ordinality as e(d, i)
        where d->>'customer_id' is not null
        group by 1 order by 1
    loop
        perform sl_customer_first_seen(c.customer, ctx->>'default_budget_id', metas->(c.first::integer - 1));
    end loop;
    -- The batch's holds: no other writer wants them (the sweeper skips locked holds).
    with gone as (
        delete from holds where call_id = any(call_ids)
        returning call_id, amount, budget_rows, parallel_rows, tpm_rows
    )
    select coalesce(jsonb_object_agg(call_id, to_jsonb(gone)), '{}') into released from gone;
    insert into events (stream, version, type, data, metadata)
    select 'request:' || (e.d->>'call_id'), 1, 'UsageRecorded', e.d, metas->(e.i::integer - 1)
    from jsonb_array_elements(ds) with ordinality as e(d, i)
    order by e.i;
    insert into outbox (sink, dedupe_key, payload, state, call_id)
    select o->>'sink', o->>'dedupe_key', o->'payload', o->>'state', e.d->>'call_id'
    from jsonb_array_elements(ds) with ordinality as e(d, i),
         jsonb_array_elements(coalesce(outboxes->(e.i::integer - 1), '[]')) as o
    order by e.i;
    -- The values before the batch, read without locks; the webhook rows from them.
    select coalesce(jsonb_object_agg(k, v), '{}') into seen from (
        select distinct on (k) k, coalesce(
            case when k like 'p|%' then (
                select b.spent from budget_usage b
                where b.scope = split_part(k, '|', 2) and b.scope_id = split_part(k, '|', 3)
                  and b.period_start = split_part(k, '|', 4)::timestamptz)
            else (
                select t.spend from spend_totals t
                where t.scope = split_part(k, '|', 2) and t.scope_id = split_part(k, '|', 3))
            end, 0) as v
        from jsonb_array_elements(ds) as d, sl_usage_value_keys(d) as k
    ) as x;
    spends := sl_settle_values(ds, ctx, seen);
    -- Now the shared rows, each once, in the global order: lifetime totals (settles only), then
    -- scope by scope its budget periods, its rate window and its in-flight count.
    with agg as (
        select s.scope, s.scope_id, sum((d->>'cost')::numeric) as spend, count(*) as requests,
               sum((d->>'input_tokens')::bigint) as input_tokens,
               sum((d->>'output_tokens')::bigint) as output_tokens,
               max((d->>'ended_at')::timestamptz) as last_at
        from jsonb_array_elements(ds) as d, sl_usage_scopes(d) as s
        group by 1, 2
    ), up as (
        insert into spend_totals as t (scope, scope_id, spend, requests, input_tokens, output_tokens, last_at)
        select * from agg order by scope, scope_id
        on conflict (scope, scope_id) do update set
            spend = t.spend + excluded.spend,
            requests = t.requests + excluded.requests,
            input_tokens = t.input_tokens + excluded.input_tokens,
            output_tokens = t.output_tokens + excluded.output_tokens,
            last_at = greatest(t.last_at, excluded.last_at)
        returning t.scope, t.scope_id, t.spend
    )
    select coalesce(jsonb_object_agg('l|' || up.scope || '|' || up.scope_id, up.spend - agg.spend), '{}')
    into actual
    from up join agg using (scope, scope_id);
    for w in
        with req as (
            select d, released->(d->>'call_id') as h from jsonb_array_elements(ds) as d
        ), budget as (
            select r->>0 as scope, r->>1 as scope_id, (r->>2)::timestamptz as period,
                   (d->>'cost')::numeric as spent, 0::numeric as held
            from req, jsonb_array_elements(coalesce(d->'budget_periods', '[]')) as r
            union all
            select r->>0, r->>1, (r->>2)::timestamptz, 0, (h->>'amount')::numeric
            from req, jsonb_array_elements(coalesce(h->'budget_rows', '[]')) as r
        ), shared as (
            select scope, scope_id, 0 as kind, period, sum(spent) as spent, sum(held) as held,
                   0::bigint as tokens, 0::bigint as slots
            from budget group by scope, scope_id, period
            union all
            select r->>0, r->>1, 1, null, 0, 0, sum((d->>'total_tokens')::bigint), 0
            from req, jsonb_array_elements(coalesce(h->'tpm_rows', '[]')) as r group by 1, 2
            union all
            select r->>0, r->>1, 2, null, 0, 0, 0, count(*)
            from req, jsonb_array_elements(coalesce(h->'parallel_rows', '[]')) as r group by 1, 2
        )
        select * from shared order by sl_scope_rank(scope), scope_id, kind, period
    loop
        if w.kind = 0 then
            insert into budget_usage as b (scope, scope_id, period_start, spent)
            values (w.scope, w.scope_id, w.period, w.spent)
            on conflict (scope, scope_id, period_start) do update
            set spent = b.spent + excluded.spent, held = greatest(b.held - w.held, 0)
            returning b.spent into new_value;
            actual := actual || jsonb_build_object(
                'p|' || w.scope || '|' || w.scope_id || '|' || w.period::text, new_value - w.spent);
        elsif w.kind = 1 then
            insert into rate_usage as u (scope, scope_id, window_start, tokens)
            values (w.scope, w.scope_id, date_trunc('minute', now()), w.tokens)
            on conflict (scope, scope_id, window_start) do update set tokens = u.tokens + excluded.tokens;
        else
            update in_flight set count = greatest(count - w.slots, 0)
            where scope = w.scope and scope_id = w.scope_id;
        end if;
    end loop;
    -- Another process settled one of these scopes between our read and our lock: write the
    -- webhook rows again from the values the locked rows held.
    if exists (select 1 from jsonb_each(seen) as s(k, v)
               where s.k not like 'l|model|%'  -- no webhook or header reads a model's total
                 and (actual->>s.k)::numeric is distinct from (s.v #>> '{}')::numeric) then
        if webhooks then
            delete from outbox where sink = 'webhook' and call_id = any(call_ids);
        end if;
        spends := sl_settle_values(ds, ctx, seen || actual);
    end if;
    if coalesce((ctx->>'notify')::boolean, true)
       and (webhooks or jsonb_path_exists(outboxes, '$[*][*]')) then
        perform pg_notify('sl_outbox', '');
    end if;
    for i in 1 .. cardinality(spends) loop
        idx := i - 1;
        key_spend := spends[i];
        return next;
    end loop;
end $$;

alter function sl_record_usages(jsonb, jsonb, jsonb, jsonb) set plan_cache_mode = force_generic_plan;
"""

DOWNGRADE = r"""
create or replace function sl_record_usages(ds jsonb, metas jsonb, ctx jsonb, outboxes jsonb)
returns table (idx integer, key_spend numeric)
language plpgsql as $$
declare
    c record;
    w record;
    released jsonb;
    seen jsonb;
    actual jsonb := '{}';
    spends numeric[];
    new_value numeric;
    call_ids text[] := array(select d->>'call_id' from jsonb_array_elements(ds) as d);
    webhooks boolean := coalesce((ctx->>'webhooks')::boolean, false);
begin
    for c in
        select d->>'customer_id' as customer, min(i) as first
        from jsonb_array_elements(ds) with ordinality as e(d, i)
        where d->>'customer_id' is not null
        group by 1 order by 1
    loop
        perform sl_customer_first_seen(c.customer, ctx->>'default_budget_id', metas->(c.first::integer - 1));
    end loop;
    -- The batch's holds: no other writer wants them (the sweeper skips locked holds).
    with gone as (
        delete from holds where call_id = any(call_ids)
        returning call_id, amount, budget_rows, parallel_rows, tpm_rows
    )
    select coalesce(jsonb_object_agg(call_id, to_jsonb(gone)), '{}') into released from gone;
    insert into events (stream, version, type, data, metadata)
    select 'request:' || (e.d->>'call_id'), 1, 'UsageRecorded', e.d, metas->(e.i::integer - 1)
    from jsonb_array_elements(ds) with ordinality as e(d, i)
    order by e.i;
    insert into outbox (sink, dedupe_key, payload, state, call_id)
    select o->>'sink', o->>'dedupe_key', o->'payload', o->>'state', e.d->>'call_id'
    from jsonb_array_elements(ds) with ordinality as e(d, i),
         jsonb_array_elements(coalesce(outboxes->(e.i::integer - 1), '[]')) as o
    order by e.i;
    -- The values before the batch, read without locks; the webhook rows from them.
    select coalesce(jsonb_object_agg(k, v), '{}') into seen from (
        select distinct on (k) k, coalesce(
            case when k like 'p|%' then (
                select b.spent from budget_usage b
                where b.scope = split_part(k, '|', 2) and b.scope_id = split_part(k, '|', 3)
                  and b.period_start = split_part(k, '|', 4)::timestamptz)
            else (
                select t.spend from spend_totals t
                where t.scope = split_part(k, '|', 2) and t.scope_id = split_part(k, '|', 3))
            end, 0) as v
        from jsonb_array_elements(ds) as d, sl_usage_value_keys(d) as k
    ) as x;
    spends := sl_settle_values(ds, ctx, seen);
    -- Now the shared rows, each once, in the global order: lifetime totals (settles only), then
    -- scope by scope its budget periods, its rate window and its in-flight count.
    with agg as (
        select s.scope, s.scope_id, sum((d->>'cost')::numeric) as spend, count(*) as requests,
               sum((d->>'input_tokens')::bigint) as input_tokens,
               sum((d->>'output_tokens')::bigint) as output_tokens,
               max((d->>'ended_at')::timestamptz) as last_at
        from jsonb_array_elements(ds) as d, sl_usage_scopes(d) as s
        group by 1, 2
    ), up as (
        insert into spend_totals as t (scope, scope_id, spend, requests, input_tokens, output_tokens, last_at)
        select * from agg order by scope, scope_id
        on conflict (scope, scope_id) do update set
            spend = t.spend + excluded.spend,
            requests = t.requests + excluded.requests,
            input_tokens = t.input_tokens + excluded.input_tokens,
            output_tokens = t.output_tokens + excluded.output_tokens,
            last_at = greatest(t.last_at, excluded.last_at)
        returning t.scope, t.scope_id, t.spend
    )
    select coalesce(jsonb_object_agg('l|' || up.scope || '|' || up.scope_id, up.spend - agg.spend), '{}')
    into actual
    from up join agg using (scope, scope_id);
    for w in
        with req as (
            select d, released->(d->>'call_id') as h from jsonb_array_elements(ds) as d
        ), budget as (
            select r->>0 as scope, r->>1 as scope_id, (r->>2)::timestamptz as period,
                   (d->>'cost')::numeric as spent, 0::numeric as held
            from req, jsonb_array_elements(coalesce(d->'budget_periods', '[]')) as r
            union all
            select r->>0, r->>1, (r->>2)::timestamptz, 0, (h->>'amount')::numeric
            from req, jsonb_array_elements(coalesce(h->'budget_rows', '[]')) as r
        ), shared as (
            select scope, scope_id, 0 as kind, period, sum(spent) as spent, sum(held) as held,
                   0::bigint as tokens, 0::bigint as slots
            from budget group by scope, scope_id, period
            union all
            select r->>0, r->>1, 1, null, 0, 0, sum((d->>'total_tokens')::bigint), 0
            from req, jsonb_array_elements(coalesce(h->'tpm_rows', '[]')) as r group by 1, 2
            union all
            select r->>0, r->>1, 2, null, 0, 0, 0, count(*)
            from req, jsonb_array_elements(coalesce(h->'parallel_rows', '[]')) as r group by 1, 2
        )
        select * from shared order by sl_scope_rank(scope), scope_id, kind, period
    loop
        if w.kind = 0 then
            insert into budget_usage as b (scope, scope_id, period_start, spent)
            values (w.scope, w.scope_id, w.period, w.spent)
            on conflict (scope, scope_id, period_start) do update
            set spent = b.spent + excluded.spent, held = greatest(b.held - w.held, 0)
            returning b.spent into new_value;
            actual := actual || jsonb_build_object(
                'p|' || w.scope || '|' || w.scope_id || '|' || w.period::text, new_value - w.spent);
        elsif w.kind = 1 then
            insert into rate_usage as u (scope, scope_id, window_start, tokens)
            values (w.scope, w.scope_id, date_trunc('minute', now()), w.tokens)
            on conflict (scope, scope_id, window_start) do update set tokens = u.tokens + excluded.tokens;
        else
            update in_flight set count = greatest(count - w.slots, 0)
            where scope = w.scope and scope_id = w.scope_id;
        end if;
    end loop;
    -- Another process settled one of these scopes between our read and our lock: write the
    -- webhook rows again from the values the locked rows held.
    if exists (select 1 from jsonb_each(seen) as s(k, v)
               where s.k not like 'l|model|%'  -- no webhook or header reads a model's total
                 and (actual->>s.k)::numeric is distinct from (s.v #>> '{}')::numeric) then
        if webhooks then
            delete from outbox where sink = 'webhook' and call_id = any(call_ids);
        end if;
        spends := sl_settle_values(ds, ctx, seen || actual);
    end if;
    if webhooks or jsonb_path_exists(outboxes, '$[*][*]') then
        perform pg_notify('sl_outbox', '');
    end if;
    for i in 1 .. cardinality(spends) loop
        idx := i - 1;
        key_spend := spends[i];
        return next;
    end loop;
end $$;

alter function sl_record_usages(jsonb, jsonb, jsonb, jsonb) set plan_cache_mode = force_generic_plan;
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
