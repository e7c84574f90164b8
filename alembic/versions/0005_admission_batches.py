"""Admissions in batches: `sl_admit_many` admits a batch of requests in one transaction.

Concurrent admissions against one hot budget row queue on its row lock one transaction at a time,
and PostgreSQL hands such a lock over expensively (every waiter wakes, re-reads the row, sleeps
again). One transaction admitting the batch takes the lock once. The application only batches
requests that share their scopes (key, user, team, customer), so a batch locks the same rows in the
same global order as a single admission: batches cannot deadlock with settles or each other.

Revision ID: 0005
Revises: 0004
"""

from alembic import op
from ledger.db import split_sql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

UPGRADE = r"""
-- Admit each request of the batch in order (each sees the holds of those before it); returns the
-- outcomes in the same order. A refusal appends RequestRefused, a fact: then the commit waits for
-- its WAL flush, as a lone refusal's does; a batch of admissions only (holds, not facts) does not.
create function sl_admit_many(ps jsonb) returns jsonb language plpgsql as $$
declare
    outcomes jsonb := '[]';
    outcome jsonb;
    refused boolean := false;
begin
    for i in 0 .. jsonb_array_length(ps) - 1 loop
        outcome := sl_admit(ps->i);
        refused := refused or not (outcome->>'admitted')::boolean;
        outcomes := outcomes || jsonb_build_array(outcome);
    end loop;
    perform set_config('synchronous_commit', case when refused then 'on' else 'off' end, true);
    return outcomes;
end $$;
"""

DOWNGRADE = """
drop function sl_admit_many(jsonb);
"""


def upgrade() -> None:
    for statement in split_sql(UPGRADE):
        op.get_bind().exec_driver_sql(statement)


def downgrade() -> None:
    for statement in split_sql(DOWNGRADE):
        op.get_bind().exec_driver_sql(statement)
