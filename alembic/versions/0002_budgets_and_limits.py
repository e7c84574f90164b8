"""Budgets (pricing tiers), teams, internal users, budget periods, holds, rate limits, spend logs,
and the functions that admit, record and project requests.

Admission and settlement are SQL functions so that each costs one round trip:
`sl_admit` checks every scope (key, user, team, customer, global) in a fixed order and either holds
the worst-case cost on each or refuses as a whole (a subtransaction rolls back what it had held) and
appends `RequestRefused`; `sl_record_usage` releases the hold and adds the real cost.

Revision ID: 0002
Revises: 0001
"""

from alembic import op
from spendledger.ledger.db import execute_script

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UPGRADE = r"""
create table budgets (
    budget_id             text primary key,
    max_budget            numeric,
    soft_budget           numeric,
    rpm_limit             integer,
    tpm_limit             integer,
    max_parallel_requests integer,
    budget_duration       text,
    created_at            timestamptz not null,
    updated_at            timestamptz not null
);

create table teams (
    team_id               text primary key,
    team_alias            text,
    blocked               boolean not null default false,
    max_budget            numeric,
    soft_budget           numeric,
    budget_duration       text,
    rpm_limit             integer,
    tpm_limit             integer,
    max_parallel_requests integer,
    models                text[] not null default '{}',
    metadata              jsonb not null default '{}',
    created_at            timestamptz not null,
    updated_at            timestamptz not null
);

create table users (
    user_id               text primary key,
    user_email            text,
    user_alias            text,
    user_role             text,
    max_budget            numeric,
    soft_budget           numeric,
    budget_duration       text,
    rpm_limit             integer,
    tpm_limit             integer,
    max_parallel_requests integer,
    models                text[] not null default '{}',
    metadata              jsonb not null default '{}',
    created_at            timestamptz not null,
    updated_at            timestamptz not null
);

alter table customers add column updated_at timestamptz;

-- Spend of one budget period of one scope. A new period is a new row: nothing is ever reset.
create table budget_usage (
    scope        text        not null,
    scope_id     text        not null,
    period_start timestamptz not null,
    spent        numeric     not null default 0,
    held         numeric     not null default 0 check (held >= 0),
    primary key (scope, scope_id, period_start)
);

-- Requests and tokens per scope per minute (fixed windows), and requests in flight per scope.
create table rate_usage (
    scope        text        not null,
    scope_id     text        not null,
    window_start timestamptz not null,
    requests     integer     not null default 0,
    tokens       bigint      not null default 0,
    primary key (scope, scope_id, window_start)
);
create table in_flight (
    scope    text    not null,
    scope_id text    not null,
    count    integer not null default 0 check (count >= 0),
    primary key (scope, scope_id)
);

-- The worst-case cost a request holds on each budget until it settles (or its hold expires).
create table holds (
    call_id       text primary key,
    amount        numeric     not null,
    budget_rows   jsonb       not null,
    parallel_rows jsonb       not null,
    tpm_rows      jsonb       not null,
    expires_at    timestamptz not null,
    created_at    timestamptz not null default now()
);
create index holds_expires on holds (expires_at);

-- "30s" | "10m" | "24h" | "7d" | "2w" | "1mo" → (seconds, months); null for null.
create function sl_duration_parts(duration text, out seconds bigint, out months integer)
language plpgsql immutable as $$
declare
    m text[] := regexp_match(trim(duration), '^(\d+)\s*(s|m|h|d|w|mo)$');
begin
    if duration is null then
        return;
    end if;
    if m is null then
        raise exception 'invalid budget_duration %', duration using errcode = '22023';
    end if;
    if m[2] = 'mo' then
        months := m[1]::integer;
    else
        seconds := m[1]::bigint * case m[2] when 's' then 1 when 'm' then 60 when 'h' then 3600
                                              when 'd' then 86400 else 604800 end;
    end if;
end $$;

-- The start of the budget period containing `at`, for periods of `duration` counted from `anchor`.
-- Without a duration there is one period for ever, starting at the epoch.
create function sl_period_start(anchor timestamptz, duration text, at timestamptz) returns timestamptz
language plpgsql immutable as $$
declare
    parts record := sl_duration_parts(duration);
    k bigint;
begin
    if duration is null then
        return 'epoch'::timestamptz;
    end if;
    if parts.months is not null then
        k := ((extract(year from at at time zone 'UTC') - extract(year from anchor at time zone 'UTC')) * 12
              + extract(month from at at time zone 'UTC') - extract(month from anchor at time zone 'UTC'))
             / parts.months;
        k := k * parts.months;
        while anchor + make_interval(months => k::integer) > at loop
            k := k - parts.months;
        end loop;
        while anchor + make_interval(months => (k + parts.months)::integer) <= at loop
            k := k + parts.months;
        end loop;
        return anchor + make_interval(months => k::integer);
    end if;
    k := floor(extract(epoch from at - anchor) / parts.seconds);
    return anchor + make_interval(secs => k * parts.seconds);
end $$;

create function sl_period_end(anchor timestamptz, duration text, at timestamptz) returns timestamptz
language plpgsql immutable as $$
declare
    parts record := sl_duration_parts(duration);
    start timestamptz := sl_period_start(anchor, duration, at);
begin
    if duration is null then
        return null;
    end if;
    if parts.months is not null then
        return anchor + make_interval(months => (
            (extract(year from start at time zone 'UTC') - extract(year from anchor at time zone 'UTC')) * 12
            + extract(month from start at time zone 'UTC') - extract(month from anchor at time zone 'UTC')
            + parts.months)::integer);
    end if;
    return start + make_interval(secs => parts.seconds);
end $$;

-- Every scope that governs a request, with its limits, in the fixed order that keeps lock order
-- the same in every transaction (no deadlocks between admissions).
create function sl_request_scopes(p jsonb) returns table (
    ord integer, scope text, scope_id text, max_budget numeric, soft_budget numeric, budget_duration text,
    rpm_limit integer, tpm_limit integer, max_parallel_requests integer, anchor timestamptz,
    models text[], blocked boolean
) language sql stable as $$
    select 1, 'key', k.key_hash, coalesce(k.max_budget, b.max_budget), b.soft_budget,
           coalesce(k.budget_duration, b.budget_duration), coalesce(k.rpm_limit, b.rpm_limit),
           coalesce(k.tpm_limit, b.tpm_limit), coalesce(k.max_parallel_requests, b.max_parallel_requests),
           k.created_at, null::text[], false
    from keys k left join budgets b on b.budget_id = k.budget_id
    where k.key_hash = p->>'key_hash'
    union all
    select 2, 'user', u.user_id, u.max_budget, u.soft_budget, u.budget_duration, u.rpm_limit, u.tpm_limit,
           u.max_parallel_requests, u.created_at, u.models, false
    from users u where u.user_id = p->>'user_id'
    union all
    select 3, 'team', t.team_id, t.max_budget, t.soft_budget, t.budget_duration, t.rpm_limit, t.tpm_limit,
           t.max_parallel_requests, t.created_at, t.models, t.blocked
    from teams t where t.team_id = p->>'team_id'
    union all
    select 4, 'customer', c.user_id, b.max_budget, b.soft_budget, b.budget_duration, b.rpm_limit,
           b.tpm_limit, b.max_parallel_requests, c.created_at, null::text[], c.blocked
    from customers c
    left join budgets b on b.budget_id = coalesce(c.budget_id, p->>'default_budget_id')
    where c.user_id = p->>'customer_id'
    union all
    select 5, 'global', 'global', (p->>'global_max_budget')::numeric, null, p->>'global_budget_duration',
           null, null, null, 'epoch'::timestamptz, null::text[], false
    where p->>'global_max_budget' is not null
    order by 1
$$;

-- Create a customer the first time a request names it, with the default budget persisted on it.
create function sl_customer_first_seen(customer text, default_budget_id text, meta jsonb) returns void
language plpgsql as $$
begin
    if customer is null then
        return;
    end if;
    insert into customers (user_id, budget_id, created_at, updated_at)
    values (customer, default_budget_id, now(), now())
    on conflict (user_id) do nothing;
    if found then
        insert into events (stream, version, type, data, metadata)
        select 'customer:' || customer, coalesce(max(version), 0) + 1, 'CustomerCreated',
               jsonb_build_object('type', 'CustomerCreated', 'user_id', customer, 'alias', null,
                                  'blocked', false, 'budget_id', default_budget_id, 'source', 'first_sight'),
               meta
        from events where stream = 'customer:' || customer;
    end if;
end $$;

-- Admit one request: hold its worst-case cost on every budget and take its rate-limit slots, or
-- refuse it as a whole and append RequestRefused. Returns {"admitted": true, …} or the refusal.
create function sl_admit(p jsonb) returns jsonb language plpgsql as $$
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
end $$;

-- Give back what a hold took: the held amount, the in-flight slot. Returns its tpm rows.
create function sl_release_hold(p_call_id text) returns jsonb language plpgsql as $$
declare
    h holds;
    r jsonb;
begin
    delete from holds where call_id = p_call_id returning * into h;
    if not found then
        return '[]';
    end if;
    for r in select jsonb_array_elements(h.budget_rows) loop
        update budget_usage set held = greatest(held - h.amount, 0)
        where scope = r->>0 and scope_id = r->>1 and period_start = (r->>2)::timestamptz;
    end loop;
    for r in select jsonb_array_elements(h.parallel_rows) loop
        update in_flight set count = greatest(count - 1, 0) where scope = r->>0 and scope_id = r->>1;
    end loop;
    return h.tpm_rows;
end $$;

create function sl_scope_rank(scope text) returns integer language sql immutable as $$
    select case scope when 'key' then 1 when 'user' then 2 when 'team' then 3 when 'customer' then 4 else 5 end
$$;

-- Lock every row that settling these requests will change, in the one order every writer follows:
-- their holds (by call id), then scope by scope (by rank, then id) its budget periods, its rate
-- window and its in-flight count — the order sl_admit takes them in. Waits therefore always point
-- the same way, and settlements, batches of them, admissions and the sweeper never deadlock.
create function sl_lock_for_settle(call_ids text[], periods jsonb) returns void language plpgsql as $$
declare
    s record;
begin
    perform 1 from holds where call_id = any(call_ids) order by call_id for update;
    for s in
        select x.scope, x.scope_id, array_agg(distinct x.period) filter (where x.period is not null) as periods
        from (
            select r->>0 as scope, r->>1 as scope_id, (r->>2)::timestamptz as period
            from jsonb_array_elements(periods) as r
            union all
            select r->>0, r->>1, (r->>2)::timestamptz
            from holds h, jsonb_array_elements(h.budget_rows || h.parallel_rows || h.tpm_rows) as r
            where h.call_id = any(call_ids)
        ) as x
        group by x.scope, x.scope_id
        order by sl_scope_rank(x.scope), x.scope_id
    loop
        perform 1 from budget_usage
        where scope = s.scope and scope_id = s.scope_id and period_start = any(s.periods)
        order by period_start for update;
        perform 1 from rate_usage
        where scope = s.scope and scope_id = s.scope_id and window_start = date_trunc('minute', now()) for update;
        perform 1 from in_flight where scope = s.scope and scope_id = s.scope_id for update;
    end loop;
end $$;

-- Holds of requests whose process died: released once past their expiry.
create function sl_expire_holds() returns integer language plpgsql as $$
declare
    expired text[];
    call text;
begin
    expired := array(select call_id from holds where expires_at < now() order by call_id for update skip locked);
    perform sl_lock_for_settle(expired, '[]');
    foreach call in array expired loop
        perform sl_release_hold(call);
    end loop;
    delete from rate_usage where window_start < now() - interval '10 minutes';
    return cardinality(expired);
end $$;

-- How a UsageRecorded event projects, as rows: one definition each, used by the live projection
-- (one event) and by rebuilds (every event at once, set-based: these SQL functions inline).
create function sl_usage_scopes(d jsonb) returns table (scope text, scope_id text)
language sql immutable as $$
    select s.scope, s.scope_id
    from (values ('customer', d->>'customer_id'), ('key', d->>'key_hash'), ('model', d->>'model_group'),
                 ('team', d->>'team_id'), ('user', d->>'user_id')) as s(scope, scope_id)
    where s.scope_id is not null
$$;

create function sl_usage_periods(d jsonb) returns table (scope text, scope_id text, period_start timestamptz)
language sql immutable as $$
    select r->>0, r->>1, (r->>2)::timestamptz
    from jsonb_array_elements(coalesce(d->'budget_periods', '[]')) as r
$$;

create function sl_spend_log_row(d jsonb) returns table (
    request_id text, call_type text, api_key text, spend numeric, total_tokens bigint, prompt_tokens bigint,
    completion_tokens bigint, start_time timestamptz, end_time timestamptz, model text, model_id text,
    model_group text, user_id text, team_id text, end_user text, status text, usage_estimated boolean
) language sql immutable as $$
    select d->>'call_id', d->>'route', d->>'key_hash', (d->>'cost')::numeric,
           (d->>'total_tokens')::bigint, (d->>'input_tokens')::bigint, (d->>'output_tokens')::bigint,
           (d->>'started_at')::timestamptz, (d->>'ended_at')::timestamptz, d->>'upstream_model',
           d->>'deployment_id', d->>'model_group', d->>'user_id', d->>'team_id', d->>'customer_id',
           d->>'status', coalesce((d->>'usage_estimated')::boolean, false)
$$;

-- Projection of one UsageRecorded: lifetime totals per scope, and the spend of each budget period
-- the request was admitted under (carried in the event, so a replay lands in the same periods).
-- Rows are touched in a fixed order so concurrent recorders never deadlock. plpgsql, not sql: its
-- plans are cached, where a multi-statement sql function is planned again on every call.
create function sl_apply_usage(d jsonb) returns void language plpgsql as $$
begin
    insert into spend_totals as t (scope, scope_id, spend, requests, input_tokens, output_tokens, last_at)
    select s.scope, s.scope_id, (d->>'cost')::numeric, 1,
           (d->>'input_tokens')::bigint, (d->>'output_tokens')::bigint, (d->>'ended_at')::timestamptz
    from sl_usage_scopes(d) as s
    order by s.scope, s.scope_id
    on conflict (scope, scope_id) do update set
        spend = t.spend + excluded.spend,
        requests = t.requests + 1,
        input_tokens = t.input_tokens + excluded.input_tokens,
        output_tokens = t.output_tokens + excluded.output_tokens,
        last_at = greatest(t.last_at, excluded.last_at);
    insert into budget_usage as b (scope, scope_id, period_start, spent)
    select p.scope, p.scope_id, p.period_start, (d->>'cost')::numeric
    from sl_usage_periods(d) as p
    order by 1, 2, 3
    on conflict (scope, scope_id, period_start) do update set spent = b.spent + excluded.spent;
end $$;

-- Spend logs are the usage events themselves, seen as rows: a view, so nothing is written twice
-- and nothing needs rebuilding. Filters on key, user, team and customer use the expression
-- indexes on events (0004); date ranges use recorded_at (the moment the usage was committed).
create view spend_logs as
select l.*, e.recorded_at, e.stream
from events e, sl_spend_log_row(e.data) as l
where e.type = 'UsageRecorded';
"""

DOWNGRADE = """
drop view spend_logs;
drop function sl_apply_usage(jsonb);
drop function sl_spend_log_row(jsonb);
drop function sl_usage_periods(jsonb);
drop function sl_usage_scopes(jsonb);
drop function sl_expire_holds();
drop function sl_lock_for_settle(text[], jsonb);
drop function sl_scope_rank(text);
drop function sl_release_hold(text);
drop function sl_admit(jsonb);
drop function sl_customer_first_seen(text, text, jsonb);
drop function sl_request_scopes(jsonb);
drop function sl_period_end(timestamptz, text, timestamptz);
drop function sl_period_start(timestamptz, text, timestamptz);
drop function sl_duration_parts(text);
drop table holds;
drop table in_flight;
drop table rate_usage;
drop table budget_usage;
alter table customers drop column updated_at;
drop table users;
drop table teams;
drop table budgets;
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
