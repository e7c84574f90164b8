-- How a UsageRecorded event projects, as rows: one definition each, used by the live projection
-- (one event) and by rebuilds (every event at once, set-based: these SQL functions inline).
create or replace function sl_usage_scopes(d jsonb) returns table (scope text, scope_id text)
language sql immutable as $$
    select s.scope, s.scope_id
    from (values ('customer', d->>'customer_id'), ('key', d->>'key_hash'), ('model', d->>'model_group'),
                 ('team', d->>'team_id'), ('user', d->>'user_id')) as s(scope, scope_id)
    where s.scope_id is not null
$$;

create or replace function sl_usage_periods(d jsonb) returns table (scope text, scope_id text, period_start timestamptz)
language sql immutable as $$
    select r->>0, r->>1, (r->>2)::timestamptz
    from jsonb_array_elements(coalesce(d->'budget_periods', '[]')) as r
$$;

-- The keys of a running-spend map (`vals`) one request adds its cost to: 'p|scope|id|period' for
-- each budget period it was admitted under, 'l|scope|id' for each lifetime total.
create or replace function sl_usage_value_keys(d jsonb) returns setof text
language sql immutable as $$
    select 'p|' || (r->>0) || '|' || (r->>1) || '|' || ((r->>2)::timestamptz)::text
    from jsonb_array_elements(coalesce(d->'budget_periods', '[]')) as r
    union all
    select 'l|' || s.scope || '|' || s.scope_id from sl_usage_scopes(d) as s
$$;

-- A usage event as a row of spend_logs. The parts of the token totals billed apart and the cost of
-- each kind of token are 0 and {} in events older than them.
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

