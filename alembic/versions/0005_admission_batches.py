"""Admissions in batches: `sl_admit_many` admits a batch of requests in one transaction.

Concurrent admissions against one hot budget row queue on its row lock one transaction at a time,
and PostgreSQL hands such a lock over expensively (every waiter wakes, re-reads the row, sleeps
again). One transaction admitting the batch takes the lock once, and decides every request from
what it read — sl_admit's checks in sl_admit's order, without a subtransaction each. The
application only batches requests that share their scopes (key, user, team, customer), so a batch
locks the same rows in the same global order as a single admission: batches cannot deadlock with
settles or each other.

Revision ID: 0005
Revises: 0004
"""

from alembic import op
from spendledger.ledger.db import execute_script

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

UPGRADE = r"""
-- Admit a batch of requests that share their scopes (the caller groups them so), in order: each
-- sees the holds of those before it, and each gets what sl_admit would have answered one by one.
-- The scopes are resolved once and their rows locked once, in sl_admit's order; every request is
-- then decided in memory (no subtransaction each), and the rows are written once for the batch.
-- A refusal appends RequestRefused, a fact: then the commit waits for its WAL flush, as a lone
-- refusal's does; a batch of admissions only (holds, not facts) does not.
create function sl_admit_many(ps jsonb) returns jsonb language plpgsql as $$
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
end $$;
"""

DOWNGRADE = """
drop function sl_admit_many(jsonb);
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
