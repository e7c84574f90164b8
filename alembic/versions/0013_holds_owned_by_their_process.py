"""Holds know the process that took them; no hold is negative; no settle gives back more than it held.

- `holds.owner`: the serving process that took the hold or lease, read from the connection's
  `application_name` (each serving process names its pool connections `spendledger:<uuid>`), so no
  admission function changes. Every serving process beats in `process_heartbeats`;
  `sl_release_orphaned_holds` gives back the holds of a process that stopped beating — a server
  killed mid-stream no longer blocks its budgets until the holds' expiry (up to 10.5 minutes for a
  stream), only until the others notice it is gone.
- `holds.amount >= 0`: a negative hold would lower a budget's held total and let others overspend.
  The API refuses the requests that could produce one; the table refuses what slips through.
- A request drawn from a lease gives back at most its own hold (`least(cost, hold)`): a request that
  cost more than its hold is recorded in full (its `spent`), but it does not release room that other
  requests of the lease hold (`sl_record_usage` for one request, `sl_draw_leases` for a batch).

Revision ID: 0013
Revises: 0012
"""

from alembic import op
from spendledger.ledger.db import execute_script

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

UPGRADE = r"""
update holds set amount = 0 where amount < 0;
alter table holds add constraint holds_amount_not_negative check (amount >= 0);
alter table holds add column owner text default nullif(current_setting('application_name'), '');
create index holds_owner on holds (owner) where owner is not null;

-- When each serving process last showed it was alive (every few seconds, from its sweeper).
create table process_heartbeats (
    owner   text primary key,
    seen_at timestamptz not null
);

-- Beat for `me`; when `release` (the caller has been beating for at least `stale_after`, so every
-- live process has had the time to beat too), give back the holds of processes that have not
-- beaten for `stale_after`, and forget them. Returns how many holds were released.
create function sl_release_orphaned_holds(me text, stale_after interval, release boolean) returns integer
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

-- What a batch's leased requests draw from their leases, as sl_record_usages's `released` map
-- (call id → the amount to take off `held` and the budget rows it is held on): each request at
-- most its own hold, whatever it cost.
create or replace function sl_draw_leases(ds jsonb, metas jsonb) returns jsonb language sql as $$
    with drawn as (
        select e.d->>'call_id' as call_id, metas->(e.i::integer - 1)->>'lease' as lease,
               least((e.d->>'cost')::numeric, coalesce((e.d->>'hold')::numeric, (e.d->>'cost')::numeric)) as cost
        from jsonb_array_elements(ds) with ordinality as e(d, i)
        where metas->(e.i::integer - 1) ? 'lease'
    ), leases as (
        update holds as h set amount = greatest(h.amount - x.total, 0)
        from (select lease, sum(cost) as total from drawn group by lease) as x
        where h.call_id = x.lease
        returning h.call_id, h.budget_rows
    )
    select coalesce(jsonb_object_agg(drawn.call_id, jsonb_build_object(
               'amount', drawn.cost, 'budget_rows', leases.budget_rows)), '{}')
    from drawn join leases on leases.call_id = drawn.lease
$$;

-- Record one request: its event (marked for the webhook follower when ctx.webhooks), its Lago
-- row, its lifetime totals, then its shared rows in the global order (budget periods and the
-- hold or lease it draws from, rate window, in-flight count). Returns the key's new lifetime spend.
create or replace function sl_record_usage(d jsonb, meta jsonb, ctx jsonb, outbox_rows jsonb) returns numeric
language plpgsql set plan_cache_mode = force_generic_plan as $$
declare
    call text := d->>'call_id';
    cost numeric := (d->>'cost')::numeric;
    -- what it gives back of a lease: its own hold at most, whatever it cost
    drawn numeric := least(cost, coalesce((d->>'hold')::numeric, cost));
    webhooks boolean := coalesce((ctx->>'webhooks')::boolean, false);
    h holds;
    w record;
    key_spend numeric;
begin
    perform sl_customer_first_seen(d->>'customer_id', ctx->>'default_budget_id', meta);
    delete from holds where call_id = call returning * into h;
    if not found and meta ? 'lease' then  -- admitted under a lease: draw the cost from it
        update holds set amount = greatest(amount - drawn, 0) where call_id = meta->>'lease'
        returning call, drawn, budget_rows, '[]'::jsonb, '[]'::jsonb, expires_at, created_at, owner into h;
    end if;
    insert into events (stream, version, type, data, metadata)
    values ('request:' || call, 1, 'UsageRecorded', d,
            case when webhooks then meta || '{"webhooks": true}' else meta end);
    insert into outbox (sink, dedupe_key, payload, state, call_id)
    select o->>'sink', o->>'dedupe_key', o->'payload', o->>'state', call
    from jsonb_array_elements(outbox_rows) as o;
    with up as (
        insert into spend_totals as t (scope, scope_id, spend, requests, input_tokens, output_tokens, last_at)
        select s.scope, s.scope_id, cost, 1, (d->>'input_tokens')::bigint, (d->>'output_tokens')::bigint,
               (d->>'ended_at')::timestamptz
        from sl_usage_scopes(d) as s
        order by s.scope, s.scope_id
        on conflict (scope, scope_id) do update set
            spend = t.spend + excluded.spend,
            requests = t.requests + excluded.requests,
            input_tokens = t.input_tokens + excluded.input_tokens,
            output_tokens = t.output_tokens + excluded.output_tokens,
            last_at = greatest(t.last_at, excluded.last_at)
        returning t.scope, t.spend
    )
    select up.spend into key_spend from up where up.scope = 'key';
    for w in
        with budget as (
            select r->>0 as scope, r->>1 as scope_id, (r->>2)::timestamptz as period,
                   cost as spent, 0::numeric as held
            from jsonb_array_elements(coalesce(d->'budget_periods', '[]')) as r
            union all
            select r->>0, r->>1, (r->>2)::timestamptz, 0, h.amount
            from jsonb_array_elements(coalesce(h.budget_rows, '[]')) as r
        ), shared as (
            select scope, scope_id, 0 as kind, period, sum(spent) as spent, sum(held) as held,
                   0::bigint as tokens
            from budget group by scope, scope_id, period
            union all
            select r->>0, r->>1, 1, null, 0, 0, (d->>'total_tokens')::bigint
            from jsonb_array_elements(coalesce(h.tpm_rows, '[]')) as r
            union all
            select r->>0, r->>1, 2, null, 0, 0, 0
            from jsonb_array_elements(coalesce(h.parallel_rows, '[]')) as r
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
            update in_flight set count = greatest(count - 1, 0) where scope = w.scope and scope_id = w.scope_id;
        end if;
    end loop;
    if coalesce((ctx->>'notify')::boolean, true) and (webhooks or jsonb_array_length(outbox_rows) > 0) then
        perform pg_notify('sl_outbox', '');
    end if;
    return trim_scale(key_spend);
end $$;
"""