-- The usage projection: what a run of UsageRecorded events (`ds`, in log order: an array of jsonb,
-- which a replay builds far faster than one JSON array) adds to the tables they project to —
-- each scope's lifetime totals (spend_totals: sl_usage_scopes) and each budget period's spend
-- (budget_usage: sl_usage_periods) — and, given back, what their admissions held (`released`: call
-- id → the hold or lease share released for it: `amount` off its budget rows' `held`, its rate
-- windows' tokens, its in-flight slots). Each row is written once for the run, in the global order
-- (lifetime totals; then scope by scope its budget periods, its rate window, its in-flight count),
-- the order admissions lock them in, so that settles and admissions never wait on each other in a
-- circle. The settles (sl_record_usage for one request, sl_record_usages for a batch) and the rebuild
-- (projections/rebuild.py: every event, nothing released, its own tables first on the
-- search_path) all project through it. Returns each lifetime total once the run is counted (read
-- under its row's lock), by 'l|scope|id'.
create or replace function sl_project_usage(ds jsonb[], released jsonb) returns jsonb
language plpgsql as $$
declare
    w record;
    totals jsonb;
begin
    with ev as (
        select d, (d->>'cost')::numeric as cost, (d->>'input_tokens')::bigint as input_tokens,
               (d->>'output_tokens')::bigint as output_tokens, (d->>'ended_at')::timestamptz as ended_at
        from unnest(ds) as d
        offset 0  -- each field read once per event, not once per scope
    ), up as (
        insert into spend_totals as t (scope, scope_id, spend, requests, input_tokens, output_tokens, last_at)
        select s.scope, s.scope_id, sum(ev.cost), count(*), sum(ev.input_tokens), sum(ev.output_tokens),
               max(ev.ended_at)
        from ev, sl_usage_scopes(ev.d) as s
        group by 1, 2
        order by 1, 2
        on conflict (scope, scope_id) do update set
            spend = t.spend + excluded.spend,
            requests = t.requests + excluded.requests,
            input_tokens = t.input_tokens + excluded.input_tokens,
            output_tokens = t.output_tokens + excluded.output_tokens,
            last_at = greatest(t.last_at, excluded.last_at)
        returning t.scope, t.scope_id, t.spend
    )
    select jsonb_object_agg('l|' || up.scope || '|' || up.scope_id, up.spend) into totals from up;
    if released = '{}' then
        -- Nothing given back (usage ingested without a hold, a rebuild): only budget periods'
        -- spend to add, in one statement, in the same order.
        insert into budget_usage as b (scope, scope_id, period_start, spent)
        select p.scope, p.scope_id, p.period_start, sum((d->>'cost')::numeric)
        from unnest(ds) as d, sl_usage_periods(d) as p
        group by 1, 2, 3
        order by sl_scope_rank(p.scope), 2, 3
        on conflict (scope, scope_id, period_start) do update set spent = b.spent + excluded.spent;
        return totals;
    end if;
    for w in
        with budget as (
            select p.scope, p.scope_id, p.period_start as period, (d->>'cost')::numeric as spent, 0::numeric as held
            from unnest(ds) as d, sl_usage_periods(d) as p
            union all
            select r->>0, r->>1, (r->>2)::timestamptz, 0, (h.value->>'amount')::numeric
            from jsonb_each(released) as h, jsonb_array_elements(coalesce(h.value->'budget_rows', '[]')) as r
        ), shared as (
            select scope, scope_id, 0 as kind, period, sum(spent) as spent, sum(held) as held,
                   0::bigint as tokens, 0::bigint as slots
            from budget group by scope, scope_id, period
            union all
            select r->>0, r->>1, 1, null, 0, 0, sum((d->>'total_tokens')::bigint), 0
            from unnest(ds) as d,
                 jsonb_array_elements(coalesce(released->(d->>'call_id')->'tpm_rows', '[]')) as r
            group by 1, 2
            union all
            select r->>0, r->>1, 2, null, 0, 0, 0, count(*)
            from jsonb_each(released) as h, jsonb_array_elements(coalesce(h.value->'parallel_rows', '[]')) as r
            group by 1, 2
        )
        select * from shared order by sl_scope_rank(scope), scope_id, kind, period
    loop
        if w.kind = 0 then
            insert into budget_usage as b (scope, scope_id, period_start, spent)
            values (w.scope, w.scope_id, w.period, w.spent)
            on conflict (scope, scope_id, period_start) do update
            set spent = b.spent + excluded.spent, held = greatest(b.held - w.held, 0);
        elsif w.kind = 1 then
            insert into rate_usage as u (scope, scope_id, window_start, tokens)
            values (w.scope, w.scope_id, date_trunc('minute', now()), w.tokens)
            on conflict (scope, scope_id, window_start) do update set tokens = u.tokens + excluded.tokens;
        else
            update in_flight set count = greatest(count - w.slots, 0)
            where scope = w.scope and scope_id = w.scope_id;
        end if;
    end loop;
    return totals;
end $$;

-- Each key's lifetime spend after each request of a batch, in order: its total once the batch is
-- counted (`totals`, by 'l|key|<hash>') less the costs of the batch's later requests of that key.
create or replace function sl_key_spends(ds jsonb, totals jsonb) returns numeric[]
language sql immutable as $$
    select array_agg(trim_scale(x.spend) order by x.i)
    from (
        select e.i, (totals->>('l|key|' || (e.d->>'key_hash')))::numeric
                    - sum((e.d->>'cost')::numeric) over (partition by e.d->>'key_hash')
                    + sum((e.d->>'cost')::numeric) over (partition by e.d->>'key_hash' order by e.i) as spend
        from jsonb_array_elements(ds) with ordinality as e(d, i)
    ) as x
$$;

-- Record one request, as sl_record_usages records a batch, with plans made for one request:
-- its event, its Lago row, its hold released (or its cost drawn from its lease), its projection
-- (sl_project_usage). Returns the key's new lifetime spend.
create or replace function sl_record_usage(d jsonb, meta jsonb, ctx jsonb, outbox_rows jsonb) returns numeric
language plpgsql set plan_cache_mode = force_generic_plan as $$
declare
    call text := d->>'call_id';
    cost numeric := (d->>'cost')::numeric;
    -- what it gives back of a lease: its own hold at most, whatever it cost
    drawn numeric := least(cost, coalesce((d->>'hold')::numeric, cost));
    webhooks boolean := coalesce((ctx->>'webhooks')::boolean, false);
    released jsonb;
    totals jsonb;  -- the lifetime totals once it is counted, by 'l|scope|id'
begin
    perform sl_customer_first_seen(d->>'customer_id', ctx->>'default_budget_id', meta);
    delete from holds as h where call_id = call
    returning jsonb_build_object(call, to_jsonb(h)) into released;
    if not found and meta ? 'lease' then  -- admitted under a lease: draw the cost from it
        update holds set amount = greatest(amount - drawn, 0) where call_id = meta->>'lease'
        returning jsonb_build_object(call, jsonb_build_object('amount', drawn, 'budget_rows', budget_rows))
        into released;
    end if;
    insert into events (stream, version, type, data, metadata)
    values ('request:' || call, 1, 'UsageRecorded', d,
            case when webhooks then meta || '{"webhooks": true}' else meta end);
    insert into outbox (sink, dedupe_key, payload, state, call_id)
    select o->>'sink', o->>'dedupe_key', o->'payload', o->>'state', call
    from jsonb_array_elements(outbox_rows) as o;
    if coalesce((ctx->>'notify')::boolean, true) and (webhooks or jsonb_array_length(outbox_rows) > 0) then
        perform pg_notify('sl_outbox', '');
    end if;
    totals := sl_project_usage(array[d], coalesce(released, '{}'));
    return trim_scale((totals->>('l|key|' || (d->>'key_hash')))::numeric);
end $$;

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
