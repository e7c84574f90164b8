"""The webhook rows of a settle batch in one statement.

`sl_settle_values` wrote them request by request (`sl_enqueue_webhooks_after`: a PL/pgSQL loop over
each request's scopes, a query for its budget period and one for the lines it crossed, then its
`spend_tracked` row): about half of a settle's time in PostgreSQL at batches of 25. Now one INSERT
writes them all: each distinct set of scope ids is resolved once, each request's values come from
the running sums already computed, and the rows go in request by request in the order the loop
wrote them (for each request its crossings, scope by scope and line by line, then its
`spend_tracked`), with the same payloads and dedupe keys.

Revision ID: 0007
Revises: 0006
"""

from alembic import op
from spendledger.ledger.db import execute_script

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# Every statement this revision runs, in full: it stands alone, reading no other revision.
UPGRADE = r"""
-- Count each request's cost into `vals` in order (a running sum per key: one query for the batch)
-- and write the batch's webhook rows (one statement); the key spends.
create or replace function sl_settle_values(ds jsonb, ctx jsonb, vals jsonb) returns numeric[]
language plpgsql as $$
declare
    after_each jsonb[];  -- per request: the values of its keys once it is counted
    spends numeric[];
begin
    select array_agg(v order by i), array_agg(trim_scale((v->>('l|key|' || key_hash))::numeric) order by i)
    into after_each, spends
    from (
        select x.i, x.key_hash, jsonb_object_agg(x.k, coalesce((vals->>x.k)::numeric, 0) + x.running) as v
        from (
            select e.i, e.d->>'key_hash' as key_hash, k,
                   sum((e.d->>'cost')::numeric) over (partition by k order by e.i) as running
            from jsonb_array_elements(ds) with ordinality as e(d, i), sl_usage_value_keys(e.d) as k
        ) as x
        group by x.i, x.key_hash
    ) as y;
    if not coalesce((ctx->>'webhooks')::boolean, false) then
        return spends;
    end if;
    with req as (
        select e.i, e.d, after_each[e.i] as request_values, (e.d->>'cost')::numeric as cost,
               e.d->>'key_hash' as key_hash, e.d->>'user_id' as user_id, e.d->>'team_id' as team_id,
               e.d->>'customer_id' as customer_id
        from jsonb_array_elements(ds) with ordinality as e(d, i)
    ), ids as (
        select distinct key_hash, user_id, team_id, customer_id from req
    ), scopes as (  -- each distinct set of scope ids resolved once, not once per request
        select ids.*, s.*
        from ids, sl_request_scopes(ctx || jsonb_build_object(
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
        select i, ord, n, d, event,
               event || ':' || scope || ':' || scope_id || ':' || extract(epoch from period)::bigint || ':' || tag
                   as dedupe,
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
    return spends;
end $$;

-- Superseded by the statement above.
drop function sl_enqueue_webhooks_after(jsonb, jsonb, jsonb);
"""

