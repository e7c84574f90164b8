"""Webhook rows follow the log, out of the response's transaction: `sl_follow_webhooks`.

A settle wrote its request's webhook rows itself (`spend_tracked`, and a row for each budget line
the request crossed), from the spend of its scopes read without locks and read again if another
process had settled in between: on the path of every response. Now the settle only marks its
event (`"webhooks": true` in the metadata, when `ctx.webhooks` asks) and a follower of the log
writes the rows, as the daily spend is kept (0004): the next events after its checkpoint, in
(txid, position) order and only below the snapshot's xmin, in one transaction with the
checkpoint, so every event's rows are written exactly once across crashes and any number of
followers (the checkpoint row is taken with SKIP LOCKED).
The publishers run it before they claim webhook rows (ledger/webhook_rows.py).

The rows are those the settle wrote (the one statement of 0007, `sl_settle_values`), from the
follower's own running spend (`webhook_spend`: each scope's lifetime total and budget periods,
counted in the order it follows the log), so each line is crossed by exactly one request, and
`total_spend` climbs request by request. Events not marked (webhooks off when they were settled)
are counted and get no rows. At upgrade the running spend starts from the projections, with the
log locked so that they count exactly the events before the checkpoint.

A request crosses a line against the limits in force where its event stands in the log, as the
settle did against those it read: triggers keep each key, user, team, customer and budget row as it
was before a change or delete (`directory_history`, with the changing transaction's txid), and the
follower reads the directory as of each run of events (`sl_request_scopes_as_of`, used by
`sl_settle_values`: a run never spans a change), then deletes the history it has passed.

Revision ID: 0012
Revises: 0011
"""

from alembic import op
from spendledger.ledger.db import execute_script

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

