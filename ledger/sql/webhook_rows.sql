-- One webhook row; a crossing already announced in this period is not announced again.
create or replace function sl_enqueue_webhook(event text, dedupe text, body jsonb, d jsonb) returns void
language sql as $$
    insert into outbox (sink, dedupe_key, payload, call_id)
    values ('webhook', dedupe,
            body || jsonb_build_object(
                'token', d->>'key_hash', 'customer_id', d->>'customer_id', 'user_id', d->>'user_id',
                'team_id', d->>'team_id', 'user_email', null, 'key_alias', d->>'key_alias',
                'projected_exceeded_date', null, 'projected_spend', null, 'event', event,
                'event_id', dedupe, 'created_at', d->>'ended_at'),
            d->>'call_id')
    on conflict (sink, dedupe_key) do nothing
$$;

-- What a usage event counts in webhook_spend, with the key sl_webhook_rows knows it by
-- (sl_usage_value_keys; a model's total is read by no webhook).
create or replace function sl_webhook_scopes(d jsonb) returns table (scope text, scope_id text, period_start timestamptz, value_key text)
language sql stable as $$
    select r->>0, r->>1, (r->>2)::timestamptz, 'p|' || (r->>0) || '|' || (r->>1) || '|' || ((r->>2)::timestamptz)::text
    from jsonb_array_elements(coalesce(d->'budget_periods', '[]')) as r
    union all
    select s.scope, s.scope_id, '-infinity', 'l|' || s.scope || '|' || s.scope_id
    from sl_usage_scopes(d) as s where s.scope <> 'model'
$$;

-- The dedupe key of a budget line crossed: one per scope, line and period, whoever announces it
-- (the follower below when spend crosses it, sl_announce_budget_exhausted when a request is
-- refused at it); the outbox's unique (sink, dedupe_key) makes it once.
create or replace function sl_crossing_key(event text, scope text, scope_id text, period timestamptz, tag text) returns text
language sql immutable as $$
    select event || ':' || scope || ':' || scope_id || ':' || extract(epoch from period)::bigint || ':' || tag
$$;

-- Write the webhook rows of a run of usage events, in log order: `spend_tracked` for each request
-- with a customer, and each budget line (85 %, 95 %, max, soft) a request's spend crossed, against
-- the limits in force where the run stands in the log (sl_request_scopes_as_of). `vals` holds the
-- scopes' spend before the run (sl_usage_value_keys' keys); each request's cost is counted into it
-- in order (a running sum per key: one query for the run), and the rows are one statement.
create or replace function sl_webhook_rows(ds jsonb, ctx jsonb, vals jsonb) returns void
language plpgsql as $$
declare
    after_each jsonb[];  -- per request: the values of its keys once it is counted
