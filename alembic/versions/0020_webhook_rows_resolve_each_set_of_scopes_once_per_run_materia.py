"""webhook rows resolve each set of scopes once per run (materialized), not once per request

Functions: sl_webhook_rows. Written by scripts/sql_migration.py from ledger/sql/, which holds their
current text; the downgrade carries the text the previous revision left.

Revision ID: 0020
Revises: 0019
"""

from alembic import op
from spendledger.ledger.db import execute_script

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None

UPGRADE = r"""
-- Write the webhook rows of a run of usage events, in log order: `spend_tracked` for each request
-- with a customer, and each budget line (85 %, 95 %, max, soft) a request's spend crossed, against
-- the limits in force where the run stands in the log (sl_request_scopes_as_of). `vals` holds the
-- scopes' spend before the run (sl_usage_value_keys' keys); each request's cost is counted into it
-- in order (a running sum per key: one query for the run), and the rows are one statement.
create or replace function sl_webhook_rows(ds jsonb, ctx jsonb, vals jsonb) returns void
language plpgsql as $$
declare
    after_each jsonb[];  -- per request: the values of its keys once it is counted
begin
    select array_agg(v order by i)
    into after_each
    from (
        select x.i, jsonb_object_agg(x.k, coalesce((vals->>x.k)::numeric, 0) + x.running) as v
        from (
            select e.i, k, sum((e.d->>'cost')::numeric) over (partition by k order by e.i) as running
            from jsonb_array_elements(ds) with ordinality as e(d, i), sl_usage_value_keys(e.d) as k
        ) as x
        group by x.i
    ) as y;
    with req as (
        select e.i, e.d, after_each[e.i] as request_values, (e.d->>'cost')::numeric as cost,
               e.d->>'key_hash' as key_hash, e.d->>'user_id' as user_id, e.d->>'team_id' as team_id,
               e.d->>'customer_id' as customer_id
        from jsonb_array_elements(ds) with ordinality as e(d, i)
    ), ids as (
        select distinct key_hash, user_id, team_id, customer_id from req
    ), scopes as materialized (
        -- each distinct set of scope ids resolved once: inlined into the join below, the function
        -- ran again for every request of the run
        select ids.*, s.*
        from ids, sl_request_scopes_as_of(ctx || jsonb_build_object(
            'key_hash', ids.key_hash, 'user_id', ids.user_id, 'team_id', ids.team_id,
            'customer_id', ids.customer_id)) as s
    ), per_scope as (
        select req.i, req.d, req.cost, s.ord, s.scope, s.scope_id, s.max_budget, s.soft_budget,
               s.budget_duration, s.anchor, p.period,
               (req.request_values->>(
                   case when p.period is null then 'l|' || s.scope || '|' || s.scope_id
                        else 'p|' || s.scope || '|' || s.scope_id || '|' || p.period::text end
               ))::numeric as after  -- the scope's spend once this request is counted
        from req
        join scopes as s on (s.key_hash, s.user_id, s.team_id, s.customer_id)
                            is not distinct from (req.key_hash, req.user_id, req.team_id, req.customer_id)
        left join lateral (
            select (r->>2)::timestamptz as period
            from jsonb_array_elements(coalesce(req.d->'budget_periods', '[]')) as r
            where r->>0 = s.scope and r->>1 = s.scope_id
        ) as p on true
    ), crossed as (
        -- A soft budget alone has no budget period (admission tracks none): its line is on the
        -- lifetime spend, as /customer/info shows it, and its period is 'epoch'.
        select c.i, c.d, c.ord, l.n, l.event, l.tag, c.scope, c.scope_id, c.max_budget, c.soft_budget, c.after,
               coalesce(c.period, 'epoch') as period, c.anchor, c.budget_duration
        from per_scope as c,
             lateral (values (1, 'budget_crossed', c.max_budget, 'max'),
                     (2, 'threshold_crossed', c.max_budget * 0.85, '85'),
                     (3, 'threshold_crossed', c.max_budget * 0.95, '95'),
                     (4, 'soft_budget_crossed', c.soft_budget, 'soft')) as l(n, event, amount, tag)
        where c.cost > 0
          and (c.period is not null or (c.soft_budget is not null and c.max_budget is null
                                        and c.budget_duration is null))
          and l.amount is not null and c.after - c.cost < l.amount and c.after >= l.amount
    ), crossing_rows as (
        select i, ord, n, d, event, sl_crossing_key(event, scope, scope_id, period, tag) as dedupe,
               jsonb_build_object(
                   'spend', trim_scale(after), 'max_budget', max_budget, 'soft_budget', soft_budget,
                   'event_group', scope,
                   'event_message', initcap(scope) || ' ' || replace(event, '_', ' ') || '. '
                       || initcap(scope) || '=' || scope_id || ', spend=' || trim_scale(after)
                       || ', max_budget=' || coalesce(max_budget::text, 'null')
                       || case when tag in ('85', '95') then ', threshold=' || tag || '%' else '' end,
                   'budget_reset_at', sl_period_end(anchor, budget_duration, period)) as body
        from crossed
    ), tracked_rows as (
        -- spend_tracked for every request with a customer; total_spend is the customer's spend
        -- of the period (or lifetime) once this request is counted.
        select req.i, 99 as ord, 0 as n, req.d, 'spend_tracked' as event,
               'spend_tracked:' || (req.d->>'call_id') as dedupe,
               jsonb_build_object(
                   'spend', req.cost, 'max_budget', c.max_budget, 'event_group', 'customer',
                   'total_spend', trim_scale(coalesce(c.after, req.cost)),
                   'event_message', 'Customer spend tracked. Customer=' || req.customer_id
                                    || ', spend=' || trim_scale(req.cost)) as body
        from req
        left join per_scope as c on c.i = req.i and c.scope = 'customer'
        where req.customer_id is not null
    )
    insert into outbox (sink, dedupe_key, payload, call_id)
    select 'webhook', w.dedupe,
           w.body || jsonb_build_object(
               'token', w.d->>'key_hash', 'customer_id', w.d->>'customer_id', 'user_id', w.d->>'user_id',
               'team_id', w.d->>'team_id', 'user_email', null, 'key_alias', w.d->>'key_alias',
               'projected_exceeded_date', null, 'projected_spend', null, 'event', w.event,
               'event_id', w.dedupe, 'created_at', w.d->>'ended_at'),
           w.d->>'call_id'
    from (select * from crossing_rows union all select * from tracked_rows) as w
    order by w.i, w.ord, w.n
    -- a line already announced in this period is not announced again (a call is settled once,
    -- so its spend_tracked cannot exist yet)
    on conflict (sink, dedupe_key) do nothing;
end $$;
"""

