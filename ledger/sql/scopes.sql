create or replace function sl_scope_rank(scope text) returns integer
language sql immutable as $$
    select case scope when 'key' then 1 when 'user' then 2 when 'team' then 3 when 'customer' then 4 else 5 end
$$;

-- Every scope that governs a request, with its limits, in the fixed order that keeps lock order
-- the same in every transaction (no deadlocks between admissions).
create or replace function sl_request_scopes(p jsonb) returns table (ord integer, scope text, scope_id text, max_budget numeric, soft_budget numeric, budget_duration text, rpm_limit integer, tpm_limit integer, max_parallel_requests integer, anchor timestamptz, models text[], blocked boolean)
language sql stable as $$
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
create or replace function sl_customer_first_seen(customer text, default_budget_id text, meta jsonb) returns void
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

create or replace function sl_scope_changed() returns trigger
language plpgsql as $$
begin
    perform pg_notify('sl_scope_changed', tg_table_name);
    return null;
end $$;