begin
    select array_agg(v order by i)
    into after_each
    from (
        select x.i, jsonb_object_agg(x.k, coalesce((vals->>x.k)::numeric, 0) + x.running) as v
        from (
            select e.i, k, sum((e.d->>'cost')::numeric) over (partition by k order by e.i) as running
            from jsonb_array_elements(ds) with ordinality as e(d, i), sl_usage_value_keys(e.d) as k
        ) as x
        group by x.i
    ) as y;
    with req as (
        select e.i, e.d, after_each[e.i] as request_values, (e.d->>'cost')::numeric as cost,
               e.d->>'key_hash' as key_hash, e.d->>'user_id' as user_id, e.d->>'team_id' as team_id,
               e.d->>'customer_id' as customer_id
        from jsonb_array_elements(ds) with ordinality as e(d, i)
    ), ids as (
        select distinct key_hash, user_id, team_id, customer_id from req
    ), scopes as materialized (
        -- each distinct set of scope ids resolved once: inlined into the join below, the function
        -- ran again for every request of the run
        select ids.*, s.*
        from ids, sl_request_scopes_as_of(ctx || jsonb_build_object(
            'key_hash', ids.key_hash, 'user_id', ids.user_id, 'team_id', ids.team_id,
            'customer_id', ids.customer_id)) as s
    ), per_scope as (
        select req.i, req.d, req.cost, s.ord, s.scope, s.scope_id, s.max_budget, s.soft_budget,
               s.budget_duration, s.anchor, p.period,
               (req.request_values->>(
                   case when p.period is null then 'l|' || s.scope || '|' || s.scope_id
                        else 'p|' || s.scope || '|' || s.scope_id || '|' || p.period::text end
               ))::numeric as after  -- the scope's spend once this request is counted
        from req
        join scopes as s on (s.key_hash, s.user_id, s.team_id, s.customer_id)
                            is not distinct from (req.key_hash, req.user_id, req.team_id, req.customer_id)
        left join lateral (
            select (r->>2)::timestamptz as period
            from jsonb_array_elements(coalesce(req.d->'budget_periods', '[]')) as r
            where r->>0 = s.scope and r->>1 = s.scope_id
        ) as p on true
    ), crossed as (
        -- A soft budget alone has no budget period (admission tracks none): its line is on the
        -- lifetime spend, as /customer/info shows it, and its period is 'epoch'.
        select c.i, c.d, c.ord, l.n, l.event, l.tag, c.scope, c.scope_id, c.max_budget, c.soft_budget, c.after,
               coalesce(c.period, 'epoch') as period, c.anchor, c.budget_duration
        from per_scope as c,
             lateral (values (1, 'budget_crossed', c.max_budget, 'max'),
                     (2, 'threshold_crossed', c.max_budget * 0.85, '85'),
                     (3, 'threshold_crossed', c.max_budget * 0.95, '95'),
                     (4, 'soft_budget_crossed', c.soft_budget, 'soft')) as l(n, event, amount, tag)
        where c.cost > 0
          and (c.period is not null or (c.soft_budget is not null and c.max_budget is null
                                        and c.budget_duration is null))
          and l.amount is not null and c.after - c.cost < l.amount and c.after >= l.amount
    ), crossing_rows as (
        select i, ord, n, d, event, sl_crossing_key(event, scope, scope_id, period, tag) as dedupe,
               jsonb_build_object(
                   'spend', trim_scale(after), 'max_budget', max_budget, 'soft_budget', soft_budget,
                   'event_group', scope,
                   'event_message', initcap(scope) || ' ' || replace(event, '_', ' ') || '. '
                       || initcap(scope) || '=' || scope_id || ', spend=' || trim_scale(after)
                       || ', max_budget=' || coalesce(max_budget::text, 'null')
                       || case when tag in ('85', '95') then ', threshold=' || tag || '%' else '' end,
                   'budget_reset_at', sl_period_end(anchor, budget_duration, period)) as body
        from crossed
    ), tracked_rows as (
        -- spend_tracked for every request with a customer; total_spend is the customer's spend
        -- of the period (or lifetime) once this request is counted.
        select req.i, 99 as ord, 0 as n, req.d, 'spend_tracked' as event,
               'spend_tracked:' || (req.d->>'call_id') as dedupe,
               jsonb_build_object(
                   'spend', req.cost, 'max_budget', c.max_budget, 'event_group', 'customer',
                   'total_spend', trim_scale(coalesce(c.after, req.cost)),
                   'event_message', 'Customer spend tracked. Customer=' || req.customer_id
                                    || ', spend=' || trim_scale(req.cost)) as body
        from req
        left join per_scope as c on c.i = req.i and c.scope = 'customer'
        where req.customer_id is not null
    )
    insert into outbox (sink, dedupe_key, payload, call_id)
    select 'webhook', w.dedupe,
           w.body || jsonb_build_object(
               'token', w.d->>'key_hash', 'customer_id', w.d->>'customer_id', 'user_id', w.d->>'user_id',
               'team_id', w.d->>'team_id', 'user_email', null, 'key_alias', w.d->>'key_alias',
               'projected_exceeded_date', null, 'projected_spend', null, 'event', w.event,
               'event_id', w.dedupe, 'created_at', w.d->>'ended_at'),
           w.d->>'call_id'
    from (select * from crossing_rows union all select * from tracked_rows) as w
    order by w.i, w.ord, w.n
    -- a line already announced in this period is not announced again (a call is settled once,
    -- so its spend_tracked cannot exist yet)
    on conflict (sink, dedupe_key) do nothing;
end $$;

-- Count a run of usage events (in log order) into webhook_spend, and write their webhook rows
-- if they were settled with webhooks on.
create or replace function sl_webhook_run(ds jsonb, ctx jsonb, webhooks boolean) returns void
language plpgsql as $$
declare
    vals jsonb;
begin
    if webhooks then
        select coalesce(jsonb_object_agg(k.value_key, w.spent), '{}') into vals
        from (select distinct s.* from jsonb_array_elements(ds) as d, sl_webhook_scopes(d) as s) as k
        join webhook_spend as w using (scope, scope_id, period_start);
        perform sl_webhook_rows(ds, ctx, vals);
    end if;
    insert into webhook_spend as w (scope, scope_id, period_start, spent)
    select s.scope, s.scope_id, s.period_start, sum((d->>'cost')::numeric)
    from jsonb_array_elements(ds) as d, sl_webhook_scopes(d) as s
    group by 1, 2, 3 order by 1, 2, 3
    on conflict (scope, scope_id, period_start) do update set spent = w.spent + excluded.spent;