# The functions as 0012 left them, and the schema before this revision.
DOWNGRADE = r"""
create or replace function sl_draw_leases(ds jsonb, metas jsonb) returns jsonb language sql as $$
    with drawn as (
        select e.d->>'call_id' as call_id, metas->(e.i::integer - 1)->>'lease' as lease,
               (e.d->>'cost')::numeric as cost
        from jsonb_array_elements(ds) with ordinality as e(d, i)
        where metas->(e.i::integer - 1) ? 'lease'
    ), leases as (
        update holds as h set amount = greatest(h.amount - x.total, 0)
        from (select lease, sum(cost) as total from drawn group by lease) as x
        where h.call_id = x.lease
        returning h.call_id, h.budget_rows
    )
    select coalesce(jsonb_object_agg(drawn.call_id, jsonb_build_object(
               'amount', drawn.cost, 'budget_rows', leases.budget_rows)), '{}')
    from drawn join leases on leases.call_id = drawn.lease
$$;

drop function sl_release_orphaned_holds(text, interval, boolean);
drop table process_heartbeats;
drop index holds_owner;
alter table holds drop column owner;
alter table holds drop constraint holds_amount_not_negative;

create or replace function sl_record_usage(d jsonb, meta jsonb, ctx jsonb, outbox_rows jsonb) returns numeric
language plpgsql set plan_cache_mode = force_generic_plan as $$
declare
    call text := d->>'call_id';
    cost numeric := (d->>'cost')::numeric;
    webhooks boolean := coalesce((ctx->>'webhooks')::boolean, false);
    h holds;
    w record;
    key_spend numeric;
begin
    perform sl_customer_first_seen(d->>'customer_id', ctx->>'default_budget_id', meta);
    delete from holds where call_id = call returning * into h;
    if not found and meta ? 'lease' then  -- admitted under a lease: draw the cost from it
        update holds set amount = greatest(amount - cost, 0) where call_id = meta->>'lease'
        returning call, cost, budget_rows, '[]'::jsonb, '[]'::jsonb, expires_at, created_at into h;
    end if;
    insert into events (stream, version, type, data, metadata)
    values ('request:' || call, 1, 'UsageRecorded', d,
            case when webhooks then meta || '{"webhooks": true}' else meta end);
    insert into outbox (sink, dedupe_key, payload, state, call_id)
    select o->>'sink', o->>'dedupe_key', o->'payload', o->>'state', call
    from jsonb_array_elements(outbox_rows) as o;
    with up as (
        insert into spend_totals as t (scope, scope_id, spend, requests, input_tokens, output_tokens, last_at)
        select s.scope, s.scope_id, cost, 1, (d->>'input_tokens')::bigint, (d->>'output_tokens')::bigint,
               (d->>'ended_at')::timestamptz
        from sl_usage_scopes(d) as s
        order by s.scope, s.scope_id
        on conflict (scope, scope_id) do update set
            spend = t.spend + excluded.spend,
            requests = t.requests + excluded.requests,
            input_tokens = t.input_tokens + excluded.input_tokens,
            output_tokens = t.output_tokens + excluded.output_tokens,
            last_at = greatest(t.last_at, excluded.last_at)
        returning t.scope, t.spend
    )
    select up.spend into key_spend from up where up.scope = 'key';
    for w in
        with budget as (
            select r->>0 as scope, r->>1 as scope_id, (r->>2)::timestamptz as period,
                   cost as spent, 0::numeric as held
            from jsonb_array_elements(coalesce(d->'budget_periods', '[]')) as r
            union all
            select r->>0, r->>1, (r->>2)::timestamptz, 0, h.amount
            from jsonb_array_elements(coalesce(h.budget_rows, '[]')) as r
        ), shared as (
            select scope, scope_id, 0 as kind, period, sum(spent) as spent, sum(held) as held,
                   0::bigint as tokens
            from budget group by scope, scope_id, period
            union all
            select r->>0, r->>1, 1, null, 0, 0, (d->>'total_tokens')::bigint
            from jsonb_array_elements(coalesce(h.tpm_rows, '[]')) as r
            union all
            select r->>0, r->>1, 2, null, 0, 0, 0
            from jsonb_array_elements(coalesce(h.parallel_rows, '[]')) as r
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
            update in_flight set count = greatest(count - 1, 0) where scope = w.scope and scope_id = w.scope_id;
        end if;
    end loop;
    if coalesce((ctx->>'notify')::boolean, true) and (webhooks or jsonb_array_length(outbox_rows) > 0) then
        perform pg_notify('sl_outbox', '');
    end if;
    return trim_scale(key_spend);
end $$;
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
