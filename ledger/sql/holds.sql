-- Give back what a hold took: the held amount, the in-flight slot. Returns its tpm rows.
create or replace function sl_release_hold(p_call_id text) returns jsonb
language plpgsql as $$
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

-- Lock every row that settling these requests will change, in the one order every writer follows:
-- their holds (by call id), then scope by scope (by rank, then id) its budget periods, its rate
-- window and its in-flight count — the order sl_admit takes them in. Waits therefore always point
-- the same way, and settlements, batches of them, admissions and the sweeper never deadlock.
create or replace function sl_lock_for_settle(call_ids text[], periods jsonb) returns void
language plpgsql as $$
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
create or replace function sl_expire_holds() returns integer
language plpgsql as $$
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

-- Beat for `me`; when `release` (the caller has been beating for at least `stale_after`, so every
-- live process has had the time to beat too), give back the holds of processes that have not
-- beaten for `stale_after`, and forget them. Returns how many holds were released.
create or replace function sl_release_orphaned_holds(me text, stale_after interval, release boolean) returns integer
language plpgsql as $$
declare
    orphaned text[];
    call text;
begin
    -- A heartbeat is not a fact: losing one to a crash costs one beat.
    perform set_config('synchronous_commit', 'off', true);
    insert into process_heartbeats as p (owner, seen_at) values (me, now())
    on conflict (owner) do update set seen_at = excluded.seen_at;
    if not release then
        return 0;
    end if;
    orphaned := array(
        select h.call_id from holds h
        where h.owner is not null and h.owner <> me and h.created_at < now() - stale_after
          and not exists (select 1 from process_heartbeats p
                          where p.owner = h.owner and p.seen_at >= now() - stale_after)
        order by h.call_id
        for update skip locked);
    perform sl_lock_for_settle(orphaned, '[]');
    foreach call in array orphaned loop
        perform sl_release_hold(call);
    end loop;
    delete from process_heartbeats p
    where p.seen_at < now() - stale_after and not exists (select 1 from holds h where h.owner = p.owner);
    return cardinality(orphaned);
end $$;