end $$;

-- Follow the log one batch further for the webhooks (the rule of sl_follow_daily_spend): the
-- usage events after the checkpoint, in runs of the same mark, then the checkpoint moved — one
-- transaction. `ctx` as a settle's (the default budget, the global budget). Returns the events
-- read, or -1 when another process holds the checkpoint.
create or replace function sl_follow_webhooks(batch integer, ctx jsonb) returns integer
language plpgsql as $$
declare
    cp projection_checkpoints;
    r record;
    n integer;
    next_txid xid8;
    next_position bigint;
    changes xid8[];
begin
    select * into cp from projection_checkpoints where name = 'webhooks' for update skip locked;
    if not found then
        return -1;
    end if;
    select count(*), (array_agg(txid order by txid desc, position desc))[1],
           (array_agg(position order by txid desc, position desc))[1]
    into n, next_txid, next_position
    from (
        select txid, position from events
        where (txid, position) > (cp.last_txid, cp.last_position)
          and txid < pg_snapshot_xmin(pg_current_snapshot())
        order by txid, position
        limit batch
    ) as e;
    if n = 0 then
        return 0;
    end if;
    -- Every transaction below the xmin read above is over: no event can appear in this range now.
    -- A run: events of the same mark with no directory change between them in the log (`epoch`:
    -- the changes in this range up to the event), so one set of limits holds for the whole run
    -- (sl_request_scopes_as_of).
    select array_agg(distinct h.txid) into changes
    from directory_history as h where h.txid > cp.last_txid and h.txid <= next_txid;
    for r in
        select bool_or(marked) as webhooks, min(txid) as as_of, jsonb_agg(data order by txid, position) as ds
        from (
            select txid, position, data, marked,
                   count(*) filter (where changed) over (order by txid, position) as run_number
            from (
                select txid, position, data, marked,
                       (marked, epoch) is distinct from lag((marked, epoch)) over (order by txid, position) as changed
                from (
                    select e.txid, e.position, e.data, coalesce((e.metadata->>'webhooks')::boolean, false) as marked,
                           (select count(*) from unnest(changes) as c where c <= e.txid) as epoch
                    from events as e
                    where (e.txid, e.position) > (cp.last_txid, cp.last_position)
                      and (e.txid, e.position) <= (next_txid, next_position)
                      and e.type = 'UsageRecorded'
                ) as e
            ) as e
        ) as e
        group by run_number
        order by run_number
    loop
        perform sl_webhook_run(r.ds, ctx || jsonb_build_object('as_of', r.as_of::text), r.webhooks);
    end loop;
    update projection_checkpoints
    set last_txid = next_txid, last_position = next_position, updated_at = now()
    where name = 'webhooks';
    -- Every event still to follow has a txid >= next_txid and needs only the changes of later
    -- transactions: the history up to next_txid (all committed, as it is below the xmin) can go.
    delete from directory_history where txid <= next_txid;
    return n;
end $$;

-- `budget_crossed` for a budget that refused a request. Budgets are strict, so spend stops short of
-- max_budget: the crossing a person wants to hear about is the first request the budget could not
-- take. Its key is the follower's for the same line and period (sl_crossing_key), so a period
-- announces it once either way. `refusal` is admission's budget refusal (sl_budget_refusal); `d`
-- names the request as a usage event would (call_id, key_hash, key_alias, user_id, team_id,
-- customer_id, ended_at).
create or replace function sl_announce_budget_exhausted(refusal jsonb, d jsonb) returns void
language sql as $$
    select sl_enqueue_webhook(
        'budget_crossed',
        sl_crossing_key('budget_crossed', refusal->>'scope', refusal->>'scope_id',
                        (refusal->>'period_start')::timestamptz, 'max'),
        jsonb_build_object(
            'spend', refusal->'spend', 'max_budget', refusal->'max_budget', 'soft_budget', refusal->'soft_budget',
            'event_group', refusal->>'scope',
            'event_message', initcap(refusal->>'scope') || ' budget crossed. ' || initcap(refusal->>'scope') || '='
                || (refusal->>'scope_id') || ', spend=' || (refusal->>'spend') || ', max_budget='
                || (refusal->>'max_budget') || ': a request that could cost ' || (refusal->>'hold') || ' was refused',
            'budget_reset_at', refusal->'budget_reset_at'),
        d);
    select pg_notify('sl_outbox', '')
$$;
