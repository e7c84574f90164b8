create or replace function sl_directory_history() returns trigger
language plpgsql as $$
begin
    if tg_op = 'UPDATE' and to_jsonb(old) - 'updated_at' = to_jsonb(new) - 'updated_at' then  -- touched only
        return null;
    end if;
    insert into directory_history (entity, entity_id, was)
    values (tg_table_name, to_jsonb(old)->>tg_argv[0], to_jsonb(old));
    return null;
end $$;

-- The triggers that keep directory_history (again after a rebuild swaps the tables in).
create or replace function sl_remember_directory_changes() returns void
language plpgsql as $$
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

-- A directory row as jsonb as it was after transaction `as_of` (the first change after it kept
-- the row as it was), or as it is when nothing changed it since (or as_of is null).
create or replace function sl_directory_row(entity text, id text, as_of xid8) returns jsonb
language plpgsql stable as $$
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
-- when nothing has changed since). PL/pgSQL: inlined into sl_webhook_rows's one statement, the
-- SQL version made its plan twice as slow.
create or replace function sl_request_scopes_as_of(p jsonb) returns table (ord integer, scope text, scope_id text, max_budget numeric, soft_budget numeric, budget_duration text, rpm_limit integer, tpm_limit integer, max_parallel_requests integer, anchor timestamptz, models text[], blocked boolean)
language plpgsql stable as $$
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
