"""Holds know the process that took them, and no hold is negative.

(Placeholder while issue 15 is built: filled in by the change that needs it.)

Revision ID: 0013
Revises: 0012
"""

from alembic import op  # noqa: F401

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