# Every statement this revision runs, in full: it stands alone, reading no other revision.
UPGRADE = r"""
-- The spend the webhook follower has counted: per scope, its lifetime total (period_start
-- '-infinity') and its budget periods, in the order the follower reads the log.
create table webhook_spend (
    scope        text        not null,
    scope_id     text        not null,
    period_start timestamptz not null,
    spent        numeric     not null,
    primary key (scope, scope_id, period_start)
);

-- The directory as it was: the row each transaction found before it changed or deleted a key,
-- user, team, customer or budget. The follower announces a request's crossings against the limits
-- in force where its event stands in the log, not against those of when it follows.
create table directory_history (
    seq       bigint generated always as identity primary key,
    txid      xid8   not null default pg_current_xact_id(),
    entity    text   not null,  -- the table
    entity_id text   not null,
    was       jsonb  not null
);

create index directory_history_entity on directory_history (entity, entity_id, txid, seq);

create index directory_history_txid on directory_history (txid);

create function sl_directory_history() returns trigger language plpgsql as $$
begin
    if tg_op = 'UPDATE' and to_jsonb(old) - 'updated_at' = to_jsonb(new) - 'updated_at' then  -- touched only
        return null;
    end if;
    insert into directory_history (entity, entity_id, was)
    values (tg_table_name, to_jsonb(old)->>tg_argv[0], to_jsonb(old));
    return null;
end $$;

-- The triggers that keep directory_history (again after a rebuild swaps the tables in).
create function sl_remember_directory_changes() returns void language plpgsql as $$
declare
    t record;
begin
    for t in select * from (values ('keys', 'key_hash'), ('users', 'user_id'), ('teams', 'team_id'),
                                   ('customers', 'user_id'), ('budgets', 'budget_id')) as v(name, id)
    loop
        execute format('drop trigger if exists sl_directory_history on public.%I', t.name);
        execute format('create trigger sl_directory_history after update or delete on public.%I '
                       'for each row execute function sl_directory_history(%L)', t.name, t.id);
    end loop;
end $$;

select sl_remember_directory_changes();

-- A directory row as jsonb as it was after transaction `as_of` (the first change after it kept
-- the row as it was), or as it is when nothing changed it since (or as_of is null).
create function sl_directory_row(entity text, id text, as_of xid8) returns jsonb language plpgsql stable as $$
declare
    h directory_history;
begin
    if id is null then
        return null;
    end if;
    if as_of is not null then
        select * into h from directory_history as d
        where d.entity = sl_directory_row.entity and d.entity_id = id and d.txid > as_of
        order by d.txid, d.seq limit 1;
        if found then
            return h.was;
        end if;
    end if;
    return case entity
        when 'keys' then (select to_jsonb(x) from keys as x where x.key_hash = id)
        when 'users' then (select to_jsonb(x) from users as x where x.user_id = id)
        when 'teams' then (select to_jsonb(x) from teams as x where x.team_id = id)
        when 'customers' then (select to_jsonb(x) from customers as x where x.user_id = id)
        when 'budgets' then (select to_jsonb(x) from budgets as x where x.budget_id = id)
    end;
end $$;

-- sl_request_scopes as the directory was after transaction p.as_of (as it is, without as_of or
-- when nothing has changed since). PL/pgSQL: inlined into sl_settle_values's one statement, the
-- SQL version made its plan twice as slow.
create function sl_request_scopes_as_of(p jsonb) returns table (
    ord integer, scope text, scope_id text, max_budget numeric, soft_budget numeric, budget_duration text,
    rpm_limit integer, tpm_limit integer, max_parallel_requests integer, anchor timestamptz,
    models text[], blocked boolean
) language plpgsql stable as $$
#variable_conflict use_column
declare
    as_of xid8 := (p->>'as_of')::xid8;
begin
    if as_of is null or not exists (select from directory_history as h where h.txid > as_of) then
        return query select * from sl_request_scopes(p);
        return;
    end if;
    return query
    select 1, 'key', k.key_hash, coalesce(k.max_budget, b.max_budget), b.soft_budget,
           coalesce(k.budget_duration, b.budget_duration), coalesce(k.rpm_limit, b.rpm_limit),
           coalesce(k.tpm_limit, b.tpm_limit), coalesce(k.max_parallel_requests, b.max_parallel_requests),
           k.created_at, null::text[], false
    from jsonb_populate_record(null::keys, sl_directory_row('keys', p->>'key_hash', as_of)) as k,
         jsonb_populate_record(null::budgets, sl_directory_row('budgets', k.budget_id, as_of)) as b
    where k.key_hash is not null
    union all
    select 2, 'user', u.user_id, u.max_budget, u.soft_budget, u.budget_duration, u.rpm_limit, u.tpm_limit,
           u.max_parallel_requests, u.created_at, u.models, false
    from jsonb_populate_record(null::users, sl_directory_row('users', p->>'user_id', as_of)) as u
    where u.user_id is not null
    union all
    select 3, 'team', t.team_id, t.max_budget, t.soft_budget, t.budget_duration, t.rpm_limit, t.tpm_limit,
           t.max_parallel_requests, t.created_at, t.models, t.blocked
    from jsonb_populate_record(null::teams, sl_directory_row('teams', p->>'team_id', as_of)) as t
    where t.team_id is not null
    union all
    select 4, 'customer', c.user_id, b.max_budget, b.soft_budget, b.budget_duration, b.rpm_limit,
           b.tpm_limit, b.max_parallel_requests, c.created_at, null::text[], c.blocked
    from jsonb_populate_record(null::customers, sl_directory_row('customers', p->>'customer_id', as_of)) as c,
         jsonb_populate_record(null::budgets,
                               sl_directory_row('budgets', coalesce(c.budget_id, p->>'default_budget_id'), as_of)) as b
    where c.user_id is not null
    union all
    select 5, 'global', 'global', (p->>'global_max_budget')::numeric, null, p->>'global_budget_duration',
           null, null, null, 'epoch'::timestamptz, null::text[], false
    where p->>'global_max_budget' is not null
    order by 1;
end $$;

-- What a usage event counts in webhook_spend, with the key sl_settle_values knows it by
-- (sl_usage_value_keys; a model's total is read by no webhook).
create function sl_webhook_scopes(d jsonb) returns table (
    scope text, scope_id text, period_start timestamptz, value_key text
) language sql stable as $$
    select r->>0, r->>1, (r->>2)::timestamptz, 'p|' || (r->>0) || '|' || (r->>1) || '|' || ((r->>2)::timestamptz)::text
    from jsonb_array_elements(coalesce(d->'budget_periods', '[]')) as r
    union all
    select s.scope, s.scope_id, '-infinity', 'l|' || s.scope || '|' || s.scope_id
    from sl_usage_scopes(d) as s where s.scope <> 'model'
$$;

-- Count a run of usage events (in log order) into webhook_spend, and write their webhook rows
-- if they were settled with webhooks on.
create function sl_webhook_run(ds jsonb, ctx jsonb, webhooks boolean) returns void language plpgsql as $$
declare
    vals jsonb;
begin
    if webhooks then
        select coalesce(jsonb_object_agg(k.value_key, w.spent), '{}') into vals
        from (select distinct s.* from jsonb_array_elements(ds) as d, sl_webhook_scopes(d) as s) as k
        join webhook_spend as w using (scope, scope_id, period_start);
        perform sl_settle_values(ds, ctx || '{"webhooks": true}', vals);
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
create function sl_follow_webhooks(batch integer, ctx jsonb) returns integer language plpgsql as $$
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

-- The follower starts where the log ends now, from the spend the projections count: settles wait
-- for the lock, so both count exactly the events before the checkpoint.
lock table events in share mode;

insert into webhook_spend (scope, scope_id, period_start, spent)
select scope, scope_id, '-infinity', spend from spend_totals where scope <> 'model'
union all
select scope, scope_id, period_start, spent from budget_usage where spent <> 0;

insert into projection_checkpoints (name, last_txid, last_position)
values ('webhooks',
        coalesce((select txid from events order by txid desc, position desc limit 1), '0'),
        coalesce((select position from events order by txid desc, position desc limit 1), 0));

-- Record one request: its event (marked for the webhook follower when ctx.webhooks), its Lago
-- row, its lifetime totals, then its shared rows in the global order (budget periods and the
-- hold or lease it draws from, rate window, in-flight count). Returns the key's new lifetime spend.
create or replace function sl_record_usage(d jsonb, meta jsonb, ctx jsonb, outbox_rows jsonb) returns numeric
language plpgsql as $$
declare
    call text := d->>'call_id';
    cost numeric := (d->>'cost')::numeric;
    webhooks boolean := coalesce((ctx->>'webhooks')::boolean, false);
    h holds;
    w record;
    key_spend numeric;
begin
    perform sl_customer_first_seen(d->>'customer_id', ctx->>'default_budget_id', meta);
    delete from holds where call_id = call returning * into h;
    if not found and meta ? 'lease' then  -- admitted under a lease: draw the cost from it
        update holds set amount = greatest(amount - cost, 0) where call_id = meta->>'lease'
        returning call, cost, budget_rows, '[]'::jsonb, '[]'::jsonb, expires_at, created_at into h;
    end if;
    insert into events (stream, version, type, data, metadata)
    values ('request:' || call, 1, 'UsageRecorded', d,
            case when webhooks then meta || '{"webhooks": true}' else meta end);
    insert into outbox (sink, dedupe_key, payload, state, call_id)
    select o->>'sink', o->>'dedupe_key', o->'payload', o->>'state', call
    from jsonb_array_elements(outbox_rows) as o;
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
        returning t.scope, t.spend
    )
    select up.spend into key_spend from up where up.scope = 'key';
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
            set spent = b.spent + excluded.spent, held = greatest(b.held - w.held, 0);
        elsif w.kind = 1 then
            insert into rate_usage as u (scope, scope_id, window_start, tokens)
            values (w.scope, w.scope_id, date_trunc('minute', now()), w.tokens)
            on conflict (scope, scope_id, window_start) do update set tokens = u.tokens + excluded.tokens;
        else
            update in_flight set count = greatest(count - 1, 0) where scope = w.scope and scope_id = w.scope_id;
        end if;
    end loop;
    if coalesce((ctx->>'notify')::boolean, true) and (webhooks or jsonb_array_length(outbox_rows) > 0) then
        perform pg_notify('sl_outbox', '');
    end if;
    return trim_scale(key_spend);
end $$;

-- Superseded: the follower writes a lone request's webhook rows as a batch's.
drop function sl_usage_webhooks(jsonb, jsonb, jsonb);

-- Count each request's cost into `vals` in order (a running sum per key: one query for the batch)
-- and write the batch's webhook rows (one statement); the key spends.
create or replace function sl_settle_values(ds jsonb, ctx jsonb, vals jsonb) returns numeric[]
language plpgsql as $$
declare
    after_each jsonb[];  -- per request: the values of its keys once it is counted
    spends numeric[];
begin
    select array_agg(v order by i), array_agg(trim_scale((v->>('l|key|' || key_hash))::numeric) order by i)
    into after_each, spends
    from (
        select x.i, x.key_hash, jsonb_object_agg(x.k, coalesce((vals->>x.k)::numeric, 0) + x.running) as v
        from (
            select e.i, e.d->>'key_hash' as key_hash, k,
                   sum((e.d->>'cost')::numeric) over (partition by k order by e.i) as running
            from jsonb_array_elements(ds) with ordinality as e(d, i), sl_usage_value_keys(e.d) as k
        ) as x
        group by x.i, x.key_hash
    ) as y;
    if not coalesce((ctx->>'webhooks')::boolean, false) then
        return spends;
    end if;
    with req as (
        select e.i, e.d, after_each[e.i] as request_values, (e.d->>'cost')::numeric as cost,
               e.d->>'key_hash' as key_hash, e.d->>'user_id' as user_id, e.d->>'team_id' as team_id,
               e.d->>'customer_id' as customer_id
        from jsonb_array_elements(ds) with ordinality as e(d, i)
    ), ids as (
        select distinct key_hash, user_id, team_id, customer_id from req
    ), scopes as (  -- each distinct set of scope ids resolved once, not once per request
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
        select i, ord, n, d, event,
               event || ':' || scope || ':' || scope_id || ':' || extract(epoch from period)::bigint || ':' || tag
                   as dedupe,
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
    webhooks boolean := false;  -- the webhook rows follow the log (sl_follow_webhooks)
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
    -- The batch's holds: no other writer wants them (the sweeper skips locked holds).
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
    spends := sl_settle_values(ds, ctx - 'webhooks', seen);
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
        spends := sl_settle_values(ds, ctx - 'webhooks', seen || actual);
    end if;
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

alter function sl_record_usages(jsonb, jsonb, jsonb, jsonb) set plan_cache_mode = force_generic_plan;

alter function sl_record_usage(jsonb, jsonb, jsonb, jsonb) set plan_cache_mode = force_generic_plan;
"""