DOWNGRADE = r"""
CREATE OR REPLACE FUNCTION public.sl_webhook_rows(ds jsonb, ctx jsonb, vals jsonb)
 RETURNS void
 LANGUAGE plpgsql
AS $function$
declare
    after_each jsonb[];  -- per request: the values of its keys once it is counted
begin
    select array_agg(v order by i)
    into after_each
    from (
        select x.i, jsonb_object_agg(x.k, coalesce((vals->>x.k)::numeric, 0) + x.running) as v
        from (
            select e.i, k, sum((e.d->>'cost')::numeric) over (partition by k order by e.i) as running
            from jsonb_array_elements(ds) with ordinality as e(d, i), sl_usage_value_keys(e.d) as k
        ) as x
        group by x.i
    ) as y;
    with req as (
        select e.i, e.d, after_each[e.i] as request_values, (e.d->>'cost')::numeric as cost,
               e.d->>'key_hash' as key_hash, e.d->>'user_id' as user_id, e.d->>'team_id' as team_id,
               e.d->>'customer_id' as customer_id
        from jsonb_array_elements(ds) with ordinality as e(d, i)
    ), ids as (
        select distinct key_hash, user_id, team_id, customer_id from req
    ), scopes as (  -- each distinct set of scope ids resolved once, not once per request
        select ids.*, s.*
        from ids, sl_request_scopes_as_of(ctx || jsonb_build_object(
            'key_hash', ids.key_hash, 'user_id', ids.user_id, 'team_id', ids.team_id,
            'customer_id', ids.customer_id)) as s
    ), per_scope as (
        select req.i, req.d, req.cost, s.ord, s.scope, s.scope_id, s.max_budget, s.soft_budget,
               s.budget_duration, s.anchor, p.period,
               (req.request_values->>(
                   case when p.period is null then 'l|' || s.scope || '|' || s.scope_id
                        else 'p|' || s.scope || '|' || s.scope_id || '|' || p.period::text end
               ))::numeric as after  -- the scope's spend once this request is counted
        from req
        join scopes as s on (s.key_hash, s.user_id, s.team_id, s.customer_id)
                            is not distinct from (req.key_hash, req.user_id, req.team_id, req.customer_id)
        left join lateral (
            select (r->>2)::timestamptz as period
            from jsonb_array_elements(coalesce(req.d->'budget_periods', '[]')) as r
            where r->>0 = s.scope and r->>1 = s.scope_id
        ) as p on true
    ), crossed as (
        -- A soft budget alone has no budget period (admission tracks none): its line is on the
        -- lifetime spend, as /customer/info shows it, and its period is 'epoch'.
        select c.i, c.d, c.ord, l.n, l.event, l.tag, c.scope, c.scope_id, c.max_budget, c.soft_budget, c.after,
               coalesce(c.period, 'epoch') as period, c.anchor, c.budget_duration
        from per_scope as c,
             lateral (values (1, 'budget_crossed', c.max_budget, 'max'),
                     (2, 'threshold_crossed', c.max_budget * 0.85, '85'),
                     (3, 'threshold_crossed', c.max_budget * 0.95, '95'),
                     (4, 'soft_budget_crossed', c.soft_budget, 'soft')) as l(n, event, amount, tag)
        where c.cost > 0
          and (c.period is not null or (c.soft_budget is not null and c.max_budget is null
                                        and c.budget_duration is null))
          and l.amount is not null and c.after - c.cost < l.amount and c.after >= l.amount
    ), crossing_rows as (
        select i, ord, n, d, event, sl_crossing_key(event, scope, scope_id, period, tag) as dedupe,
               jsonb_build_object(
                   'spend', trim_scale(after), 'max_budget', max_budget, 'soft_budget', soft_budget,
                   'event_group', scope,
                   'event_message', initcap(scope) || ' ' || replace(event, '_', ' ') || '. '
                       || initcap(scope) || '=' || scope_id || ', spend=' || trim_scale(after)
                       || ', max_budget=' || coalesce(max_budget::text, 'null')
                       || case when tag in ('85', '95') then ', threshold=' || tag || '%' else '' end,
                   'budget_reset_at', sl_period_end(anchor, budget_duration, period)) as body
        from crossed
    ), tracked_rows as (
        -- spend_tracked for every request with a customer; total_spend is the customer's spend
        -- of the period (or lifetime) once this request is counted.
        select req.i, 99 as ord, 0 as n, req.d, 'spend_tracked' as event,
               'spend_tracked:' || (req.d->>'call_id') as dedupe,
               jsonb_build_object(
                   'spend', req.cost, 'max_budget', c.max_budget, 'event_group', 'customer',
                   'total_spend', trim_scale(coalesce(c.after, req.cost)),
                   'event_message', 'Customer spend tracked. Customer=' || req.customer_id
                                    || ', spend=' || trim_scale(req.cost)) as body
        from req
        left join per_scope as c on c.i = req.i and c.scope = 'customer'
        where req.customer_id is not null
    )
    insert into outbox (sink, dedupe_key, payload, call_id)
    select 'webhook', w.dedupe,
           w.body || jsonb_build_object(
               'token', w.d->>'key_hash', 'customer_id', w.d->>'customer_id', 'user_id', w.d->>'user_id',
               'team_id', w.d->>'team_id', 'user_email', null, 'key_alias', w.d->>'key_alias',
               'projected_exceeded_date', null, 'projected_spend', null, 'event', w.event,
               'event_id', w.dedupe, 'created_at', w.d->>'ended_at'),
           w.d->>'call_id'
    from (select * from crossing_rows union all select * from tracked_rows) as w
    order by w.i, w.ord, w.n
    -- a line already announced in this period is not announced again (a call is settled once,
    -- so its spend_tracked cannot exist yet)
    on conflict (sink, dedupe_key) do nothing;
end $function$;
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
