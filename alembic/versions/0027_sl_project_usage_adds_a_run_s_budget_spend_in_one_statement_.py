"""sl_project_usage adds a run's budget spend in one statement when it gives nothing back

Functions: sl_project_usage. Written by scripts/sql_migration.py from ledger/sql/, which holds their
current text; the downgrade carries the text the previous revision left.

Revision ID: 0027
Revises: 0026
"""

from alembic import op
from spendledger.ledger.db import execute_script

revision = "0027"
down_revision = "0026"
branch_labels = None
depends_on = None

UPGRADE = r"""
-- The usage projection: what a run of UsageRecorded events (`ds`, in log order: an array of jsonb,
-- which a replay builds far faster than one JSON array) adds to the tables they project to —
-- each scope's lifetime totals (spend_totals: sl_usage_scopes) and each budget period's spend
-- (budget_usage: sl_usage_periods) — and, given back, what their admissions held (`released`: call
-- id → the hold or lease share released for it: `amount` off its budget rows' `held`, its rate
-- windows' tokens, its in-flight slots). Each row is written once for the run, in the global order
-- (lifetime totals; then scope by scope its budget periods, its rate window, its in-flight count),
-- the order admissions lock them in, so that settles and admissions never wait on each other in a
-- circle. The settles (sl_record_usage for one request, sl_record_usages for a batch) and the rebuild
-- (projections/rebuild.py: every event, nothing released, its own tables first on the
-- search_path) all project through it. Returns each lifetime total once the run is counted (read
-- under its row's lock), by 'l|scope|id'.
create or replace function sl_project_usage(ds jsonb[], released jsonb) returns jsonb
language plpgsql as $$
declare
    w record;
    totals jsonb;
begin
    with ev as (
        select d, (d->>'cost')::numeric as cost, (d->>'input_tokens')::bigint as input_tokens,
               (d->>'output_tokens')::bigint as output_tokens, (d->>'ended_at')::timestamptz as ended_at
        from unnest(ds) as d
        offset 0  -- each field read once per event, not once per scope
    ), up as (
        insert into spend_totals as t (scope, scope_id, spend, requests, input_tokens, output_tokens, last_at)
        select s.scope, s.scope_id, sum(ev.cost), count(*), sum(ev.input_tokens), sum(ev.output_tokens),
               max(ev.ended_at)
        from ev, sl_usage_scopes(ev.d) as s
        group by 1, 2
        order by 1, 2
        on conflict (scope, scope_id) do update set
            spend = t.spend + excluded.spend,
            requests = t.requests + excluded.requests,
            input_tokens = t.input_tokens + excluded.input_tokens,
            output_tokens = t.output_tokens + excluded.output_tokens,
            last_at = greatest(t.last_at, excluded.last_at)
        returning t.scope, t.scope_id, t.spend
    )
    select jsonb_object_agg('l|' || up.scope || '|' || up.scope_id, up.spend) into totals from up;
    if released = '{}' then
        -- Nothing given back (usage ingested without a hold, a rebuild): only budget periods'
        -- spend to add, in one statement, in the same order.
        insert into budget_usage as b (scope, scope_id, period_start, spent)
        select p.scope, p.scope_id, p.period_start, sum((d->>'cost')::numeric)
        from unnest(ds) as d, sl_usage_periods(d) as p
        group by 1, 2, 3
        order by sl_scope_rank(p.scope), 2, 3
        on conflict (scope, scope_id, period_start) do update set spent = b.spent + excluded.spent;
        return totals;
    end if;
    for w in
        with budget as (
            select p.scope, p.scope_id, p.period_start as period, (d->>'cost')::numeric as spent, 0::numeric as held
            from unnest(ds) as d, sl_usage_periods(d) as p
            union all
            select r->>0, r->>1, (r->>2)::timestamptz, 0, (h.value->>'amount')::numeric
            from jsonb_each(released) as h, jsonb_array_elements(coalesce(h.value->'budget_rows', '[]')) as r
        ), shared as (
            select scope, scope_id, 0 as kind, period, sum(spent) as spent, sum(held) as held,
                   0::bigint as tokens, 0::bigint as slots
            from budget group by scope, scope_id, period
            union all
            select r->>0, r->>1, 1, null, 0, 0, sum((d->>'total_tokens')::bigint), 0
            from unnest(ds) as d,
                 jsonb_array_elements(coalesce(released->(d->>'call_id')->'tpm_rows', '[]')) as r
            group by 1, 2
            union all
            select r->>0, r->>1, 2, null, 0, 0, 0, count(*)
            from jsonb_each(released) as h, jsonb_array_elements(coalesce(h.value->'parallel_rows', '[]')) as r
            group by 1, 2
        )
        select * from shared order by sl_scope_rank(scope), scope_id, kind, period
    loop
        if w.kind = 0 then
            insert into budget_usage as b (scope, scope_id, period_start, spent)
            values (w.scope, w.scope_id, w.period, w.spent)
            on conflict (scope, scope_id, period_start) do update
            set spent = b.spent + excluded.spent, held = greatest(b.held - w.held, 0);
        elsif w.kind = 1 then
            insert into rate_usage as u (scope, scope_id, window_start, tokens)
            values (w.scope, w.scope_id, date_trunc('minute', now()), w.tokens)
            on conflict (scope, scope_id, window_start) do update set tokens = u.tokens + excluded.tokens;
        else
            update in_flight set count = greatest(count - w.slots, 0)
            where scope = w.scope and scope_id = w.scope_id;
        end if;
    end loop;
    return totals;
end $$;
"""

