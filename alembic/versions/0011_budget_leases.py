"""Budget leased to a serving process, so that it admits requests without a round trip.

`sl_lease` holds an amount on every budget of one set of scopes at once — as one admission holds
one request's worst case — and the process then admits that set's requests on its own until it
has used the amount (ledger/leases.py). The settle draws each leased request's cost from its lease
row (`sl_draw_leases`; the lease id travels in the event's metadata): the budget's `held` shrinks
by the cost as `spent` grows by it, exactly as a request's own hold would. What the process has not
used goes back when it retires the lease (`sl_return_lease`, then `sl_release_hold`).

A lease is granted only where the process can decide exactly as `sl_admit` would: no scope blocked,
the model allowed, no rpm / tpm / parallel limit (those count every request in PostgreSQL), and
room on every budget for at least `min_amount` (near a limit, requests are admitted one by one, so
a budget is never refused early). Changes to keys, users, teams, customers and budgets notify
`sl_scope_changed` (row triggers), on which processes retire their leases.

Revision ID: 0011
Revises: 0010
"""

from alembic import op
from spendledger.ledger.db import execute_script

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

# Every statement this revision runs, in full: it stands alone, reading no other revision.
UPGRADE = r"""
-- Lease `amount` (at most `share` of the least room) on every budget of a request's scopes, for
-- the process to admit their requests on its own. {"leased": false} where it could not decide as
-- sl_admit does (see the revision's notes); never a refusal: refusing is sl_admit's.
create function sl_lease(p jsonb) returns jsonb language plpgsql as $$
declare
    s record;
    r jsonb;
    at timestamptz := now();
    period timestamptz;
    room numeric;
    least_room numeric;
    amount numeric := (p->>'amount')::numeric;
    valid_until timestamptz := (p->>'valid_until')::timestamptz;
    period_rows jsonb := '[]';
    budget_rows jsonb := '[]';
begin
    perform sl_customer_first_seen(p->>'customer_id', p->>'default_budget_id', p->'meta');
    for s in select * from sl_request_scopes(p) loop
        if s.blocked or s.rpm_limit is not null or s.tpm_limit is not null or s.max_parallel_requests is not null
           or (s.models is not null and cardinality(s.models) > 0
               and not (p->>'model' = any(s.models) or 'all-proxy-models' = any(s.models))) then
            return jsonb_build_object('leased', false);
        end if;
        if s.max_budget is not null or s.budget_duration is not null then
            period := sl_period_start(s.anchor, s.budget_duration, at);
            insert into budget_usage (scope, scope_id, period_start) values (s.scope, s.scope_id, period)
            on conflict do nothing;
            period_rows := period_rows || jsonb_build_array(jsonb_build_array(s.scope, s.scope_id, period));
            if s.budget_duration is not null then
                -- a request admitted in this period settles into it: the lease ends with it
                valid_until := least(valid_until, sl_period_end(s.anchor, s.budget_duration, at));
            end if;
            if s.max_budget is not null then
                select s.max_budget - spent - held into room from budget_usage
                where scope = s.scope and scope_id = s.scope_id and period_start = period for update;
                least_room := least(least_room, room);
                budget_rows := budget_rows || jsonb_build_array(jsonb_build_array(s.scope, s.scope_id, period));
            end if;
        end if;
    end loop;
    if budget_rows = '[]' then
        amount := null;  -- no budget governs these scopes: nothing to hold
    else
        amount := least(amount, least_room * (p->>'share')::numeric);
        if amount < (p->>'min_amount')::numeric then
            return jsonb_build_object('leased', false);
        end if;
        for r in select jsonb_array_elements(budget_rows) loop
            update budget_usage set held = held + amount
            where scope = r->>0 and scope_id = r->>1 and period_start = (r->>2)::timestamptz;
        end loop;
        insert into holds (call_id, amount, budget_rows, parallel_rows, tpm_rows, expires_at)
        values (p->>'lease_id', amount, budget_rows, '[]', '[]', (p->>'expires_at')::timestamptz);
    end if;
    -- As an admission's: a lease is transient state, not a fact (losing one loses nothing billed).
    perform set_config('synchronous_commit', 'off', true);
    return jsonb_build_object('leased', true, 'amount', amount, 'budget_periods', period_rows,
                              'valid_until', valid_until);
end $$;

-- What a batch's leased requests draw from their leases, as sl_record_usages's `released` map
-- (call id → the amount to take off `held` and the budget rows it is held on).
create function sl_draw_leases(ds jsonb, metas jsonb) returns jsonb language sql as $$
    with drawn as (
        select e.d->>'call_id' as call_id, metas->(e.i::integer - 1)->>'lease' as lease,
               (e.d->>'cost')::numeric as cost
        from jsonb_array_elements(ds) with ordinality as e(d, i)
        where metas->(e.i::integer - 1) ? 'lease'
    ), leases as (
        update holds as h set amount = greatest(h.amount - x.total, 0)
        from (select lease, sum(cost) as total from drawn group by lease) as x
        where h.call_id = x.lease
        returning h.call_id, h.budget_rows
    )
    select coalesce(jsonb_object_agg(drawn.call_id, jsonb_build_object(
               'amount', drawn.cost, 'budget_rows', leases.budget_rows)), '{}')
    from drawn join leases on leases.call_id = drawn.lease
$$;

-- Give back `amount` of a lease that the process will not use (it retires the lease).
create function sl_return_lease(lease text, amount numeric) returns void language plpgsql as $$
declare
    rows jsonb;
    r jsonb;
begin
    update holds set amount = greatest(holds.amount - sl_return_lease.amount, 0)
    where call_id = lease returning budget_rows into rows;
    for r in select jsonb_array_elements(coalesce(rows, '[]')) loop
        update budget_usage set held = greatest(held - amount, 0)
        where scope = r->>0 and scope_id = r->>1 and period_start = (r->>2)::timestamptz;
    end loop;
end $$;

create function sl_scope_changed() returns trigger language plpgsql as $$
begin
    perform pg_notify('sl_scope_changed', tg_table_name);
    return null;
end $$;

create trigger keys_changed after insert or update or delete on keys for each row execute function sl_scope_changed();

create trigger users_changed after insert or update or delete on users for each row execute function sl_scope_changed();

create trigger teams_changed after insert or update or delete on teams for each row execute function sl_scope_changed();

create trigger customers_changed after insert or update or delete on customers for each row execute function sl_scope_changed();

create trigger budgets_changed after insert or update or delete on budgets for each row execute function sl_scope_changed();

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
    -- Requests admitted under a lease (ledger/leases.py) draw their cost from it.
    released := released || sl_draw_leases(ds, metas);
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

-- Record one request: what sl_record_usages does for a batch of one, in the same order (webhook
-- rows from values read without locks, then the shared rows in the global order, the webhook rows
-- written again if another process settled in between), with plans made for one request.
-- Returns the key's new lifetime spend.
create or replace function sl_record_usage(d jsonb, meta jsonb, ctx jsonb, outbox_rows jsonb) returns numeric
language plpgsql as $$
declare
    call text := d->>'call_id';
    cost numeric := (d->>'cost')::numeric;
    webhooks boolean := coalesce((ctx->>'webhooks')::boolean, false);
    h holds;
    w record;
    seen jsonb;
    after jsonb;
    new_value numeric;
begin
    perform sl_customer_first_seen(d->>'customer_id', ctx->>'default_budget_id', meta);
    delete from holds where call_id = call returning * into h;
    if not found and meta ? 'lease' then  -- admitted under a lease: draw the cost from it
        update holds set amount = greatest(amount - cost, 0) where call_id = meta->>'lease'
        returning call, cost, budget_rows, '[]'::jsonb, '[]'::jsonb, expires_at, created_at into h;
    end if;
    insert into events (stream, version, type, data, metadata)
    values ('request:' || call, 1, 'UsageRecorded', d, meta);
    insert into outbox (sink, dedupe_key, payload, state, call_id)
    select o->>'sink', o->>'dedupe_key', o->'payload', o->>'state', call
    from jsonb_array_elements(outbox_rows) as o;
    -- The values once this request is counted, read without locks; the webhook rows from them.
    select coalesce(jsonb_object_agg(k, coalesce(
            case when k like 'p|%' then (
                select b.spent from budget_usage b
                where b.scope = split_part(k, '|', 2) and b.scope_id = split_part(k, '|', 3)
                  and b.period_start = split_part(k, '|', 4)::timestamptz)
            else (
                select t.spend from spend_totals t
                where t.scope = split_part(k, '|', 2) and t.scope_id = split_part(k, '|', 3))
            end, 0) + cost), '{}')
    into seen from sl_usage_value_keys(d) as k;
    if webhooks then
        perform sl_usage_webhooks(d, ctx, seen);
    end if;
    -- The shared rows, in the global order (as sl_record_usages): lifetime totals, then scope by
    -- scope its budget periods, its rate window and its in-flight count.
    with up as (
        insert into spend_totals as t (scope, scope_id, spend, requests, input_tokens, output_tokens, last_at)
        select s.scope, s.scope_id, cost, 1, (d->>'input_tokens')::bigint, (d->>'output_tokens')::bigint,
               (d->>'ended_at')::timestamptz
        from sl_usage_scopes(d) as s
        order by s.scope, s.scope_id
        on conflict (scope, scope_id) do update set
            spend = t.spend + excluded.spend,
            requests = t.requests + excluded.requests,
            input_tokens = t.input_tokens + excluded.input_tokens,
            output_tokens = t.output_tokens + excluded.output_tokens,
            last_at = greatest(t.last_at, excluded.last_at)
        returning t.scope, t.scope_id, t.spend
    )
    select coalesce(jsonb_object_agg('l|' || up.scope || '|' || up.scope_id, up.spend), '{}') into after from up;
    for w in
        with budget as (
            select r->>0 as scope, r->>1 as scope_id, (r->>2)::timestamptz as period,
                   cost as spent, 0::numeric as held
            from jsonb_array_elements(coalesce(d->'budget_periods', '[]')) as r
            union all
            select r->>0, r->>1, (r->>2)::timestamptz, 0, h.amount
            from jsonb_array_elements(coalesce(h.budget_rows, '[]')) as r
        ), shared as (
            select scope, scope_id, 0 as kind, period, sum(spent) as spent, sum(held) as held,
                   0::bigint as tokens
            from budget group by scope, scope_id, period
            union all
            select r->>0, r->>1, 1, null, 0, 0, (d->>'total_tokens')::bigint
            from jsonb_array_elements(coalesce(h.tpm_rows, '[]')) as r
            union all
            select r->>0, r->>1, 2, null, 0, 0, 0
            from jsonb_array_elements(coalesce(h.parallel_rows, '[]')) as r
        )
        select * from shared order by sl_scope_rank(scope), scope_id, kind, period
    loop
        if w.kind = 0 then
            insert into budget_usage as b (scope, scope_id, period_start, spent)
            values (w.scope, w.scope_id, w.period, w.spent)
            on conflict (scope, scope_id, period_start) do update
            set spent = b.spent + excluded.spent, held = greatest(b.held - w.held, 0)
            returning b.spent into new_value;
            after := after || jsonb_build_object('p|' || w.scope || '|' || w.scope_id || '|' || w.period::text, new_value);
        elsif w.kind = 1 then
            insert into rate_usage as u (scope, scope_id, window_start, tokens)
            values (w.scope, w.scope_id, date_trunc('minute', now()), w.tokens)
            on conflict (scope, scope_id, window_start) do update set tokens = u.tokens + excluded.tokens;
        else
            update in_flight set count = greatest(count - 1, 0) where scope = w.scope and scope_id = w.scope_id;
        end if;
    end loop;
    -- Another process settled one of these scopes between our read and our lock: write the
    -- webhook rows again from the values the locked rows hold.
    if webhooks and exists (select 1 from jsonb_each(seen) as s(k, v)
                            where s.k not like 'l|model|%'  -- no webhook or header reads a model's total
                              and (after->>s.k)::numeric is distinct from (s.v #>> '{}')::numeric) then
        delete from outbox where sink = 'webhook' and call_id = call;
        perform sl_usage_webhooks(d, ctx, after);
    end if;
    if coalesce((ctx->>'notify')::boolean, true) and (webhooks or jsonb_array_length(outbox_rows) > 0) then
        perform pg_notify('sl_outbox', '');
    end if;
    return trim_scale((after->>('l|key|' || (d->>'key_hash')))::numeric);
end $$;

alter function sl_record_usages(jsonb, jsonb, jsonb, jsonb) set plan_cache_mode = force_generic_plan;

alter function sl_record_usage(jsonb, jsonb, jsonb, jsonb) set plan_cache_mode = force_generic_plan;
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

-- Record one request: what sl_record_usages does for a batch of one, in the same order (webhook
-- rows from values read without locks, then the shared rows in the global order, the webhook rows
-- written again if another process settled in between), with plans made for one request.
-- Returns the key's new lifetime spend.
create or replace function sl_record_usage(d jsonb, meta jsonb, ctx jsonb, outbox_rows jsonb) returns numeric
language plpgsql as $$
declare
    call text := d->>'call_id';
    cost numeric := (d->>'cost')::numeric;
    webhooks boolean := coalesce((ctx->>'webhooks')::boolean, false);
    h holds;
    w record;
    seen jsonb;
    after jsonb;
    new_value numeric;
begin
    perform sl_customer_first_seen(d->>'customer_id', ctx->>'default_budget_id', meta);
    delete from holds where call_id = call returning * into h;
    insert into events (stream, version, type, data, metadata)
    values ('request:' || call, 1, 'UsageRecorded', d, meta);
    insert into outbox (sink, dedupe_key, payload, state, call_id)
    select o->>'sink', o->>'dedupe_key', o->'payload', o->>'state', call
    from jsonb_array_elements(outbox_rows) as o;
    -- The values once this request is counted, read without locks; the webhook rows from them.
    select coalesce(jsonb_object_agg(k, coalesce(
            case when k like 'p|%' then (
                select b.spent from budget_usage b
                where b.scope = split_part(k, '|', 2) and b.scope_id = split_part(k, '|', 3)
                  and b.period_start = split_part(k, '|', 4)::timestamptz)
            else (
                select t.spend from spend_totals t
                where t.scope = split_part(k, '|', 2) and t.scope_id = split_part(k, '|', 3))
            end, 0) + cost), '{}')
    into seen from sl_usage_value_keys(d) as k;
    if webhooks then
        perform sl_usage_webhooks(d, ctx, seen);
    end if;
    -- The shared rows, in the global order (as sl_record_usages): lifetime totals, then scope by
    -- scope its budget periods, its rate window and its in-flight count.
    with up as (
        insert into spend_totals as t (scope, scope_id, spend, requests, input_tokens, output_tokens, last_at)
        select s.scope, s.scope_id, cost, 1, (d->>'input_tokens')::bigint, (d->>'output_tokens')::bigint,
               (d->>'ended_at')::timestamptz
        from sl_usage_scopes(d) as s
        order by s.scope, s.scope_id
        on conflict (scope, scope_id) do update set
            spend = t.spend + excluded.spend,
            requests = t.requests + excluded.requests,
            input_tokens = t.input_tokens + excluded.input_tokens,
            output_tokens = t.output_tokens + excluded.output_tokens,
            last_at = greatest(t.last_at, excluded.last_at)
        returning t.scope, t.scope_id, t.spend
    )
    select coalesce(jsonb_object_agg('l|' || up.scope || '|' || up.scope_id, up.spend), '{}') into after from up;
    for w in
        with budget as (
            select r->>0 as scope, r->>1 as scope_id, (r->>2)::timestamptz as period,
                   cost as spent, 0::numeric as held
            from jsonb_array_elements(coalesce(d->'budget_periods', '[]')) as r
            union all
            select r->>0, r->>1, (r->>2)::timestamptz, 0, h.amount
            from jsonb_array_elements(coalesce(h.budget_rows, '[]')) as r
        ), shared as (
            select scope, scope_id, 0 as kind, period, sum(spent) as spent, sum(held) as held,
                   0::bigint as tokens
            from budget group by scope, scope_id, period
            union all
            select r->>0, r->>1, 1, null, 0, 0, (d->>'total_tokens')::bigint
            from jsonb_array_elements(coalesce(h.tpm_rows, '[]')) as r
            union all
            select r->>0, r->>1, 2, null, 0, 0, 0
            from jsonb_array_elements(coalesce(h.parallel_rows, '[]')) as r
        )
        select * from shared order by sl_scope_rank(scope), scope_id, kind, period
    loop
        if w.kind = 0 then
            insert into budget_usage as b (scope, scope_id, period_start, spent)
            values (w.scope, w.scope_id, w.period, w.spent)
            on conflict (scope, scope_id, period_start) do update
            set spent = b.spent + excluded.spent, held = greatest(b.held - w.held, 0)
            returning b.spent into new_value;
            after := after || jsonb_build_object('p|' || w.scope || '|' || w.scope_id || '|' || w.period::text, new_value);
        elsif w.kind = 1 then
            insert into rate_usage as u (scope, scope_id, window_start, tokens)
            values (w.scope, w.scope_id, date_trunc('minute', now()), w.tokens)
            on conflict (scope, scope_id, window_start) do update set tokens = u.tokens + excluded.tokens;
        else
            update in_flight set count = greatest(count - 1, 0) where scope = w.scope and scope_id = w.scope_id;
        end if;
    end loop;
    -- Another process settled one of these scopes between our read and our lock: write the
    -- webhook rows again from the values the locked rows hold.
    if webhooks and exists (select 1 from jsonb_each(seen) as s(k, v)
                            where s.k not like 'l|model|%'  -- no webhook or header reads a model's total
                              and (after->>s.k)::numeric is distinct from (s.v #>> '{}')::numeric) then
        delete from outbox where sink = 'webhook' and call_id = call;
        perform sl_usage_webhooks(d, ctx, after);
    end if;
    if coalesce((ctx->>'notify')::boolean, true) and (webhooks or jsonb_array_length(outbox_rows) > 0) then
        perform pg_notify('sl_outbox', '');
    end if;
    return trim_scale((after->>('l|key|' || (d->>'key_hash')))::numeric);
end $$;

alter function sl_record_usages(jsonb, jsonb, jsonb, jsonb) set plan_cache_mode = force_generic_plan;

alter function sl_record_usage(jsonb, jsonb, jsonb, jsonb) set plan_cache_mode = force_generic_plan;

drop trigger keys_changed on keys;

drop trigger users_changed on users;

drop trigger teams_changed on teams;

drop trigger customers_changed on customers;

drop trigger budgets_changed on budgets;

drop function sl_scope_changed();

drop function sl_return_lease(text, numeric);

drop function sl_draw_leases(jsonb, jsonb);

drop function sl_lease(jsonb);
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
