-- "30s" | "10m" | "24h" | "7d" | "2w" | "1mo" → (seconds, months); null for null. The grammar is
-- ledger/durations.py's parse_duration's, and the two must agree (tests/integration/sql/
-- test_periods.py): a whole number of seconds, minutes, hours, days, weeks or calendar months —
-- ASCII digits, ASCII white space around and between — positive (a window of no length holds no
-- instant), and at most 1000 years long (a year counted as 366 days, a month as 31). Anything else
-- raises 22023, never an overflow: the number is bounded by its digits before it is cast.
create or replace function sl_duration_parts(duration text, out seconds bigint, out months integer) returns record
language plpgsql immutable as $$
declare
    m text[] := regexp_match(duration, '^[ \t\n\r\f\v]*([0-9]+)[ \t\n\r\f\v]*(s|m|h|d|w|mo)[ \t\n\r\f\v]*$');
    digits text := ltrim(m[1], '0');
    unit_seconds bigint := case m[2] when 's' then 1 when 'm' then 60 when 'h' then 3600 when 'd' then 86400
                                     when 'w' then 604800 else 31 * 86400 end;
begin
    if duration is null then
        return;
    end if;
    if m is null then
        raise exception 'invalid budget_duration %', left(duration, 40) using errcode = '22023';
    end if;
    if digits = '' then
        raise exception 'invalid budget_duration %: must be positive', left(duration, 40) using errcode = '22023';
    end if;
    if length(digits) > 11 or digits::bigint * unit_seconds > 1000 * 366 * 86400::bigint then
        raise exception 'invalid budget_duration %: longer than 1000 years', left(duration, 40) using errcode = '22023';
    end if;
    if m[2] = 'mo' then
        months := digits::integer;
    else
        seconds := digits::bigint * unit_seconds;
    end if;
end $$;

-- Months from the start of year 0 to the month of `t` (a UTC timestamp): the months between two
-- instants are the difference of theirs. Astronomical years: PostgreSQL's skip year 0 (1 BC is -1).
create or replace function sl_month_number(t timestamp) returns integer
language sql immutable as $$
    select ((extract(year from t) + case when extract(year from t) < 0 then 1 else 0 end) * 12
            + extract(month from t) - 1)::integer
$$;

