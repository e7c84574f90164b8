"""Budget leased to a serving process, so that it admits requests without a round trip.

`sl_lease` holds an amount on every budget of one set of scopes at once — as one admission holds
one request's worst case — and the process then admits that set's requests on its own until it
has used the amount (ledger/leases.py). The settle draws each leased request's cost from its lease
row (`sl_draw_leases`; the lease id travels in the event's metadata): the budget's `held` shrinks
by the cost as `spent` grows by it, exactly as a request's own hold would. What the process has not
used goes back when it retires the lease (`sl_return_lease`, then `sl_release_hold`).

A lease is granted only where the process can decide exactly as `sl_admit` would: no scope blocked,
the model allowed, no rpm / tpm / parallel limit (those count every request in PostgreSQL), and
room on every budget for at least `min_amount` (near a limit, requests are admitted one by one, so
a budget is never refused early). Changes to keys, users, teams, customers and budgets notify
`sl_scope_changed` (row triggers), on which processes retire their leases.

Revision ID: 0011
Revises: 0010
"""

from pathlib import Path

from alembic import op
from ledger.db import definitions_in_revision, execute_script, load_revision

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

SCOPE_TABLES = ("keys", "users", "teams", "customers", "budgets")

UPGRADE = r"""
-- Lease `amount` (at most `share` of the least room) on every budget of a request's scopes, for
-- the process to admit their requests on its own. {"leased": false} where it could not decide as
-- sl_admit does (see the revision's notes); never a refusal: refusing is sl_admit's.
create function sl_lease(p jsonb) returns jsonb language plpgsql as $$
declare
    s record;
    r jsonb;
    at timestamptz := now();
    period timestamptz;
    room numeric;
    least_room numeric;
    amount numeric := (p->>'amount')::numeric;
    valid_until timestamptz := (p->>'valid_until')::timestamptz;
    period_rows jsonb := '[]';
    budget_rows jsonb := '[]';
begin
    perform sl_customer_first_seen(p->>'customer_id', p->>'default_budget_id', p->'meta');
    for s in select * from sl_request_scopes(p) loop
        if s.blocked or s.rpm_limit is not null or s.tpm_limit is not null or s.max_parallel_requests is not null
           or (s.models is not null and cardinality(s.models) > 0
               and not (p->>'model' = any(s.models) or 'all-proxy-models' = any(s.models))) then
            return jsonb_build_object('leased', false);
        end if;
        if s.max_budget is not null or s.budget_duration is not null then
            period := sl_period_start(s.anchor, s.budget_duration, at);
            insert into budget_usage (scope, scope_id, period_start) values (s.scope, s.scope_id, period)
            on conflict do nothing;
            period_rows := period_rows || jsonb_build_array(jsonb_build_array(s.scope, s.scope_id, period));
            if s.budget_duration is not null then
                -- a request admitted in this period settles into it: the lease ends with it
                valid_until := least(valid_until, sl_period_end(s.anchor, s.budget_duration, at));
            end if;
            if s.max_budget is not null then
                select s.max_budget - spent - held into room from budget_usage
                where scope = s.scope and scope_id = s.scope_id and period_start = period for update;
                least_room := least(least_room, room);
                budget_rows := budget_rows || jsonb_build_array(jsonb_build_array(s.scope, s.scope_id, period));
            end if;
        end if;
    end loop;
    if budget_rows = '[]' then
        amount := null;  -- no budget governs these scopes: nothing to hold
    else
        amount := least(amount, least_room * (p->>'share')::numeric);
        if amount < (p->>'min_amount')::numeric then
            return jsonb_build_object('leased', false);
        end if;
        for r in select jsonb_array_elements(budget_rows) loop
            update budget_usage set held = held + amount
            where scope = r->>0 and scope_id = r->>1 and period_start = (r->>2)::timestamptz;
        end loop;
        insert into holds (call_id, amount, budget_rows, parallel_rows, tpm_rows, expires_at)
        values (p->>'lease_id', amount, budget_rows, '[]', '[]', (p->>'expires_at')::timestamptz);
    end if;
    -- As an admission's: a lease is transient state, not a fact (losing one loses nothing billed).
    perform set_config('synchronous_commit', 'off', true);
    return jsonb_build_object('leased', true, 'amount', amount, 'budget_periods', period_rows,
                              'valid_until', valid_until);
end $$;

-- What a batch's leased requests draw from their leases, as sl_record_usages's `released` map
-- (call id → the amount to take off `held` and the budget rows it is held on).
create function sl_draw_leases(ds jsonb, metas jsonb) returns jsonb language sql as $$
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

-- Give back `amount` of a lease that the process will not use (it retires the lease).
create function sl_return_lease(lease text, amount numeric) returns void language plpgsql as $$
declare
    rows jsonb;
    r jsonb;
begin
    update holds set amount = greatest(holds.amount - sl_return_lease.amount, 0)
    where call_id = lease returning budget_rows into rows;
    for r in select jsonb_array_elements(coalesce(rows, '[]')) loop
        update budget_usage set held = greatest(held - amount, 0)
        where scope = r->>0 and scope_id = r->>1 and period_start = (r->>2)::timestamptz;
    end loop;
end $$;

create function sl_scope_changed() returns trigger language plpgsql as $$
begin
    perform pg_notify('sl_scope_changed', tg_table_name);
    return null;
end $$;
"""