DOWNGRADE = r"""
-- Webhook rows of one settled request, as sl_enqueue_webhooks writes them, from `vals`: the spend
-- of its budget periods ('p|scope|id|period') and its scopes' lifetime spend ('l|scope|id') once
-- this request is counted.
create function sl_enqueue_webhooks_after(d jsonb, ctx jsonb, vals jsonb) returns void language plpgsql as $$
declare
    s record;
    cost numeric := (d->>'cost')::numeric;
    after numeric;
    before numeric;
    period timestamptz;
    line record;
    total numeric;
    customer_budget numeric;
    period_key text;
begin
    for s in select * from sl_request_scopes(ctx || jsonb_build_object(
            'key_hash', d->>'key_hash', 'user_id', d->>'user_id', 'team_id', d->>'team_id',
            'customer_id', d->>'customer_id')) loop
        select (r->>2)::timestamptz into period
        from jsonb_array_elements(coalesce(d->'budget_periods', '[]')) as r
        where r->>0 = s.scope and r->>1 = s.scope_id;
        period_key := 'p|' || s.scope || '|' || s.scope_id || '|' || period::text;
        if s.scope = 'customer' then
            customer_budget := s.max_budget;
            if period is not null then
                total := (vals->>period_key)::numeric;
            else
                total := (vals->>('l|customer|' || s.scope_id))::numeric;
            end if;
        end if;
        if cost <= 0 or (period is null and (s.soft_budget is null or s.max_budget is not null
                                             or s.budget_duration is not null)) then
            continue;
        end if;
        if period is null then
            -- A soft budget alone has no budget period (admission tracks none): its line is on
            -- the lifetime spend, as /customer/info shows it.
            period := 'epoch';
            after := (vals->>('l|' || s.scope || '|' || s.scope_id))::numeric;
        else
            after := (vals->>period_key)::numeric;
        end if;
        before := after - cost;
        for line in
            select * from (values
                ('budget_crossed', s.max_budget, 'max'),
                ('threshold_crossed', s.max_budget * 0.85, '85'),
                ('threshold_crossed', s.max_budget * 0.95, '95'),
                ('soft_budget_crossed', s.soft_budget, 'soft')) as l(event, amount, tag)
            where l.amount is not null and before < l.amount and after >= l.amount
        loop
            perform sl_enqueue_webhook(line.event,
                line.event || ':' || s.scope || ':' || s.scope_id || ':' || extract(epoch from period)::bigint || ':' || line.tag,
                jsonb_build_object(
                    'spend', trim_scale(after), 'max_budget', s.max_budget, 'soft_budget', s.soft_budget,
                    'event_group', s.scope,
                    'event_message', initcap(s.scope) || ' ' || replace(line.event, '_', ' ') || '. '
                        || initcap(s.scope) || '=' || s.scope_id || ', spend=' || trim_scale(after)
                        || ', max_budget=' || coalesce(s.max_budget::text, 'null')
                        || case when line.tag in ('85', '95') then ', threshold=' || line.tag || '%' else '' end,
                    'budget_reset_at', sl_period_end(s.anchor, s.budget_duration, period)),
                d);
        end loop;
    end loop;
    if d->>'customer_id' is not null then
        -- A plain insert: a call is settled once (its UsageRecorded is unique), so its
        -- spend_tracked cannot exist yet. The payload is sl_enqueue_webhook's, built in one go.
        insert into outbox (sink, dedupe_key, payload, call_id)
        values ('webhook', 'spend_tracked:' || (d->>'call_id'), jsonb_build_object(
                'spend', cost, 'max_budget', customer_budget, 'event_group', 'customer',
                'total_spend', trim_scale(coalesce(total, cost)),
                'event_message', 'Customer spend tracked. Customer=' || (d->>'customer_id')
                                 || ', spend=' || trim_scale(cost),
                'token', d->>'key_hash', 'customer_id', d->>'customer_id', 'user_id', d->>'user_id',
                'team_id', d->>'team_id', 'user_email', null, 'key_alias', d->>'key_alias',
                'projected_exceeded_date', null, 'projected_spend', null, 'event', 'spend_tracked',
                'event_id', 'spend_tracked:' || (d->>'call_id'), 'created_at', d->>'ended_at'),
            d->>'call_id');
    end if;
end $$;

-- Count each request's cost into `vals` in order (a running sum per key: one query for the batch)
-- and write its webhook rows; the key spends.
create or replace function sl_settle_values(ds jsonb, ctx jsonb, vals jsonb) returns numeric[]
language plpgsql as $$
declare
    after jsonb[];
    spends numeric[];
begin
    select array_agg(v order by i), array_agg(trim_scale((v->>('l|key|' || key_hash))::numeric) order by i)
    into after, spends
    from (
        select x.i, x.key_hash, jsonb_object_agg(x.k, coalesce((vals->>x.k)::numeric, 0) + x.running) as v
        from (
            select e.i, e.d->>'key_hash' as key_hash, k,
                   sum((e.d->>'cost')::numeric) over (partition by k order by e.i) as running
            from jsonb_array_elements(ds) with ordinality as e(d, i), sl_usage_value_keys(e.d) as k
        ) as x
        group by x.i, x.key_hash
    ) as y;
    if coalesce((ctx->>'webhooks')::boolean, false) then
        for i in 1 .. jsonb_array_length(ds) loop
            perform sl_enqueue_webhooks_after(ds->(i - 1), ctx, after[i]);
        end loop;
    end if;
    return spends;
end $$;
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
