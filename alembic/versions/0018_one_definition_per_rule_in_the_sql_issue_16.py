"""One definition per rule in the SQL (issue 16)

Functions: sl_admit, sl_admit_many, sl_announce_budget_exhausted, sl_budget_refusal,
sl_crossing_key, sl_key_spends, sl_lease, sl_open_period, sl_project_usage, sl_rate_refusal,
sl_record_usage, sl_record_usages, sl_refuse, sl_scope_refusal, sl_settle_values, sl_webhook_rows,
sl_webhook_run. Written by scripts/sql_migration.py from ledger/sql/, which holds their current
text; the downgrade carries the text the previous revision left.

Revision ID: 0018
Revises: 0017
"""

from alembic import op
from spendledger.ledger.db import execute_script

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

UPGRADE = r"""
-- The refusals of admission, one builder each. sl_admit and sl_admit_many decide in the same order
-- — the scope (blocked, the model), its budget, rpm, tpm, requests in flight — and sl_lease declines
-- wherever a scope alone would refuse; a refusal is RequestRefused's `detail` (ledger/events.py).

-- A scope that refuses the request whatever it costs: blocked, or the model not among its models
-- (none, or LiteLLM's "all-proxy-models", allows every model). Null: the scope does not refuse.
create or replace function sl_scope_refusal(scope text, scope_id text, blocked boolean, models jsonb, model text) returns jsonb
language sql immutable as $$
    select case
        when blocked then jsonb_build_object(
            'reason', case scope when 'customer' then 'customer_blocked' else 'scope_blocked' end,
            'scope', scope, 'scope_id', scope_id)
        when jsonb_array_length(coalesce(models, '[]')) > 0 and not (models ? model or models ? 'all-proxy-models')
        then jsonb_build_object('reason', 'model_access_denied', 'scope', scope, 'scope_id', scope_id, 'models', models)
    end
$$;

-- A budget that has no room for the request's hold in its period.
create or replace function sl_budget_refusal(scope text, scope_id text, max_budget numeric, soft_budget numeric, spent numeric, held numeric, hold numeric, period timestamptz, reset_at timestamptz) returns jsonb
language sql immutable as $$
    select jsonb_build_object(
        'reason', 'budget_exceeded', 'scope', scope, 'scope_id', scope_id, 'max_budget', max_budget,
        'spend', spent, 'held', held, 'hold', hold, 'budget_reset_at', reset_at, 'period_start', period,
        'soft_budget', soft_budget)
$$;

-- A rate limit reached: rpm and tpm until the minute's window ends, requests in flight for a second.
create or replace function sl_rate_refusal(limit_type text, scope text, scope_id text, lim integer, used bigint, window_start timestamptz) returns jsonb
language sql stable as $$
    select jsonb_build_object(
        'reason', 'rate_limit_exceeded', 'limit_type', limit_type, 'scope', scope, 'scope_id', scope_id,
        'limit', lim,
        'retry_after', case when window_start is null then 1
                            else ceil(extract(epoch from window_start + interval '1 minute' - clock_timestamp())) end)
        || case when used is null then '{}' else jsonb_build_object('used', used) end
$$;

-- Append the request's terminal RequestRefused; the answer admission gives for it.
create or replace function sl_refuse(p jsonb, refusal jsonb) returns jsonb
language sql as $$
    insert into events (stream, version, type, data, metadata)
    values ('request:' || (p->>'call_id'), 1, 'RequestRefused',
            (p->'refused') || jsonb_build_object('type', 'RequestRefused', 'reason', refusal->>'reason',
                                                 'scope', refusal->>'scope', 'scope_id', refusal->>'scope_id',
                                                 'detail', refusal),
            p->'meta');
    select refusal || jsonb_build_object('admitted', false)
$$;

-- Admit one request: hold its worst-case cost on every budget and take its rate-limit slots, or
-- refuse it as a whole and append RequestRefused. Returns {"admitted": true, …} or the refusal.
create or replace function sl_admit(p jsonb) returns jsonb
language plpgsql set plan_cache_mode = force_generic_plan as $$
declare
    s record;
    hold numeric := (p->>'hold')::numeric;
    at timestamptz := now();
    minute timestamptz := date_trunc('minute', now());
    period timestamptz;
    budget_rows jsonb := '[]';
    period_rows jsonb := '[]';
    parallel_rows jsonb := '[]';
    tpm_rows jsonb := '[]';
    remaining_requests integer;
    remaining_tokens bigint;
    n bigint;
    row_spent numeric;
    row_held numeric;
    refusal jsonb;
begin
    perform sl_customer_first_seen(p->>'customer_id', p->>'default_budget_id', p->'meta');
    begin
        for s in select * from sl_request_scopes(p) loop
            if s.blocked or s.models is not null then
                refusal := sl_scope_refusal(s.scope, s.scope_id, s.blocked, to_jsonb(s.models), p->>'model');
                if refusal is not null then
                    raise exception using errcode = 'SL001', message = refusal::text;
                end if;
            end if;
            if s.max_budget is not null or s.budget_duration is not null then
                period := sl_open_period(s.scope, s.scope_id, s.anchor, s.budget_duration, at);
                period_rows := period_rows || jsonb_build_array(jsonb_build_array(s.scope, s.scope_id, period));
                if s.max_budget is not null then
                    update budget_usage set held = held + hold
                    where scope = s.scope and scope_id = s.scope_id and period_start = period
                      and spent + held + hold <= s.max_budget;
                    if not found then
                        select spent, held into row_spent, row_held from budget_usage
                        where scope = s.scope and scope_id = s.scope_id and period_start = period;
                        raise exception using errcode = 'SL001', message = sl_budget_refusal(
                            s.scope, s.scope_id, s.max_budget, s.soft_budget, row_spent, row_held, hold,
                            period, sl_period_end(s.anchor, s.budget_duration, at))::text;
                    end if;
                    budget_rows := budget_rows || jsonb_build_array(jsonb_build_array(s.scope, s.scope_id, period));
                end if;
            end if;
            if s.rpm_limit is not null then
                insert into rate_usage (scope, scope_id, window_start) values (s.scope, s.scope_id, minute)
                on conflict do nothing;
                update rate_usage set requests = requests + 1
                where scope = s.scope and scope_id = s.scope_id and window_start = minute
                  and requests < s.rpm_limit
                returning requests into n;
                if not found then
                    raise exception using errcode = 'SL001',
                        message = sl_rate_refusal('rpm', s.scope, s.scope_id, s.rpm_limit, null, minute)::text;
                end if;
                remaining_requests := least(coalesce(remaining_requests, 2147483647), s.rpm_limit - n);
            end if;
            if s.tpm_limit is not null then
                select tokens into n from rate_usage
                where scope = s.scope and scope_id = s.scope_id and window_start = minute;
                if coalesce(n, 0) >= s.tpm_limit then
                    raise exception using errcode = 'SL001',
                        message = sl_rate_refusal('tpm', s.scope, s.scope_id, s.tpm_limit, coalesce(n, 0), minute)::text;
                end if;
                remaining_tokens := least(coalesce(remaining_tokens, 9223372036854775807), s.tpm_limit - coalesce(n, 0));
                tpm_rows := tpm_rows || jsonb_build_array(jsonb_build_array(s.scope, s.scope_id));
            end if;
            if s.max_parallel_requests is not null then
                insert into in_flight (scope, scope_id) values (s.scope, s.scope_id) on conflict do nothing;
                update in_flight set count = count + 1
                where scope = s.scope and scope_id = s.scope_id and count < s.max_parallel_requests;
                if not found then
                    raise exception using errcode = 'SL001', message = sl_rate_refusal(
                        'max_parallel_requests', s.scope, s.scope_id, s.max_parallel_requests, null, null)::text;
                end if;
                parallel_rows := parallel_rows || jsonb_build_array(jsonb_build_array(s.scope, s.scope_id));
            end if;
        end loop;
        if budget_rows <> '[]' or parallel_rows <> '[]' or tpm_rows <> '[]' then
            insert into holds (call_id, amount, budget_rows, parallel_rows, tpm_rows, expires_at)
            values (p->>'call_id', hold, budget_rows, parallel_rows, tpm_rows, (p->>'expires_at')::timestamptz);
        end if;
    exception when sqlstate 'SL001' then
        get stacked diagnostics refusal = message_text;
        return sl_refuse(p, refusal);
    end;
    -- A hold is transient state, not a fact: losing one in a database crash loses nothing billed,
    -- so an admission need not wait for its WAL flush (the hot budget row's lock is released sooner).
    perform set_config('synchronous_commit', 'off', true);
    return jsonb_build_object('admitted', true, 'budget_periods', period_rows,
                              'remaining_requests', remaining_requests, 'remaining_tokens', remaining_tokens);
end $$;

-- Admit a batch of requests that share their scopes (the caller groups them so), in order: each
-- sees the holds of those before it, and each gets what sl_admit would have answered one by one.
-- The scopes are resolved once and their rows locked once, in sl_admit's order; every request is
-- then decided in memory (no subtransaction each), and the rows are written once for the batch.
-- A refusal appends RequestRefused, a fact: then the commit waits for its WAL flush, as a lone
-- refusal's does; a batch of admissions only (holds, not facts) does not.
create or replace function sl_admit_many(ps jsonb) returns jsonb
language plpgsql set plan_cache_mode = force_generic_plan as $$
declare
    p0 jsonb := ps->0;
    p jsonb;
    sc record;
    at timestamptz := now();
    minute timestamptz := date_trunc('minute', now());
    m integer := 0;
    -- per scope k: its limits, and its rows as read (…0) and as this batch has taken them
    s_scope text[] := '{}';
    s_id text[] := '{}';
    s_max numeric[] := '{}';
    s_soft numeric[] := '{}';
    s_duration text[] := '{}';
    s_anchor timestamptz[] := '{}';
    s_rpm integer[] := '{}';
    s_tpm integer[] := '{}';
    s_par integer[] := '{}';
    s_models jsonb[] := '{}';
    s_blocked boolean[] := '{}';
    s_period timestamptz[] := '{}';
    s_spent numeric[] := '{}';
    s_held numeric[] := '{}';
    s_held0 numeric[] := '{}';
    s_requests integer[] := '{}';
    s_requests0 integer[] := '{}';
    s_tokens bigint[] := '{}';
    s_count integer[] := '{}';
    s_count0 integer[] := '{}';
    v_spent numeric;
    v_held numeric;
    v_int integer;
    v_big bigint;
    hold numeric;
    refusal jsonb;
    refused boolean := false;
    outcomes jsonb := '[]';
    period_rows jsonb := '[]';
    budget_rows jsonb;
    parallel_rows jsonb;
    tpm_rows jsonb;
    remaining_requests integer;
    remaining_tokens bigint;
begin
    if jsonb_array_length(ps) = 1 then
        return jsonb_build_array(sl_admit(p0));
    end if;
    perform sl_customer_first_seen(p0->>'customer_id', p0->>'default_budget_id', p0->'meta');
    for sc in select * from sl_request_scopes(p0) loop
        m := m + 1;
        s_scope[m] := sc.scope;
        s_id[m] := sc.scope_id;
        s_max[m] := sc.max_budget;
        s_soft[m] := sc.soft_budget;
        s_duration[m] := sc.budget_duration;
        s_anchor[m] := sc.anchor;
        s_rpm[m] := sc.rpm_limit;
        s_tpm[m] := sc.tpm_limit;
        s_par[m] := sc.max_parallel_requests;
        s_models[m] := case when sc.models is not null and cardinality(sc.models) > 0 then to_jsonb(sc.models) end;
        s_blocked[m] := sc.blocked;
        if sc.max_budget is not null or sc.budget_duration is not null then
            s_period[m] := sl_open_period(sc.scope, sc.scope_id, sc.anchor, sc.budget_duration, at);
            period_rows := period_rows || jsonb_build_array(jsonb_build_array(sc.scope, sc.scope_id, s_period[m]));
            if sc.max_budget is not null then
                select spent, held into v_spent, v_held from budget_usage
                where scope = sc.scope and scope_id = sc.scope_id and period_start = s_period[m] for update;
                s_spent[m] := v_spent;
                s_held[m] := v_held;
                s_held0[m] := v_held;
            end if;
        end if;
        if sc.rpm_limit is not null then
            insert into rate_usage (scope, scope_id, window_start) values (sc.scope, sc.scope_id, minute)
            on conflict do nothing;
            select requests into v_int from rate_usage
            where scope = sc.scope and scope_id = sc.scope_id and window_start = minute for update;
            s_requests[m] := v_int;
            s_requests0[m] := v_int;
        end if;
        if sc.tpm_limit is not null then
            select tokens into v_big from rate_usage
            where scope = sc.scope and scope_id = sc.scope_id and window_start = minute;
            s_tokens[m] := coalesce(v_big, 0);
        end if;
        if sc.max_parallel_requests is not null then
            insert into in_flight (scope, scope_id) values (sc.scope, sc.scope_id) on conflict do nothing;
            select count into v_int from in_flight where scope = sc.scope and scope_id = sc.scope_id for update;
            s_count[m] := v_int;
            s_count0[m] := v_int;
        end if;
    end loop;
    for i in 0 .. jsonb_array_length(ps) - 1 loop
        p := ps->i;
        hold := (p->>'hold')::numeric;
        refusal := null;
        budget_rows := '[]';
        parallel_rows := '[]';
        tpm_rows := '[]';
        remaining_requests := null;
        remaining_tokens := null;
        -- sl_admit's checks, scope by scope, in its order; the first that fails refuses.
        for k in 1 .. m loop
            if s_blocked[k] or s_models[k] is not null then
                refusal := sl_scope_refusal(s_scope[k], s_id[k], s_blocked[k], s_models[k], p->>'model');
                exit when refusal is not null;
            end if;
            if s_max[k] is not null then
                if s_spent[k] + s_held[k] + hold > s_max[k] then
                    refusal := sl_budget_refusal(s_scope[k], s_id[k], s_max[k], s_soft[k], s_spent[k], s_held[k],
                                                 hold, s_period[k], sl_period_end(s_anchor[k], s_duration[k], at));
                    exit;
                end if;
                budget_rows := budget_rows || jsonb_build_array(jsonb_build_array(s_scope[k], s_id[k], s_period[k]));
            end if;
            if s_rpm[k] is not null then
                if s_requests[k] >= s_rpm[k] then
                    refusal := sl_rate_refusal('rpm', s_scope[k], s_id[k], s_rpm[k], null, minute);
                    exit;
                end if;
                remaining_requests := least(coalesce(remaining_requests, 2147483647), s_rpm[k] - s_requests[k] - 1);
            end if;
            if s_tpm[k] is not null then
                if s_tokens[k] >= s_tpm[k] then
                    refusal := sl_rate_refusal('tpm', s_scope[k], s_id[k], s_tpm[k], s_tokens[k], minute);
                    exit;
                end if;
                remaining_tokens := least(coalesce(remaining_tokens, 9223372036854775807), s_tpm[k] - s_tokens[k]);
                tpm_rows := tpm_rows || jsonb_build_array(jsonb_build_array(s_scope[k], s_id[k]));
            end if;
            if s_par[k] is not null then
                if s_count[k] >= s_par[k] then
                    refusal := sl_rate_refusal('max_parallel_requests', s_scope[k], s_id[k], s_par[k], null, null);
                    exit;
                end if;
                parallel_rows := parallel_rows || jsonb_build_array(jsonb_build_array(s_scope[k], s_id[k]));
            end if;
        end loop;
        if refusal is null then
            for k in 1 .. m loop
                if s_max[k] is not null then
                    s_held[k] := s_held[k] + hold;
                end if;
                if s_rpm[k] is not null then
                    s_requests[k] := s_requests[k] + 1;
                end if;
                if s_par[k] is not null then
                    s_count[k] := s_count[k] + 1;
                end if;
            end loop;
            if budget_rows <> '[]' or parallel_rows <> '[]' or tpm_rows <> '[]' then
                insert into holds (call_id, amount, budget_rows, parallel_rows, tpm_rows, expires_at)
                values (p->>'call_id', hold, budget_rows, parallel_rows, tpm_rows, (p->>'expires_at')::timestamptz);
            end if;
            outcomes := outcomes || jsonb_build_array(jsonb_build_object(
                'admitted', true, 'budget_periods', period_rows,
                'remaining_requests', remaining_requests, 'remaining_tokens', remaining_tokens));
        else
            refused := true;
            outcomes := outcomes || jsonb_build_array(sl_refuse(p, refusal));
        end if;
    end loop;
    for k in 1 .. m loop
        if s_max[k] is not null and s_held[k] <> s_held0[k] then
            update budget_usage set held = held + (s_held[k] - s_held0[k])
            where scope = s_scope[k] and scope_id = s_id[k] and period_start = s_period[k];
        end if;
        if s_rpm[k] is not null and s_requests[k] <> s_requests0[k] then
            update rate_usage set requests = requests + (s_requests[k] - s_requests0[k])
            where scope = s_scope[k] and scope_id = s_id[k] and window_start = minute;
        end if;
        if s_par[k] is not null and s_count[k] <> s_count0[k] then
            update in_flight set count = count + (s_count[k] - s_count0[k])
            where scope = s_scope[k] and scope_id = s_id[k];
        end if;
    end loop;
    perform set_config('synchronous_commit', case when refused then 'on' else 'off' end, true);
    return outcomes;
end $$;

-- Lease `amount` (at most `share` of the least room) on every budget of a request's scopes, for
-- the process to admit their requests on its own. {"leased": false} where it could not decide as
-- sl_admit does (ledger/leases.py says where); never a refusal: refusing is sl_admit's.
create or replace function sl_lease(p jsonb) returns jsonb
language plpgsql as $$
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
        -- Not where a scope refuses (sl_admit refuses those), nor under rate limits (they count
        -- every request in PostgreSQL).
        if s.rpm_limit is not null or s.tpm_limit is not null or s.max_parallel_requests is not null
           or sl_scope_refusal(s.scope, s.scope_id, s.blocked, to_jsonb(s.models), p->>'model') is not null then
            return jsonb_build_object('leased', false);
        end if;
        if s.max_budget is not null or s.budget_duration is not null then
            period := sl_open_period(s.scope, s.scope_id, s.anchor, s.budget_duration, at);
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

-- The budget period of a scope that `at` falls in, its budget_usage row created by the period's
-- first admission (or lease): what is held and spent in the period is kept on that row.
create or replace function sl_open_period(scope text, scope_id text, anchor timestamptz, duration text, at timestamptz) returns timestamptz
language plpgsql as $$
declare
    period timestamptz := sl_period_start(anchor, duration, at);
begin
    insert into budget_usage (scope, scope_id, period_start)
    values (sl_open_period.scope, sl_open_period.scope_id, period)
    on conflict do nothing;
    return period;
end $$;

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

drop function sl_settle_values(ds jsonb, ctx jsonb, vals jsonb);
"""

