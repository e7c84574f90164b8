"""The admin UI's sign-ins: one row per session, found by the SHA-256 of its cookie.

Not an event and not a projection: a sign-in is transient access state (like a hold), and the
changes made through it are events that name the signed-in key as their actor. Only hashes are
kept: the cookie's value and the key that signed in never reach the database. Signing out deletes
the row; expired rows are deleted by the next sign-in.

Revision ID: 0024
Revises: 0023
"""

from alembic import op

revision = "0024"
down_revision = "0023"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        create table ui_sessions (
            token_hash  text primary key,
            key_hash    text not null,
            is_master   boolean not null,
            csrf_token  text not null,
            created_at  timestamptz not null default now(),
            expires_at  timestamptz not null
        )
        """
    )
    op.execute("create index ui_sessions_expires on ui_sessions (expires_at)")


def downgrade() -> None:
    op.execute("drop table ui_sessions")