DOWNGRADE = r"""
drop function sl_follow_webhooks(integer, jsonb);

drop function sl_webhook_run(jsonb, jsonb, boolean);

drop function sl_webhook_scopes(jsonb);

drop table webhook_spend;

delete from projection_checkpoints where name = 'webhooks';

drop trigger sl_directory_history on keys;

drop trigger sl_directory_history on users;

drop trigger sl_directory_history on teams;

drop trigger sl_directory_history on customers;

drop trigger sl_directory_history on budgets;

drop function sl_remember_directory_changes();

drop function sl_directory_history();

-- The webhook rows of one settled request, from `after`: the spend of its budget periods
-- ('p|scope|id|period') and its scopes' lifetime spend ('l|scope|id') once it is counted.
create function sl_usage_webhooks(d jsonb, ctx jsonb, after jsonb) returns void language plpgsql as $$
declare
    s record;
    call text := d->>'call_id';
    cost numeric := (d->>'cost')::numeric;
    periods jsonb := (select jsonb_object_agg((r->>0) || '|' || (r->>1), r->>2)
                      from jsonb_array_elements(coalesce(d->'budget_periods', '[]')) as r);
    period timestamptz;
    value numeric;
    customer_budget numeric;
    customer_total numeric;
    context jsonb := jsonb_build_object(
        'token', d->>'key_hash', 'customer_id', d->>'customer_id', 'user_id', d->>'user_id',
        'team_id', d->>'team_id', 'user_email', null, 'key_alias', d->>'key_alias',
        'projected_exceeded_date', null, 'projected_spend', null, 'created_at', d->>'ended_at');
begin
    for s in select * from sl_request_scopes(ctx || jsonb_build_object(
            'key_hash', d->>'key_hash', 'user_id', d->>'user_id', 'team_id', d->>'team_id',
            'customer_id', d->>'customer_id')) loop
        period := (periods->>(s.scope || '|' || s.scope_id))::timestamptz;
        value := (after->>(case when period is null then 'l|' || s.scope || '|' || s.scope_id
                                else 'p|' || s.scope || '|' || s.scope_id || '|' || period::text end))::numeric;
        if s.scope = 'customer' then
            customer_budget := s.max_budget;
            customer_total := value;
        end if;
        -- A soft budget alone has no budget period (admission tracks none): its line is on the
        -- lifetime spend, as /customer/info shows it, and its period is 'epoch'.
        if cost > 0 and (period is not null or (s.soft_budget is not null and s.max_budget is null
                                                and s.budget_duration is null))
           and (value - cost < s.max_budget and value >= s.max_budget * 0.85
                or value - cost < s.soft_budget and value >= s.soft_budget) then
            period := coalesce(period, 'epoch');
            insert into outbox (sink, dedupe_key, payload, call_id)
            select 'webhook', x.dedupe, x.body || context || jsonb_build_object('event', x.event, 'event_id', x.dedupe), call
            from (
                select l.n, l.event,
                       l.event || ':' || s.scope || ':' || s.scope_id || ':' || extract(epoch from period)::bigint || ':' || l.tag as dedupe,
                       jsonb_build_object(
                           'spend', trim_scale(value), 'max_budget', s.max_budget, 'soft_budget', s.soft_budget,
                           'event_group', s.scope,
                           'event_message', initcap(s.scope) || ' ' || replace(l.event, '_', ' ') || '. '
                               || initcap(s.scope) || '=' || s.scope_id || ', spend=' || trim_scale(value)
                               || ', max_budget=' || coalesce(s.max_budget::text, 'null')
                               || case when l.tag in ('85', '95') then ', threshold=' || l.tag || '%' else '' end,
                           'budget_reset_at', sl_period_end(s.anchor, s.budget_duration, period)) as body
                from (values (1, 'budget_crossed', s.max_budget, 'max'),
                             (2, 'threshold_crossed', s.max_budget * 0.85, '85'),
                             (3, 'threshold_crossed', s.max_budget * 0.95, '95'),
                             (4, 'soft_budget_crossed', s.soft_budget, 'soft')) as l(n, event, amount, tag)
                where l.amount is not null and value - cost < l.amount and value >= l.amount
            ) as x
            order by x.n
            on conflict (sink, dedupe_key) do nothing;
        end if;
    end loop;
    if d->>'customer_id' is not null then
        insert into outbox (sink, dedupe_key, payload, call_id)
        values ('webhook', 'spend_tracked:' || call, jsonb_build_object(
                'spend', cost, 'max_budget', customer_budget, 'event_group', 'customer',
                'total_spend', trim_scale(coalesce(customer_total, cost)),
                'event_message', 'Customer spend tracked. Customer=' || (d->>'customer_id')
                                 || ', spend=' || trim_scale(cost))
                || context || jsonb_build_object('event', 'spend_tracked', 'event_id', 'spend_tracked:' || call),
            call)
        on conflict (sink, dedupe_key) do nothing;
    end if;
end $$;

-- As 0010 left it: with a generic plan.
alter function sl_usage_webhooks(jsonb, jsonb, jsonb) set plan_cache_mode = force_generic_plan;

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

-- Count each request's cost into `vals` in order (a running sum per key: one query for the batch)
-- and write the batch's webhook rows (one statement); the key spends.
create or replace function sl_settle_values(ds jsonb, ctx jsonb, vals jsonb) returns numeric[]
language plpgsql as $$
declare
    after_each jsonb[];  -- per request: the values of its keys once it is counted
    spends numeric[];
begin
    select array_agg(v order by i), array_agg(trim_scale((v->>('l|key|' || key_hash))::numeric) order by i)
    into after_each, spends
    from (
        select x.i, x.key_hash, jsonb_object_agg(x.k, coalesce((vals->>x.k)::numeric, 0) + x.running) as v
        from (
            select e.i, e.d->>'key_hash' as key_hash, k,
                   sum((e.d->>'cost')::numeric) over (partition by k order by e.i) as running
            from jsonb_array_elements(ds) with ordinality as e(d, i), sl_usage_value_keys(e.d) as k
        ) as x
        group by x.i, x.key_hash
    ) as y;
    if not coalesce((ctx->>'webhooks')::boolean, false) then
        return spends;
    end if;
    with req as (
        select e.i, e.d, after_each[e.i] as request_values, (e.d->>'cost')::numeric as cost,
               e.d->>'key_hash' as key_hash, e.d->>'user_id' as user_id, e.d->>'team_id' as team_id,
               e.d->>'customer_id' as customer_id
        from jsonb_array_elements(ds) with ordinality as e(d, i)
    ), ids as (
        select distinct key_hash, user_id, team_id, customer_id from req
    ), scopes as (  -- each distinct set of scope ids resolved once, not once per request
        select ids.*, s.*
        from ids, sl_request_scopes(ctx || jsonb_build_object(
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
        select i, ord, n, d, event,
               event || ':' || scope || ':' || scope_id || ':' || extract(epoch from period)::bigint || ':' || tag
                   as dedupe,
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
    return spends;
end $$;

drop function sl_request_scopes_as_of(jsonb);

drop function sl_directory_row(text, text, xid8);

drop table directory_history;
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
