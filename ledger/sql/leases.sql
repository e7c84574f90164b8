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

-- What a batch's leased requests draw from their leases, as sl_record_usages's `released` map
-- (call id → the amount to take off `held` and the budget rows it is held on): each request at
-- most its own hold, whatever it cost.
create or replace function sl_draw_leases(ds jsonb, metas jsonb) returns jsonb
language sql as $$
    with drawn as (
        select e.d->>'call_id' as call_id, metas->(e.i::integer - 1)->>'lease' as lease,
               least((e.d->>'cost')::numeric, coalesce((e.d->>'hold')::numeric, (e.d->>'cost')::numeric)) as cost
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
create or replace function sl_return_lease(lease text, amount numeric) returns void
language plpgsql as $$
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
