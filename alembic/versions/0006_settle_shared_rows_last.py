"""Settles that keep admissions waiting as briefly as possible.

A settle batch used to lock the budget rows it changes first and keep them through all its work
(events, projections, outbox and webhook rows) until its commit, so the admissions of a hot budget
waited for whole batches. Now `sl_record_usages` does that work first, from values it reads without
locks (the spend of each budget period and lifetime total the webhooks need, counted forward request
by request), and changes the rows admissions share last, once per row for the whole batch, in the
one global order. Only settles change spend, so what it read is what the locked rows hold unless
another process settled the same scope in between: the update tells (old value = new - delta), and
then the batch's webhook rows are written again from the locked values. The result is the same as
settling the requests one by one, in order.

Revision ID: 0006
Revises: 0005
"""

from alembic import op
from spendledger.ledger.db import execute_script

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# Every statement this revision runs, in full: it stands alone, reading no other revision.
UPGRADE = r"""
-- Webhook rows of one settled request, as sl_enqueue_webhooks writes them, from `vals`: the spend
-- of its budget periods ('p|scope|id|period') and its scopes' lifetime spend ('l|scope|id') once
-- this request is counted.
create function sl_enqueue_webhooks_after(d jsonb, ctx jsonb, vals jsonb) returns void language plpgsql as $$
declare
    s record;
    cost numeric := (d->>'cost')::numeric;
    after numeric;
    before numeric;
    period timestamptz;
    line record;
    total numeric;
    customer_budget numeric;
    period_key text;
begin
    for s in select * from sl_request_scopes(ctx || jsonb_build_object(
            'key_hash', d->>'key_hash', 'user_id', d->>'user_id', 'team_id', d->>'team_id',
            'customer_id', d->>'customer_id')) loop
        select (r->>2)::timestamptz into period
        from jsonb_array_elements(coalesce(d->'budget_periods', '[]')) as r
        where r->>0 = s.scope and r->>1 = s.scope_id;
        period_key := 'p|' || s.scope || '|' || s.scope_id || '|' || period::text;
        if s.scope = 'customer' then
            customer_budget := s.max_budget;
            if period is not null then
                total := (vals->>period_key)::numeric;
            else
                total := (vals->>('l|customer|' || s.scope_id))::numeric;
            end if;
        end if;
        if cost <= 0 or (period is null and (s.soft_budget is null or s.max_budget is not null
                                             or s.budget_duration is not null)) then
            continue;
        end if;
        if period is null then
            -- A soft budget alone has no budget period (admission tracks none): its line is on
            -- the lifetime spend, as /customer/info shows it.
            period := 'epoch';
            after := (vals->>('l|' || s.scope || '|' || s.scope_id))::numeric;
        else
            after := (vals->>period_key)::numeric;
        end if;
        before := after - cost;
        for line in
            select * from (values
                ('budget_crossed', s.max_budget, 'max'),
                ('threshold_crossed', s.max_budget * 0.85, '85'),
                ('threshold_crossed', s.max_budget * 0.95, '95'),
                ('soft_budget_crossed', s.soft_budget, 'soft')) as l(event, amount, tag)
            where l.amount is not null and before < l.amount and after >= l.amount
        loop
            perform sl_enqueue_webhook(line.event,
                line.event || ':' || s.scope || ':' || s.scope_id || ':' || extract(epoch from period)::bigint || ':' || line.tag,
                jsonb_build_object(
                    'spend', trim_scale(after), 'max_budget', s.max_budget, 'soft_budget', s.soft_budget,
                    'event_group', s.scope,
                    'event_message', initcap(s.scope) || ' ' || replace(line.event, '_', ' ') || '. '
                        || initcap(s.scope) || '=' || s.scope_id || ', spend=' || trim_scale(after)
                        || ', max_budget=' || coalesce(s.max_budget::text, 'null')
                        || case when line.tag in ('85', '95') then ', threshold=' || line.tag || '%' else '' end,
                    'budget_reset_at', sl_period_end(s.anchor, s.budget_duration, period)),
                d);
        end loop;
    end loop;
    if d->>'customer_id' is not null then
        -- A plain insert: a call is settled once (its UsageRecorded is unique), so its
        -- spend_tracked cannot exist yet. The payload is sl_enqueue_webhook's, built in one go.
        insert into outbox (sink, dedupe_key, payload, call_id)
        values ('webhook', 'spend_tracked:' || (d->>'call_id'), jsonb_build_object(
                'spend', cost, 'max_budget', customer_budget, 'event_group', 'customer',
                'total_spend', trim_scale(coalesce(total, cost)),
                'event_message', 'Customer spend tracked. Customer=' || (d->>'customer_id')
                                 || ', spend=' || trim_scale(cost),
                'token', d->>'key_hash', 'customer_id', d->>'customer_id', 'user_id', d->>'user_id',
                'team_id', d->>'team_id', 'user_email', null, 'key_alias', d->>'key_alias',
                'projected_exceeded_date', null, 'projected_spend', null, 'event', 'spend_tracked',
                'event_id', 'spend_tracked:' || (d->>'call_id'), 'created_at', d->>'ended_at'),
            d->>'call_id');
    end if;
end $$;

-- The keys of `vals` one request adds its cost to.
create function sl_usage_value_keys(d jsonb) returns setof text language sql immutable as $$
    select 'p|' || (r->>0) || '|' || (r->>1) || '|' || ((r->>2)::timestamptz)::text
    from jsonb_array_elements(coalesce(d->'budget_periods', '[]')) as r
    union all
    select 'l|' || s.scope || '|' || s.scope_id from sl_usage_scopes(d) as s
$$;

-- Count each request's cost into `vals` in order (a running sum per key: one query for the batch)
-- and write its webhook rows; the key spends.
create function sl_settle_values(ds jsonb, ctx jsonb, vals jsonb) returns numeric[]
language plpgsql as $$
declare
    after jsonb[];
    spends numeric[];
begin
    select array_agg(v order by i), array_agg(trim_scale((v->>('l|key|' || key_hash))::numeric) order by i)
    into after, spends
    from (
        select x.i, x.key_hash, jsonb_object_agg(x.k, coalesce((vals->>x.k)::numeric, 0) + x.running) as v
        from (
            select e.i, e.d->>'key_hash' as key_hash, k,
                   sum((e.d->>'cost')::numeric) over (partition by k order by e.i) as running
            from jsonb_array_elements(ds) with ordinality as e(d, i), sl_usage_value_keys(e.d) as k
        ) as x
        group by x.i, x.key_hash
    ) as y;
    if coalesce((ctx->>'webhooks')::boolean, false) then
        for i in 1 .. jsonb_array_length(ds) loop
            perform sl_enqueue_webhooks_after(ds->(i - 1), ctx, after[i]);
        end loop;
    end if;
    return spends;
end $$;

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

-- Generic plans for the hot-path functions: their statements take jsonb parameters whose custom
-- plans are no better, and re-planning them on every call (a connection's first five, and then
-- whenever PostgreSQL judges a custom plan worth it) costs more than running them.
alter function sl_record_usages(jsonb, jsonb, jsonb, jsonb) set plan_cache_mode = force_generic_plan;

alter function sl_admit(jsonb) set plan_cache_mode = force_generic_plan;

alter function sl_admit_many(jsonb) set plan_cache_mode = force_generic_plan;

-- Superseded by sl_record_usages and sl_enqueue_webhooks_after above.
drop function sl_settle(jsonb, jsonb, jsonb, jsonb);

drop function sl_enqueue_webhooks(jsonb, jsonb);
"""

