-- A deployment's own rpm and tpm (litellm_params.rpm / .tpm), shared by every process: kept in
-- rate_usage under scope 'deployment', in the minute's window, as a key's are. Only requests to a
-- deployment that sets one (or to any, under usage-based-routing) come here: the others never
-- pay the round trip.

-- Take a request slot on the first of `candidates` ([[deployment_id, rpm, tpm], …], in the order
-- the router prefers them; by the fewest tokens this minute when `by_usage`) whose rpm and tpm have
-- room. Returns {"deployment_id": …, "requests": …, "tokens": …}, or a null deployment_id and the
-- seconds until the window ends.
create or replace function sl_take_deployment(candidates jsonb, by_usage boolean) returns jsonb
language plpgsql as $$
declare
    minute timestamptz := date_trunc('minute', now());
    c record;
    n integer;
begin
    -- A counter is not a fact: losing one in a crash loses nothing billed.
    perform set_config('synchronous_commit', 'off', true);
    -- The windows' rows, made in one order: two requests never wait on each other in a circle.
    insert into rate_usage (scope, scope_id, window_start)
    select 'deployment', cand->>0, minute from jsonb_array_elements(candidates) as cand order by cand->>0
    on conflict do nothing;
    for c in
        select o.cand->>0 as id, (o.cand->>1)::integer as rpm, (o.cand->>2)::bigint as tpm, u.requests, u.tokens
        from jsonb_array_elements(candidates) with ordinality as o(cand, ord)
        join rate_usage u on u.scope = 'deployment' and u.scope_id = o.cand->>0 and u.window_start = minute
        order by case when by_usage then u.tokens end, case when by_usage then u.requests end, o.ord
    loop
        if c.tpm is not null and c.tokens >= c.tpm then
            continue;
        end if;
        update rate_usage set requests = requests + 1
        where scope = 'deployment' and scope_id = c.id and window_start = minute
          and (c.rpm is null or requests < c.rpm)
        returning requests into n;
        if found then
            return jsonb_build_object('deployment_id', c.id, 'requests', n, 'tokens', c.tokens);
        end if;
    end loop;
    return jsonb_build_object('deployment_id', null,
                              'retry_after', ceil(extract(epoch from minute + interval '1 minute' - clock_timestamp())));
end $$;

-- Count the tokens deployments used ({deployment_id: tokens}) in this minute's windows.
create or replace function sl_count_deployment_tokens(counts jsonb) returns void
language plpgsql as $$
begin
    perform set_config('synchronous_commit', 'off', true);
    insert into rate_usage as u (scope, scope_id, window_start, tokens)
    select 'deployment', c.key, date_trunc('minute', now()), (c.value)::bigint
    from jsonb_each_text(counts) as c order by c.key
    on conflict (scope, scope_id, window_start) do update set tokens = u.tokens + excluded.tokens;
end $$;
