"""The transactional outbox: Lago events and webhooks, written with the usage that causes them.

`sl_record_usage` now also inserts the outbox rows of the request — the Lago event built by the
application (frozen payload, stable transaction_id) and the webhooks (spend_tracked, and each budget
crossing once per period, deduplicated by `unique (sink, dedupe_key)`) — and NOTIFYs publishers.

Revision ID: 0003
Revises: 0002
"""

from alembic import op
from spendledger.ledger.db import execute_script

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UPGRADE = r"""
create table outbox (
    id              bigint generated always as identity primary key,
    sink            text        not null,
    dedupe_key      text        not null,
    payload         jsonb       not null,
    state           text        not null default 'pending'
                    check (state in ('pending', 'delivered', 'dead', 'unbillable')),
    attempts        integer     not null default 0,
    next_attempt_at timestamptz not null default now(),
    last_error      text,
    call_id         text,
    created_at      timestamptz not null default now(),
    delivered_at    timestamptz,
    constraint outbox_sink_dedupe_key unique (sink, dedupe_key)
);
create index outbox_due on outbox (sink, next_attempt_at, id) where state = 'pending';
create index outbox_call on outbox (call_id);

-- One webhook row; a crossing already announced in this period is not announced again.
create function sl_enqueue_webhook(event text, dedupe text, body jsonb, d jsonb) returns void
language sql as $$
    insert into outbox (sink, dedupe_key, payload, call_id)
    values ('webhook', dedupe,
            body || jsonb_build_object(
                'token', d->>'key_hash', 'customer_id', d->>'customer_id', 'user_id', d->>'user_id',
                'team_id', d->>'team_id', 'user_email', null, 'key_alias', d->>'key_alias',
                'projected_exceeded_date', null, 'projected_spend', null, 'event', event,
                'event_id', dedupe, 'created_at', d->>'ended_at'),
            d->>'call_id')
    on conflict (sink, dedupe_key) do nothing
$$;

-- spend_tracked for a customer's request, and budget_crossed / threshold_crossed (85 %, 95 %) /
-- soft_budget_crossed for every scope whose period spend crossed a line with this request.
create function sl_enqueue_webhooks(d jsonb, ctx jsonb) returns void language plpgsql as $$
declare
    s record;
    cost numeric := (d->>'cost')::numeric;
    after numeric;
    before numeric;
    period timestamptz;
    line record;
    total numeric;
    customer_budget numeric;
begin
    for s in select * from sl_request_scopes(ctx || jsonb_build_object(
            'key_hash', d->>'key_hash', 'user_id', d->>'user_id', 'team_id', d->>'team_id',
            'customer_id', d->>'customer_id')) loop
        select (r->>2)::timestamptz into period
        from jsonb_array_elements(coalesce(d->'budget_periods', '[]')) as r
        where r->>0 = s.scope and r->>1 = s.scope_id;
        if s.scope = 'customer' then
            customer_budget := s.max_budget;
            if period is not null then
                select spent into total from budget_usage
                where scope = 'customer' and scope_id = s.scope_id and period_start = period;
            else
                select spend into total from spend_totals where scope = 'customer' and scope_id = s.scope_id;
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
            select spend into after from spend_totals where scope = s.scope and scope_id = s.scope_id;
        else
            select spent into after from budget_usage
            where scope = s.scope and scope_id = s.scope_id and period_start = period;
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
        perform sl_enqueue_webhook('spend_tracked', 'spend_tracked:' || (d->>'call_id'),
            jsonb_build_object(
                'spend', cost, 'max_budget', customer_budget, 'event_group', 'customer',
                'total_spend', trim_scale(coalesce(total, cost)),
                'event_message', 'Customer spend tracked. Customer=' || (d->>'customer_id')
                                 || ', spend=' || trim_scale(cost)),
            d);
    end if;
end $$;

-- Settle one request whose rows sl_lock_for_settle has locked: release its hold, append
-- UsageRecorded, project it, count its tokens, and write its outbox rows. Returns the key's spend.
create function sl_settle(d jsonb, meta jsonb, ctx jsonb, outbox_rows jsonb) returns numeric
language plpgsql as $$
declare
    r jsonb;
    key_spend numeric;
begin
    for r in select jsonb_array_elements(sl_release_hold(d->>'call_id')) loop
        insert into rate_usage as u (scope, scope_id, window_start, tokens)
        values (r->>0, r->>1, date_trunc('minute', now()), (d->>'total_tokens')::bigint)
        on conflict (scope, scope_id, window_start) do update set tokens = u.tokens + excluded.tokens;
    end loop;
    insert into events (stream, version, type, data, metadata)
    values ('request:' || (d->>'call_id'), 1, 'UsageRecorded', d, meta);
    perform sl_apply_usage(d);
    insert into outbox (sink, dedupe_key, payload, state, call_id)
    select o->>'sink', o->>'dedupe_key', o->'payload', o->>'state', d->>'call_id'
    from jsonb_array_elements(coalesce(outbox_rows, '[]')) as o;
    if coalesce((ctx->>'webhooks')::boolean, false) then
        perform sl_enqueue_webhooks(d, ctx);
    end if;
    if jsonb_array_length(coalesce(outbox_rows, '[]')) > 0 or coalesce((ctx->>'webhooks')::boolean, false) then
        perform pg_notify('sl_outbox', '');
    end if;
    select trim_scale(t.spend) into key_spend from spend_totals t
    where t.scope = 'key' and t.scope_id = d->>'key_hash';
    return key_spend;
end $$;

-- Record a batch of requests in one transaction and one round trip (group commit: many settles,
-- one WAL flush). Customers first seen are created first, in id order; then every row the batch
-- changes is locked in the global order; then each request is settled. Returns each key's spend.
create function sl_record_usages(ds jsonb, metas jsonb, ctx jsonb, outboxes jsonb)
returns table (idx integer, key_spend numeric)
language plpgsql as $$
declare
    c record;
begin
    for c in
        select d->>'customer_id' as customer, min(i) as first
        from jsonb_array_elements(ds) with ordinality as e(d, i)
        where d->>'customer_id' is not null
        group by 1 order by 1
    loop
        perform sl_customer_first_seen(c.customer, ctx->>'default_budget_id', metas->(c.first::integer - 1));
    end loop;
    perform sl_lock_for_settle(
        array(select d->>'call_id' from jsonb_array_elements(ds) as d),
        (select coalesce(jsonb_agg(r), '[]') from jsonb_array_elements(ds) as d,
                jsonb_array_elements(coalesce(d->'budget_periods', '[]')) as r));
    for i in 0 .. jsonb_array_length(ds) - 1 loop
        idx := i;
        key_spend := sl_settle(ds->i, metas->i, ctx, outboxes->i);
        return next;
    end loop;
end $$;
"""

DOWNGRADE = """
drop function sl_record_usages(jsonb, jsonb, jsonb, jsonb);
drop function sl_settle(jsonb, jsonb, jsonb, jsonb);
drop function sl_enqueue_webhooks(jsonb, jsonb);
drop function sl_enqueue_webhook(text, text, jsonb, jsonb);
drop table outbox;
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
