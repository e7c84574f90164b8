"""Outbox rows claimed in short transactions, never held open across a send.

(Placeholder while issue 15 is built: filled in by the change that needs it.)

Revision ID: 0014
Revises: 0013
"""

from alembic import op  # noqa: F401

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
