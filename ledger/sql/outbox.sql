-- Up to `n` due rows of one sink, leased for `lease` as one claim (its id in every row returned).
create or replace function sl_outbox_claim(p_sink text, n integer, lease interval) returns table (claim bigint, id bigint, dedupe_key text, payload text, attempts integer, own_failures integer, created_at timestamptz, lease_until timestamptz)
language plpgsql as $$
begin
    perform set_config('synchronous_commit', 'off', true);
    -- One claim of this sink at a time: each reads the claims the ones before it committed.
    perform pg_advisory_xact_lock(hashtext('sl_outbox_claim'), hashtext(p_sink));
    delete from outbox_claims c where c.sink = p_sink and c.lease_until <= now();
    return query
    with leased as (
        select coalesce(array_agg(x), '{}') as ids
        from outbox_claims c, unnest(c.ids) as x where c.sink = p_sink
    ), due as materialized (
        select o.id, o.dedupe_key, o.payload::text as payload, o.attempts, o.own_failures, o.created_at
        from outbox o, leased
        where o.sink = p_sink and o.state = 'pending' and o.next_attempt_at <= now()
          and o.id <> all(leased.ids)
        order by o.next_attempt_at, o.id  -- the order of outbox_due
        limit n
        for update of o skip locked
    ), taken as (
        insert into outbox_claims (sink, ids, lease_until)
        select p_sink, array_agg(due.id), now() + lease from due having count(*) > 0
        returning outbox_claims.id, outbox_claims.lease_until
    )
    select taken.id, due.id, due.dedupe_key, due.payload, due.attempts, due.own_failures, due.created_at,
           taken.lease_until
    from due, taken;
end $$;

-- The outcome of a claim: `delivered` rows, and the others ('dead', or 'retry': due again after
-- `wait_s`; `own` when the row failed on its own). Deletes the claim; if it was gone already (its
-- lease ended and a newer claim took the rows), only the deliveries are recorded.
-- Returns the rows marked.
create or replace function sl_outbox_mark(claim bigint, delivered bigint[], ids bigint[], outcomes text[], errors text[], waits_s double precision[], own boolean[]) returns integer
language plpgsql as $$
declare
    held boolean;
    marked integer;
    more integer := 0;
begin
    perform set_config('synchronous_commit', 'off', true);
    delete from outbox_claims c where c.id = claim;
    held := found or claim is null;  -- rows not claimed by sl_outbox_claim have no fence
    update outbox o set state = 'delivered', delivered_at = clock_timestamp(), attempts = o.attempts + 1,
                        last_error = null
    where o.id = any(delivered) and o.state = 'pending';
    get diagnostics marked = row_count;
    if held and cardinality(ids) > 0 then
        update outbox o set
            state = case m.outcome when 'retry' then 'pending' else m.outcome end,
            attempts = o.attempts + 1,
            own_failures = o.own_failures + m.own::integer,
            last_error = m.error,
            next_attempt_at = case when m.outcome = 'retry' then now() + make_interval(secs => m.wait_s)
                                   else o.next_attempt_at end
        from unnest(ids, outcomes, errors, waits_s, own) as m(id, outcome, error, wait_s, own)
        where o.id = m.id and o.state = 'pending';
        get diagnostics more = row_count;
    end if;
    return marked + more;
end $$;
