"""Drop sl_apply_usage, dead since 0006

Functions: sl_apply_usage. Written by scripts/sql_migration.py from ledger/sql/, which holds their
current text; the downgrade carries the text the previous revision left.

Revision ID: 0016
Revises: 0015
"""

from alembic import op
from spendledger.ledger.db import execute_script

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

UPGRADE = r"""
drop function sl_apply_usage(d jsonb);
"""

DOWNGRADE = r"""
CREATE OR REPLACE FUNCTION public.sl_apply_usage(d jsonb)
 RETURNS void
 LANGUAGE plpgsql
AS $function$
begin
    insert into spend_totals as t (scope, scope_id, spend, requests, input_tokens, output_tokens, last_at)
    select s.scope, s.scope_id, (d->>'cost')::numeric, 1,
           (d->>'input_tokens')::bigint, (d->>'output_tokens')::bigint, (d->>'ended_at')::timestamptz
    from sl_usage_scopes(d) as s
    order by s.scope, s.scope_id
    on conflict (scope, scope_id) do update set
        spend = t.spend + excluded.spend,
        requests = t.requests + 1,
        input_tokens = t.input_tokens + excluded.input_tokens,
        output_tokens = t.output_tokens + excluded.output_tokens,
        last_at = greatest(t.last_at, excluded.last_at);
    insert into budget_usage as b (scope, scope_id, period_start, spent)
    select p.scope, p.scope_id, p.period_start, (d->>'cost')::numeric
    from sl_usage_periods(d) as p
    order by 1, 2, 3
    on conflict (scope, scope_id, period_start) do update set spent = b.spent + excluded.spent;
end $function$;
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