-- The anchored rule, which every budget followed before migration 0022 and a budget created before
-- it still follows until its period then current ends (sl_budget_period_start): the start of the
-- period containing `at`, for periods of `duration` counted from `anchor`: period k starts at
-- anchor + k durations (never compounded from the period before, so Jan 31 → Feb 28 → Mar 31).
-- Months are calendar months in UTC, the day clamped to the month's end, whatever the session's
-- time zone; shorter units are fixed lengths of time. Without a duration there is one period for
-- ever, starting at the epoch.
create or replace function sl_anchored_period_start(anchor timestamptz, duration text, at timestamptz) returns timestamptz
language plpgsql immutable as $$
declare
    parts record := sl_duration_parts(duration);
    a timestamp := anchor at time zone 'UTC';  -- timestamp arithmetic: calendar months, no time zone
    t timestamp := at at time zone 'UTC';
    k integer;      -- months from the anchor to the period's start
    e numeric;      -- seconds from the anchor to `at`, exact to the microsecond
    n bigint;       -- periods from the anchor (a second's periods over centuries pass 2^31)
begin
    if duration is null then
        return 'epoch'::timestamptz;
    end if;
    if parts.months is not null then
        -- the months between them, in whole periods; the clamped day can make it one period too many
        k := floor((sl_month_number(t) - sl_month_number(a))::numeric / parts.months) * parts.months;
        while a + make_interval(months => k) > t loop
            k := k - parts.months;
        end loop;
        while a + make_interval(months => k + parts.months) <= t loop
            k := k + parts.months;
        end loop;
        return (a + make_interval(months => k)) at time zone 'UTC';
    end if;
    -- whole periods by integer division of the exact seconds: a numeric quotient is rounded to 16
    -- digits, which puts a microsecond before the boundary of a long period past it
    e := extract(epoch from at - anchor);
    n := div(e, parts.seconds) - case when e < 0 and mod(e, parts.seconds) <> 0 then 1 else 0 end;
    return anchor + make_interval(secs => n * parts.seconds);
end $$;

-- The end of that period: the start of the next.
create or replace function sl_anchored_period_end(anchor timestamptz, duration text, at timestamptz) returns timestamptz
language plpgsql immutable as $$
declare
    parts record := sl_duration_parts(duration);
    start timestamp := sl_anchored_period_start(anchor, duration, at) at time zone 'UTC';
    a timestamp := anchor at time zone 'UTC';
begin
    if duration is null then
        return null;
    end if;
    if parts.months is not null then  -- start is anchor + k months: only its day can differ from the anchor's
        return (a + make_interval(months => sl_month_number(start) - sl_month_number(a) + parts.months)) at time zone 'UTC';
    end if;
    return (start at time zone 'UTC') + make_interval(secs => parts.seconds);
end $$;

-- The first instant of `day` in `zone`: its midnight, or where the clocks skip midnight, the
-- instant they jump (PostgreSQL reads a wall-clock time in a gap with the offset before it); where
-- they fall back across midnight, the first of the two midnights (PostgreSQL reads the second).
create or replace function sl_zone_midnight(day date, zone text) returns timestamptz
language plpgsql immutable as $$
declare
    reading timestamptz := day::timestamp at time zone zone;
    shortly_before timestamptz := reading - interval '3 hours';  -- longer than any clock change
    offset_before interval := (shortly_before at time zone zone) - (shortly_before at time zone 'UTC');
    earlier timestamptz := (day::timestamp - offset_before) at time zone 'UTC';
begin
    if earlier < reading and earlier at time zone zone = day::timestamp then
        return earlier;
    end if;
    return reading;
end $$;

-- LiteLLM's calendar rule: budget periods begin at midnight in `zone` (litellm_settings.timezone).
-- `1d` (any `Nd`, `Nw`) every N days from the midnight that began the anchor's day; `7d` / `1w`
-- weekly from Monday; `30d` and `Nmo` monthly from the 1st (every N months from the anchor's
-- month); seconds, minutes and hours (and any length that is not whole days) fixed windows of that
-- length from the midnight that began the anchor's day. Midnights are wall-clock
-- (sl_zone_midnight): a day across a DST change is 23 or 25 hours long.
create or replace function sl_calendar_period_start(anchor timestamptz, duration text, at timestamptz, zone text) returns timestamptz
language plpgsql immutable as $$
declare
    parts record := sl_duration_parts(duration);
    a timestamp := anchor at time zone zone;  -- wall-clock times in the zone
    t timestamp := at at time zone zone;
    months integer := coalesce(parts.months, case when parts.seconds = 30 * 86400 then 1 end);
    days bigint := case when parts.seconds % 86400 = 0 then parts.seconds / 86400 end;
    k bigint;
    origin timestamptz;
    e numeric;
begin
    if duration is null then
        return 'epoch'::timestamptz;
    end if;
    if months is not null then
        k := floor((sl_month_number(t) - sl_month_number(a))::numeric / months) * months;
        return sl_zone_midnight((date_trunc('month', a) + make_interval(months => k::integer))::date, zone);
    end if;
    if days = 7 then
        return sl_zone_midnight(date_trunc('week', t)::date, zone);
    end if;
    if days is not null then
        k := floor((t::date - a::date)::numeric / days) * days;
        return sl_zone_midnight(a::date + k::integer, zone);
    end if;
    origin := sl_zone_midnight(a::date, zone);
    e := extract(epoch from at - origin);
    k := div(e, parts.seconds) - case when e < 0 and mod(e, parts.seconds) <> 0 then 1 else 0 end;
    return origin + make_interval(secs => k * parts.seconds);
end $$;

-- The end of that period: the start of the next (the midnight N days, a week or N months on).
create or replace function sl_calendar_period_end(anchor timestamptz, duration text, at timestamptz, zone text) returns timestamptz
language plpgsql immutable as $$
declare
    parts record := sl_duration_parts(duration);
    start timestamptz := sl_calendar_period_start(anchor, duration, at, zone);
    first_day date := (start at time zone zone)::date;
    months integer := coalesce(parts.months, case when parts.seconds = 30 * 86400 then 1 end);
    days bigint := case when parts.seconds % 86400 = 0 then parts.seconds / 86400 end;
begin
    if duration is null then
        return null;
    end if;
    if months is not null then
        return sl_zone_midnight((date_trunc('month', first_day) + make_interval(months => months))::date, zone);
    end if;
    if days is not null then
        return sl_zone_midnight(first_day + days::integer, zone);
    end if;
    return start + make_interval(secs => parts.seconds);
end $$;

-- THE rule: the start of the budget period containing `at`. A budget anchored before
-- `aligned_from` (when calendar periods began, migration 0022) keeps its anchored periods until
-- the one holding `aligned_from` ends; its next period runs from there to the next calendar
-- boundary, and calendar periods follow. A budget anchored since then has calendar periods only.
create or replace function sl_budget_period_start(anchor timestamptz, duration text, at timestamptz, zone text, aligned_from timestamptz) returns timestamptz
language plpgsql immutable as $$
declare
    anchored_end timestamptz;
begin
    if anchor < aligned_from then
        anchored_end := sl_anchored_period_end(anchor, duration, aligned_from);
        if anchored_end is null or at < anchored_end then
            return sl_anchored_period_start(anchor, duration, at);
        end if;
        return greatest(sl_calendar_period_start(anchor, duration, at, zone), anchored_end);
    end if;
    return sl_calendar_period_start(anchor, duration, at, zone);
end $$;

-- The end of that period: the start of the next.
create or replace function sl_budget_period_end(anchor timestamptz, duration text, at timestamptz, zone text, aligned_from timestamptz) returns timestamptz
language plpgsql immutable as $$
declare
    anchored_end timestamptz;
begin
    if anchor < aligned_from then
        anchored_end := sl_anchored_period_end(anchor, duration, aligned_from);
        if anchored_end is null or at < anchored_end then
            return sl_anchored_period_end(anchor, duration, at);
        end if;
    end if;
    return sl_calendar_period_end(anchor, duration, at, zone);
end $$;

-- The rule with this database's calendar (`budget_calendar`: the zone the server was configured
-- with, and when calendar periods began): what admission, leases, webhooks and the info routes call.
create or replace function sl_period_start(anchor timestamptz, duration text, at timestamptz) returns timestamptz
language sql stable as $$
    select sl_budget_period_start(anchor, duration, at, c.timezone, c.aligned_from) from budget_calendar c
