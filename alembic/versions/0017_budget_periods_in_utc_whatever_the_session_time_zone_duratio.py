"""Budget periods in UTC whatever the session time zone; durations as parse_duration reads them

Functions: sl_duration_parts, sl_month_number, sl_period_end, sl_period_start. Written by scripts/sql_migration.py from ledger/sql/, which holds their
current text; the downgrade carries the text the previous revision left.

Revision ID: 0017
Revises: 0016
"""

from alembic import op
from spendledger.ledger.db import execute_script

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

UPGRADE = r"""
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

-- The start of the budget period containing `at`, for periods of `duration` counted from `anchor`:
-- period k starts at anchor + k durations (never compounded from the period before, so Jan 31 →
-- Feb 28 → Mar 31). Months are calendar months in UTC, the day clamped to the month's end, whatever
-- the session's time zone; shorter units are fixed lengths of time. Without a duration there is one
-- period for ever, starting at the epoch.
create or replace function sl_period_start(anchor timestamptz, duration text, at timestamptz) returns timestamptz
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
create or replace function sl_period_end(anchor timestamptz, duration text, at timestamptz) returns timestamptz
language plpgsql immutable as $$
declare
    parts record := sl_duration_parts(duration);
    start timestamp := sl_period_start(anchor, duration, at) at time zone 'UTC';
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
"""

DOWNGRADE = r"""
drop function sl_month_number(t timestamp without time zone);

CREATE OR REPLACE FUNCTION public.sl_duration_parts(duration text, OUT seconds bigint, OUT months integer)
 RETURNS record
 LANGUAGE plpgsql
 IMMUTABLE
AS $function$
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
end $function$;

CREATE OR REPLACE FUNCTION public.sl_period_start(anchor timestamp with time zone, duration text, at timestamp with time zone)
 RETURNS timestamp with time zone
 LANGUAGE plpgsql
 IMMUTABLE
AS $function$
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
end $function$;

CREATE OR REPLACE FUNCTION public.sl_period_end(anchor timestamp with time zone, duration text, at timestamp with time zone)
 RETURNS timestamp with time zone
 LANGUAGE plpgsql
 IMMUTABLE
AS $function$
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
end $function$;
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