DOWNGRADE = r"""
CREATE OR REPLACE FUNCTION public.sl_project_usage(ds jsonb[], released jsonb)
 RETURNS jsonb
 LANGUAGE plpgsql
AS $function$
declare
    w record;
    totals jsonb;
begin
    with ev as (
        select d, (d->>'cost')::numeric as cost, (d->>'input_tokens')::bigint as input_tokens,
               (d->>'output_tokens')::bigint as output_tokens, (d->>'ended_at')::timestamptz as ended_at
        from unnest(ds) as d
        offset 0  -- each field read once per event, not once per scope
    ), up as (
        insert into spend_totals as t (scope, scope_id, spend, requests, input_tokens, output_tokens, last_at)
        select s.scope, s.scope_id, sum(ev.cost), count(*), sum(ev.input_tokens), sum(ev.output_tokens),
               max(ev.ended_at)
        from ev, sl_usage_scopes(ev.d) as s
        group by 1, 2
        order by 1, 2
        on conflict (scope, scope_id) do update set
            spend = t.spend + excluded.spend,
            requests = t.requests + excluded.requests,
            input_tokens = t.input_tokens + excluded.input_tokens,
            output_tokens = t.output_tokens + excluded.output_tokens,
            last_at = greatest(t.last_at, excluded.last_at)
        returning t.scope, t.scope_id, t.spend
    )
    select jsonb_object_agg('l|' || up.scope || '|' || up.scope_id, up.spend) into totals from up;
    for w in
        with budget as (
            select p.scope, p.scope_id, p.period_start as period, (d->>'cost')::numeric as spent, 0::numeric as held
            from unnest(ds) as d, sl_usage_periods(d) as p
            union all
            select r->>0, r->>1, (r->>2)::timestamptz, 0, (h.value->>'amount')::numeric
            from jsonb_each(released) as h, jsonb_array_elements(coalesce(h.value->'budget_rows', '[]')) as r
        ), shared as (
            select scope, scope_id, 0 as kind, period, sum(spent) as spent, sum(held) as held,
                   0::bigint as tokens, 0::bigint as slots
            from budget group by scope, scope_id, period
            union all
            select r->>0, r->>1, 1, null, 0, 0, sum((d->>'total_tokens')::bigint), 0
            from unnest(ds) as d,
                 jsonb_array_elements(coalesce(released->(d->>'call_id')->'tpm_rows', '[]')) as r
            group by 1, 2
            union all
            select r->>0, r->>1, 2, null, 0, 0, 0, count(*)
            from jsonb_each(released) as h, jsonb_array_elements(coalesce(h.value->'parallel_rows', '[]')) as r
            group by 1, 2
        )
        select * from shared order by sl_scope_rank(scope), scope_id, kind, period
    loop
        if w.kind = 0 then
            insert into budget_usage as b (scope, scope_id, period_start, spent)
            values (w.scope, w.scope_id, w.period, w.spent)
            on conflict (scope, scope_id, period_start) do update
            set spent = b.spent + excluded.spent, held = greatest(b.held - w.held, 0);
        elsif w.kind = 1 then
            insert into rate_usage as u (scope, scope_id, window_start, tokens)
            values (w.scope, w.scope_id, date_trunc('minute', now()), w.tokens)
            on conflict (scope, scope_id, window_start) do update set tokens = u.tokens + excluded.tokens;
        else
            update in_flight set count = greatest(count - w.slots, 0)
            where scope = w.scope and scope_id = w.scope_id;
        end if;
    end loop;
    return totals;
end $function$;
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
