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