DOWNGRADE = r"""
drop function sl_scope_refusal(scope text, scope_id text, blocked boolean, models jsonb, model text);

drop function sl_budget_refusal(scope text, scope_id text, max_budget numeric, soft_budget numeric, spent numeric, held numeric, hold numeric, period timestamp with time zone, reset_at timestamp with time zone);

drop function sl_rate_refusal(limit_type text, scope text, scope_id text, lim integer, used bigint, window_start timestamp with time zone);

drop function sl_refuse(p jsonb, refusal jsonb);

drop function sl_open_period(scope text, scope_id text, anchor timestamp with time zone, duration text, at timestamp with time zone);

drop function sl_project_usage(ds jsonb[], released jsonb);

drop function sl_key_spends(ds jsonb, totals jsonb);

drop function sl_crossing_key(event text, scope text, scope_id text, period timestamp with time zone, tag text);

drop function sl_webhook_rows(ds jsonb, ctx jsonb, vals jsonb);

drop function sl_announce_budget_exhausted(refusal jsonb, d jsonb);

CREATE OR REPLACE FUNCTION public.sl_admit(p jsonb)
 RETURNS jsonb
 LANGUAGE plpgsql
 SET plan_cache_mode TO 'force_generic_plan'
AS $function$
declare
    s record;
    hold numeric := (p->>'hold')::numeric;
    at timestamptz := now();
    minute timestamptz := date_trunc('minute', now());
    period timestamptz;
    budget_rows jsonb := '[]';
    period_rows jsonb := '[]';
    parallel_rows jsonb := '[]';
    tpm_rows jsonb := '[]';
    remaining_requests integer;
    remaining_tokens bigint;
    n bigint;
    row_spent numeric;
    row_held numeric;
    refusal jsonb;
begin
    perform sl_customer_first_seen(p->>'customer_id', p->>'default_budget_id', p->'meta');
    begin
        for s in select * from sl_request_scopes(p) loop
            if s.blocked then
                raise exception using errcode = 'SL001', message = jsonb_build_object(
                    'reason', case s.scope when 'customer' then 'customer_blocked' else 'scope_blocked' end,
                    'scope', s.scope, 'scope_id', s.scope_id)::text;
            end if;
            if s.models is not null and cardinality(s.models) > 0
               and not (p->>'model' = any(s.models) or 'all-proxy-models' = any(s.models)) then
                raise exception using errcode = 'SL001', message = jsonb_build_object(
                    'reason', 'model_access_denied', 'scope', s.scope, 'scope_id', s.scope_id,
                    'models', to_jsonb(s.models))::text;
            end if;
            if s.max_budget is not null or s.budget_duration is not null then
                period := sl_period_start(s.anchor, s.budget_duration, at);
                insert into budget_usage (scope, scope_id, period_start) values (s.scope, s.scope_id, period)
                on conflict do nothing;
                period_rows := period_rows || jsonb_build_array(jsonb_build_array(s.scope, s.scope_id, period));
                if s.max_budget is not null then
                    update budget_usage set held = held + hold
                    where scope = s.scope and scope_id = s.scope_id and period_start = period
                      and spent + held + hold <= s.max_budget;
                    if not found then
                        select spent, held into row_spent, row_held from budget_usage
                        where scope = s.scope and scope_id = s.scope_id and period_start = period;
                        raise exception using errcode = 'SL001', message = jsonb_build_object(
                            'reason', 'budget_exceeded', 'scope', s.scope, 'scope_id', s.scope_id,
                            'max_budget', s.max_budget, 'spend', row_spent, 'held', row_held,
                            'hold', hold, 'budget_reset_at', sl_period_end(s.anchor, s.budget_duration, at),
                            'period_start', period, 'soft_budget', s.soft_budget
                        )::text;
                    end if;
                    budget_rows := budget_rows || jsonb_build_array(jsonb_build_array(s.scope, s.scope_id, period));
                end if;
            end if;
            if s.rpm_limit is not null then
                insert into rate_usage (scope, scope_id, window_start) values (s.scope, s.scope_id, minute)
                on conflict do nothing;
                update rate_usage set requests = requests + 1
                where scope = s.scope and scope_id = s.scope_id and window_start = minute
                  and requests < s.rpm_limit
                returning requests into n;
                if not found then
                    raise exception using errcode = 'SL001', message = jsonb_build_object(
                        'reason', 'rate_limit_exceeded', 'limit_type', 'rpm', 'scope', s.scope,
                        'scope_id', s.scope_id, 'limit', s.rpm_limit,
                        'retry_after', ceil(extract(epoch from minute + interval '1 minute' - clock_timestamp())))::text;
                end if;
                remaining_requests := least(coalesce(remaining_requests, 2147483647), s.rpm_limit - n);
            end if;
            if s.tpm_limit is not null then
                select tokens into n from rate_usage
                where scope = s.scope and scope_id = s.scope_id and window_start = minute;
                if coalesce(n, 0) >= s.tpm_limit then
                    raise exception using errcode = 'SL001', message = jsonb_build_object(
                        'reason', 'rate_limit_exceeded', 'limit_type', 'tpm', 'scope', s.scope,
                        'scope_id', s.scope_id, 'limit', s.tpm_limit, 'used', n,
                        'retry_after', ceil(extract(epoch from minute + interval '1 minute' - clock_timestamp())))::text;
                end if;
                remaining_tokens := least(coalesce(remaining_tokens, 9223372036854775807), s.tpm_limit - coalesce(n, 0));
                tpm_rows := tpm_rows || jsonb_build_array(jsonb_build_array(s.scope, s.scope_id));
            end if;
            if s.max_parallel_requests is not null then
                insert into in_flight (scope, scope_id) values (s.scope, s.scope_id) on conflict do nothing;
                update in_flight set count = count + 1
                where scope = s.scope and scope_id = s.scope_id and count < s.max_parallel_requests;
                if not found then
                    raise exception using errcode = 'SL001', message = jsonb_build_object(
                        'reason', 'rate_limit_exceeded', 'limit_type', 'max_parallel_requests',
                        'scope', s.scope, 'scope_id', s.scope_id, 'limit', s.max_parallel_requests,
                        'retry_after', 1)::text;
                end if;
                parallel_rows := parallel_rows || jsonb_build_array(jsonb_build_array(s.scope, s.scope_id));
            end if;
        end loop;
        if budget_rows <> '[]' or parallel_rows <> '[]' or tpm_rows <> '[]' then
            insert into holds (call_id, amount, budget_rows, parallel_rows, tpm_rows, expires_at)
            values (p->>'call_id', hold, budget_rows, parallel_rows, tpm_rows, (p->>'expires_at')::timestamptz);
        end if;
    exception when sqlstate 'SL001' then
        get stacked diagnostics refusal = message_text;
        insert into events (stream, version, type, data, metadata)
        values ('request:' || (p->>'call_id'), 1, 'RequestRefused',
                (p->'refused') || jsonb_build_object('type', 'RequestRefused', 'reason', refusal->>'reason',
                                                     'scope', refusal->>'scope', 'scope_id', refusal->>'scope_id',
                                                     'detail', refusal),
                p->'meta');
        return refusal || jsonb_build_object('admitted', false);
    end;
    -- A hold is transient state, not a fact: losing one in a database crash loses nothing billed,
    -- so an admission need not wait for its WAL flush (the hot budget row's lock is released sooner).
    perform set_config('synchronous_commit', 'off', true);
    return jsonb_build_object('admitted', true, 'budget_periods', period_rows,
                              'remaining_requests', remaining_requests, 'remaining_tokens', remaining_tokens);
end $function$;

CREATE OR REPLACE FUNCTION public.sl_admit_many(ps jsonb)
 RETURNS jsonb
 LANGUAGE plpgsql
 SET plan_cache_mode TO 'force_generic_plan'
AS $function$
declare
    p0 jsonb := ps->0;
    p jsonb;
    sc record;
    at timestamptz := now();
    minute timestamptz := date_trunc('minute', now());
    m integer := 0;
    -- per scope k: its limits, and its rows as read (…0) and as this batch has taken them
    s_scope text[] := '{}';
    s_id text[] := '{}';
    s_max numeric[] := '{}';
    s_soft numeric[] := '{}';
    s_duration text[] := '{}';
    s_anchor timestamptz[] := '{}';
    s_rpm integer[] := '{}';
    s_tpm integer[] := '{}';
    s_par integer[] := '{}';
    s_models jsonb[] := '{}';
    s_blocked boolean[] := '{}';
    s_period timestamptz[] := '{}';
    s_spent numeric[] := '{}';
    s_held numeric[] := '{}';
    s_held0 numeric[] := '{}';
    s_requests integer[] := '{}';
    s_requests0 integer[] := '{}';
    s_tokens bigint[] := '{}';
    s_count integer[] := '{}';
    s_count0 integer[] := '{}';
    v_spent numeric;
    v_held numeric;
    v_int integer;
    v_big bigint;
    hold numeric;
    refusal jsonb;
    refused boolean := false;
    outcomes jsonb := '[]';
    period_rows jsonb := '[]';
    budget_rows jsonb;
    parallel_rows jsonb;
    tpm_rows jsonb;
    remaining_requests integer;
    remaining_tokens bigint;
begin
    if jsonb_array_length(ps) = 1 then
        return jsonb_build_array(sl_admit(p0));
    end if;
    perform sl_customer_first_seen(p0->>'customer_id', p0->>'default_budget_id', p0->'meta');
    for sc in select * from sl_request_scopes(p0) loop
        m := m + 1;
        s_scope[m] := sc.scope;
        s_id[m] := sc.scope_id;
        s_max[m] := sc.max_budget;
        s_soft[m] := sc.soft_budget;
        s_duration[m] := sc.budget_duration;
        s_anchor[m] := sc.anchor;
        s_rpm[m] := sc.rpm_limit;
        s_tpm[m] := sc.tpm_limit;
        s_par[m] := sc.max_parallel_requests;
        s_models[m] := case when sc.models is not null and cardinality(sc.models) > 0 then to_jsonb(sc.models) end;
        s_blocked[m] := sc.blocked;
        if sc.max_budget is not null or sc.budget_duration is not null then
            s_period[m] := sl_period_start(sc.anchor, sc.budget_duration, at);
            insert into budget_usage (scope, scope_id, period_start) values (sc.scope, sc.scope_id, s_period[m])
            on conflict do nothing;
            period_rows := period_rows || jsonb_build_array(jsonb_build_array(sc.scope, sc.scope_id, s_period[m]));
            if sc.max_budget is not null then
                select spent, held into v_spent, v_held from budget_usage
                where scope = sc.scope and scope_id = sc.scope_id and period_start = s_period[m] for update;
                s_spent[m] := v_spent;
                s_held[m] := v_held;
                s_held0[m] := v_held;
            end if;
        end if;
        if sc.rpm_limit is not null then
            insert into rate_usage (scope, scope_id, window_start) values (sc.scope, sc.scope_id, minute)
            on conflict do nothing;
            select requests into v_int from rate_usage
            where scope = sc.scope and scope_id = sc.scope_id and window_start = minute for update;
            s_requests[m] := v_int;
            s_requests0[m] := v_int;
        end if;
        if sc.tpm_limit is not null then
            select tokens into v_big from rate_usage
            where scope = sc.scope and scope_id = sc.scope_id and window_start = minute;
            s_tokens[m] := coalesce(v_big, 0);
        end if;
        if sc.max_parallel_requests is not null then
            insert into in_flight (scope, scope_id) values (sc.scope, sc.scope_id) on conflict do nothing;
            select count into v_int from in_flight where scope = sc.scope and scope_id = sc.scope_id for update;
            s_count[m] := v_int;
            s_count0[m] := v_int;
        end if;
    end loop;
    for i in 0 .. jsonb_array_length(ps) - 1 loop
        p := ps->i;
        hold := (p->>'hold')::numeric;
        refusal := null;
        budget_rows := '[]';
        parallel_rows := '[]';
        tpm_rows := '[]';
        remaining_requests := null;
        remaining_tokens := null;
        -- sl_admit's checks, scope by scope, in its order; the first that fails refuses.
        for k in 1 .. m loop
            if s_blocked[k] then
                refusal := jsonb_build_object(
                    'reason', case s_scope[k] when 'customer' then 'customer_blocked' else 'scope_blocked' end,
                    'scope', s_scope[k], 'scope_id', s_id[k]);
                exit;
            end if;
            if s_models[k] is not null and not (s_models[k] ? (p->>'model') or s_models[k] ? 'all-proxy-models') then
                refusal := jsonb_build_object('reason', 'model_access_denied', 'scope', s_scope[k],
                                              'scope_id', s_id[k], 'models', s_models[k]);
                exit;
            end if;
            if s_max[k] is not null then
                if s_spent[k] + s_held[k] + hold > s_max[k] then
                    refusal := jsonb_build_object(
                        'reason', 'budget_exceeded', 'scope', s_scope[k], 'scope_id', s_id[k],
                        'max_budget', s_max[k], 'spend', s_spent[k], 'held', s_held[k], 'hold', hold,
                        'budget_reset_at', sl_period_end(s_anchor[k], s_duration[k], at),
                        'period_start', s_period[k], 'soft_budget', s_soft[k]);
                    exit;
                end if;
                budget_rows := budget_rows || jsonb_build_array(jsonb_build_array(s_scope[k], s_id[k], s_period[k]));
            end if;
            if s_rpm[k] is not null then
                if s_requests[k] >= s_rpm[k] then
                    refusal := jsonb_build_object(
                        'reason', 'rate_limit_exceeded', 'limit_type', 'rpm', 'scope', s_scope[k],
                        'scope_id', s_id[k], 'limit', s_rpm[k],
                        'retry_after', ceil(extract(epoch from minute + interval '1 minute' - clock_timestamp())));
                    exit;
                end if;
                remaining_requests := least(coalesce(remaining_requests, 2147483647), s_rpm[k] - s_requests[k] - 1);
            end if;
            if s_tpm[k] is not null then
                if s_tokens[k] >= s_tpm[k] then
                    refusal := jsonb_build_object(
                        'reason', 'rate_limit_exceeded', 'limit_type', 'tpm', 'scope', s_scope[k],
                        'scope_id', s_id[k], 'limit', s_tpm[k], 'used', s_tokens[k],
                        'retry_after', ceil(extract(epoch from minute + interval '1 minute' - clock_timestamp())));
                    exit;
                end if;
                remaining_tokens := least(coalesce(remaining_tokens, 9223372036854775807), s_tpm[k] - s_tokens[k]);
                tpm_rows := tpm_rows || jsonb_build_array(jsonb_build_array(s_scope[k], s_id[k]));
            end if;
            if s_par[k] is not null then
                if s_count[k] >= s_par[k] then
                    refusal := jsonb_build_object(
                        'reason', 'rate_limit_exceeded', 'limit_type', 'max_parallel_requests',
                        'scope', s_scope[k], 'scope_id', s_id[k], 'limit', s_par[k], 'retry_after', 1);
                    exit;
                end if;
                parallel_rows := parallel_rows || jsonb_build_array(jsonb_build_array(s_scope[k], s_id[k]));
            end if;
        end loop;
        if refusal is null then
            for k in 1 .. m loop
                if s_max[k] is not null then
                    s_held[k] := s_held[k] + hold;
                end if;
                if s_rpm[k] is not null then
                    s_requests[k] := s_requests[k] + 1;
                end if;
                if s_par[k] is not null then
                    s_count[k] := s_count[k] + 1;
                end if;
            end loop;
            if budget_rows <> '[]' or parallel_rows <> '[]' or tpm_rows <> '[]' then
                insert into holds (call_id, amount, budget_rows, parallel_rows, tpm_rows, expires_at)
                values (p->>'call_id', hold, budget_rows, parallel_rows, tpm_rows, (p->>'expires_at')::timestamptz);
            end if;
            outcomes := outcomes || jsonb_build_array(jsonb_build_object(
                'admitted', true, 'budget_periods', period_rows,
                'remaining_requests', remaining_requests, 'remaining_tokens', remaining_tokens));
        else
            refused := true;
            insert into events (stream, version, type, data, metadata)
            values ('request:' || (p->>'call_id'), 1, 'RequestRefused',
                    (p->'refused') || jsonb_build_object('type', 'RequestRefused', 'reason', refusal->>'reason',
                                                         'scope', refusal->>'scope', 'scope_id', refusal->>'scope_id',
                                                         'detail', refusal),
                    p->'meta');
            outcomes := outcomes || jsonb_build_array(refusal || jsonb_build_object('admitted', false));
        end if;
    end loop;
    for k in 1 .. m loop
        if s_max[k] is not null and s_held[k] <> s_held0[k] then
            update budget_usage set held = held + (s_held[k] - s_held0[k])
            where scope = s_scope[k] and scope_id = s_id[k] and period_start = s_period[k];
        end if;
        if s_rpm[k] is not null and s_requests[k] <> s_requests0[k] then
            update rate_usage set requests = requests + (s_requests[k] - s_requests0[k])
            where scope = s_scope[k] and scope_id = s_id[k] and window_start = minute;
        end if;
        if s_par[k] is not null and s_count[k] <> s_count0[k] then
            update in_flight set count = count + (s_count[k] - s_count0[k])
            where scope = s_scope[k] and scope_id = s_id[k];
        end if;
    end loop;
    perform set_config('synchronous_commit', case when refused then 'on' else 'off' end, true);
    return outcomes;
end $function$;

CREATE OR REPLACE FUNCTION public.sl_lease(p jsonb)
 RETURNS jsonb
 LANGUAGE plpgsql
AS $function$
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
end $function$;

CREATE OR REPLACE FUNCTION public.sl_record_usage(d jsonb, meta jsonb, ctx jsonb, outbox_rows jsonb)
 RETURNS numeric
 LANGUAGE plpgsql
 SET plan_cache_mode TO 'force_generic_plan'
AS $function$
declare
    call text := d->>'call_id';
    cost numeric := (d->>'cost')::numeric;
    -- what it gives back of a lease: its own hold at most, whatever it cost
    drawn numeric := least(cost, coalesce((d->>'hold')::numeric, cost));
    webhooks boolean := coalesce((ctx->>'webhooks')::boolean, false);
    h holds;
    w record;
    key_spend numeric;
begin
    perform sl_customer_first_seen(d->>'customer_id', ctx->>'default_budget_id', meta);
    delete from holds where call_id = call returning * into h;
    if not found and meta ? 'lease' then  -- admitted under a lease: draw the cost from it
        update holds set amount = greatest(amount - drawn, 0) where call_id = meta->>'lease'
        returning call, drawn, budget_rows, '[]'::jsonb, '[]'::jsonb, expires_at, created_at, owner into h;
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
end $function$;

CREATE OR REPLACE FUNCTION public.sl_record_usages(ds jsonb, metas jsonb, ctx jsonb, outboxes jsonb)
 RETURNS TABLE(idx integer, key_spend numeric)
 LANGUAGE plpgsql
 SET plan_cache_mode TO 'force_generic_plan'
AS $function$
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
end $function$;

CREATE OR REPLACE FUNCTION public.sl_webhook_run(ds jsonb, ctx jsonb, webhooks boolean)
 RETURNS void
 LANGUAGE plpgsql
AS $function$
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
end $function$;

CREATE OR REPLACE FUNCTION public.sl_settle_values(ds jsonb, ctx jsonb, vals jsonb)
 RETURNS numeric[]
 LANGUAGE plpgsql
AS $function$
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
end $function$;
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