TRIGGERS = [
    f"create trigger {table}_changed after insert or update or delete on {table} "
    f"for each row execute function sl_scope_changed()"
    for table in SCOPE_TABLES
]

# The settles draw leased requests' costs: one statement more after each takes its holds.
BATCH_HOLDS = "    select coalesce(jsonb_object_agg(call_id, to_jsonb(gone)), '{}') into released from gone;\n"
BATCH_DRAWS = BATCH_HOLDS + (
    "    -- Requests admitted under a lease (ledger/leases.py) draw their cost from it.\n"
    "    released := released || sl_draw_leases(ds, metas);\n"
)
ONE_HOLD = "    delete from holds where call_id = call returning * into h;\n"
ONE_DRAWS = ONE_HOLD + (
    "    if not found and meta ? 'lease' then  -- admitted under a lease: draw the cost from it\n"
    "        update holds set amount = greatest(amount - cost, 0) where call_id = meta->>'lease'\n"
    "        returning call, cost, budget_rows, '[]'::jsonb, '[]'::jsonb, expires_at, created_at into h;\n"
    "    end if;\n"
)
GENERIC_PLANS = [
    "alter function sl_record_usages(jsonb, jsonb, jsonb, jsonb) set plan_cache_mode = force_generic_plan",
    "alter function sl_record_usage(jsonb, jsonb, jsonb, jsonb) set plan_cache_mode = force_generic_plan",
]


def _settles() -> tuple[str, str]:
    """sl_record_usages as 0009 defined it, sl_record_usage as 0010 did."""
    batch = load_revision(Path(__file__).with_name("0009_settle_notifies_when_asked.py")).definition()
    (one,) = definitions_in_revision(Path(__file__).with_name("0010_settle_one_request.py"), "sl_record_usage")
    assert batch.count(BATCH_HOLDS) == 1 and one.count(ONE_HOLD) == 1, "each settle takes its holds once"
    return batch, one.replace("create function", "create or replace function", 1)


def definitions() -> tuple[str, str]:
    """This revision's sl_record_usages and sl_record_usage (a later revision derives its own)."""
    batch, one = _settles()
    return batch.replace(BATCH_HOLDS, BATCH_DRAWS), one.replace(ONE_HOLD, ONE_DRAWS)


def upgrade() -> None:
    bind = op.get_bind()
    execute_script(bind, UPGRADE)
    for trigger in TRIGGERS:
        bind.exec_driver_sql(trigger)
    for statement in definitions():
        bind.exec_driver_sql(statement)
    for statement in GENERIC_PLANS:  # create or replace resets a function's settings
        bind.exec_driver_sql(statement)


def downgrade() -> None:
    bind = op.get_bind()
    for statement in _settles():
        bind.exec_driver_sql(statement)
    for statement in GENERIC_PLANS:
        bind.exec_driver_sql(statement)
    for table in SCOPE_TABLES:
        bind.exec_driver_sql(f"drop trigger {table}_changed on {table}")
    for function in ("sl_scope_changed()", "sl_return_lease(text, numeric)", "sl_draw_leases(jsonb, jsonb)",
                     "sl_lease(jsonb)"):  # fmt: skip
        bind.exec_driver_sql(f"drop function {function}")