DOWNGRADE = r"""
alter function sl_admit_many(jsonb) reset plan_cache_mode;

alter function sl_admit(jsonb) reset plan_cache_mode;

drop function sl_record_usages(jsonb, jsonb, jsonb, jsonb);

drop function sl_settle_values(jsonb, jsonb, jsonb);

drop function sl_usage_value_keys(jsonb);

drop function sl_enqueue_webhooks_after(jsonb, jsonb, jsonb);

-- spend_tracked for a customer's request, and budget_crossed / threshold_crossed (85 %, 95 %) /
-- soft_budget_crossed for every scope whose period spend crossed a line with this request.
create function sl_enqueue_webhooks(d jsonb, ctx jsonb) returns void language plpgsql as $$
declare
    s record;
    cost numeric := (d->>'cost')::numeric;
    after numeric;
    before numeric;
    period timestamptz;
    line record;
    total numeric;
    customer_budget numeric;
begin
    for s in select * from sl_request_scopes(ctx || jsonb_build_object(
            'key_hash', d->>'key_hash', 'user_id', d->>'user_id', 'team_id', d->>'team_id',
            'customer_id', d->>'customer_id')) loop
        select (r->>2)::timestamptz into period
        from jsonb_array_elements(coalesce(d->'budget_periods', '[]')) as r
        where r->>0 = s.scope and r->>1 = s.scope_id;
        if s.scope = 'customer' then
            customer_budget := s.max_budget;
            if period is not null then
                select spent into total from budget_usage
                where scope = 'customer' and scope_id = s.scope_id and period_start = period;
            else
                select spend into total from spend_totals where scope = 'customer' and scope_id = s.scope_id;
            end if;
        end if;
        if cost <= 0 or (period is null and (s.soft_budget is null or s.max_budget is not null
                                             or s.budget_duration is not null)) then
            continue;
        end if;
        if period is null then
            -- A soft budget alone has no budget period (admission tracks none): its line is on
            -- the lifetime spend, as /customer/info shows it.
            period := 'epoch';
            select spend into after from spend_totals where scope = s.scope and scope_id = s.scope_id;
        else
            select spent into after from budget_usage
            where scope = s.scope and scope_id = s.scope_id and period_start = period;
        end if;
        before := after - cost;
        for line in
            select * from (values
                ('budget_crossed', s.max_budget, 'max'),
                ('threshold_crossed', s.max_budget * 0.85, '85'),
                ('threshold_crossed', s.max_budget * 0.95, '95'),
                ('soft_budget_crossed', s.soft_budget, 'soft')) as l(event, amount, tag)
            where l.amount is not null and before < l.amount and after >= l.amount
        loop
            perform sl_enqueue_webhook(line.event,
                line.event || ':' || s.scope || ':' || s.scope_id || ':' || extract(epoch from period)::bigint || ':' || line.tag,
                jsonb_build_object(
                    'spend', trim_scale(after), 'max_budget', s.max_budget, 'soft_budget', s.soft_budget,
                    'event_group', s.scope,
                    'event_message', initcap(s.scope) || ' ' || replace(line.event, '_', ' ') || '. '
                        || initcap(s.scope) || '=' || s.scope_id || ', spend=' || trim_scale(after)
                        || ', max_budget=' || coalesce(s.max_budget::text, 'null')
                        || case when line.tag in ('85', '95') then ', threshold=' || line.tag || '%' else '' end,
                    'budget_reset_at', sl_period_end(s.anchor, s.budget_duration, period)),
                d);
        end loop;
    end loop;
    if d->>'customer_id' is not null then
        perform sl_enqueue_webhook('spend_tracked', 'spend_tracked:' || (d->>'call_id'),
            jsonb_build_object(
                'spend', cost, 'max_budget', customer_budget, 'event_group', 'customer',
                'total_spend', trim_scale(coalesce(total, cost)),
                'event_message', 'Customer spend tracked. Customer=' || (d->>'customer_id')
                                 || ', spend=' || trim_scale(cost)),
            d);
    end if;
end $$;

-- Settle one request whose rows sl_lock_for_settle has locked: release its hold, append
-- UsageRecorded, project it, count its tokens, and write its outbox rows. Returns the key's spend.
create function sl_settle(d jsonb, meta jsonb, ctx jsonb, outbox_rows jsonb) returns numeric
language plpgsql as $$
declare
    r jsonb;
    key_spend numeric;
begin
    for r in select jsonb_array_elements(sl_release_hold(d->>'call_id')) loop
        insert into rate_usage as u (scope, scope_id, window_start, tokens)
        values (r->>0, r->>1, date_trunc('minute', now()), (d->>'total_tokens')::bigint)
        on conflict (scope, scope_id, window_start) do update set tokens = u.tokens + excluded.tokens;
    end loop;
    insert into events (stream, version, type, data, metadata)
    values ('request:' || (d->>'call_id'), 1, 'UsageRecorded', d, meta);
    perform sl_apply_usage(d);
    insert into outbox (sink, dedupe_key, payload, state, call_id)
    select o->>'sink', o->>'dedupe_key', o->'payload', o->>'state', d->>'call_id'
    from jsonb_array_elements(coalesce(outbox_rows, '[]')) as o;
    if coalesce((ctx->>'webhooks')::boolean, false) then
        perform sl_enqueue_webhooks(d, ctx);
    end if;
    if jsonb_array_length(coalesce(outbox_rows, '[]')) > 0 or coalesce((ctx->>'webhooks')::boolean, false) then
        perform pg_notify('sl_outbox', '');
    end if;
    select trim_scale(t.spend) into key_spend from spend_totals t
    where t.scope = 'key' and t.scope_id = d->>'key_hash';
    return key_spend;
end $$;

-- Record a batch of requests in one transaction and one round trip (group commit: many settles,
-- one WAL flush). Customers first seen are created first, in id order; then every row the batch
-- changes is locked in the global order; then each request is settled. Returns each key's spend.
create function sl_record_usages(ds jsonb, metas jsonb, ctx jsonb, outboxes jsonb)
returns table (idx integer, key_spend numeric)
language plpgsql as $$
declare
    c record;
begin
    for c in
        select d->>'customer_id' as customer, min(i) as first
        from jsonb_array_elements(ds) with ordinality as e(d, i)
        where d->>'customer_id' is not null
        group by 1 order by 1
    loop
        perform sl_customer_first_seen(c.customer, ctx->>'default_budget_id', metas->(c.first::integer - 1));
    end loop;
    perform sl_lock_for_settle(
        array(select d->>'call_id' from jsonb_array_elements(ds) as d),
        (select coalesce(jsonb_agg(r), '[]') from jsonb_array_elements(ds) as d,
                jsonb_array_elements(coalesce(d->'budget_periods', '[]')) as r));
    for i in 0 .. jsonb_array_length(ds) - 1 loop
        idx := i;
        key_spend := sl_settle(ds->i, metas->i, ctx, outboxes->i);
        return next;
    end loop;
end $$;
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
