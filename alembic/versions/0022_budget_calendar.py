"""The budget calendar: the zone budget periods begin at midnight in, and when they began to.

Budget periods follow LiteLLM's calendar rule from here on (ledger/sql/periods.sql,
`sl_budget_period_start`, written by the next revision): midnights in `litellm_settings.timezone`,
Mondays, the 1st of the month. `aligned_from` is when that began: a budget anchored before it keeps
the period it was in until that period ends. The serving process writes the configured zone at
start (api/services.py); one row, always.

Revision ID: 0022
Revises: 0021
"""

from alembic import op

revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        create table budget_calendar (
            one boolean primary key default true check (one),
            timezone text not null default 'UTC',
            aligned_from timestamptz not null default now()
        )
        """
    )
    op.execute("insert into budget_calendar default values")


def downgrade() -> None:
    op.execute("drop table budget_calendar")
