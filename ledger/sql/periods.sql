-- "30s" | "10m" | "24h" | "7d" | "2w" | "1mo" → (seconds, months); null for null.
create or replace function sl_duration_parts(duration text, out seconds bigint, out months integer) returns record
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
create or replace function sl_period_start(anchor timestamptz, duration text, at timestamptz) returns timestamptz
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

create or replace function sl_period_end(anchor timestamptz, duration text, at timestamptz) returns timestamptz
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
