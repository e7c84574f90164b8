"""sl_period_class: anchors with the same budget periods

Functions: sl_period_class. Written by scripts/sql_migration.py from ledger/sql/, which holds their
current text; the downgrade carries the text the previous revision left.

Revision ID: 0025
Revises: 0024
"""

from alembic import op
from spendledger.ledger.db import execute_script

revision = "0025"
down_revision = "0024"
branch_labels = None
depends_on = None

UPGRADE = r"""
-- Anchors of one class have the same budget periods, whatever the duration (sl_budget_period_start):
-- from the calendar's start (`aligned_from`) only the anchor's day in the budget zone counts; before
-- it, the anchor itself. Readers that need the periods of many scopes compute one per class.
create or replace function sl_period_class(anchor timestamptz) returns text
language sql stable as $$
    select case when anchor < c.aligned_from then anchor::text
                else (anchor at time zone c.timezone)::date::text end
    from budget_calendar c
$$;
"""

DOWNGRADE = r"""
drop function sl_period_class(anchor timestamp with time zone);
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