$$;

-- Anchors of one class have the same budget periods, whatever the duration (sl_budget_period_start):
-- from the calendar's start (`aligned_from`) only the anchor's day in the budget zone counts; before
-- it, the anchor itself. Readers that need the periods of many scopes compute one per class.
create or replace function sl_period_class(anchor timestamptz) returns text
language sql stable as $$
    select case when anchor < c.aligned_from then anchor::text
                else (anchor at time zone c.timezone)::date::text end
    from budget_calendar c
$$;

create or replace function sl_period_end(anchor timestamptz, duration text, at timestamptz) returns timestamptz
language sql stable as $$
    select sl_budget_period_end(anchor, duration, at, c.timezone, c.aligned_from) from budget_calendar c
$$;

-- The budget period of a scope that `at` falls in, its budget_usage row created by the period's
-- first admission (or lease): what is held and spent in the period is kept on that row.
create or replace function sl_open_period(scope text, scope_id text, anchor timestamptz, duration text, at timestamptz) returns timestamptz
language plpgsql as $$
declare
    period timestamptz := sl_period_start(anchor, duration, at);
begin
    insert into budget_usage (scope, scope_id, period_start)
    values (sl_open_period.scope, sl_open_period.scope_id, period)
    on conflict do nothing;
    return period;
end $$;
