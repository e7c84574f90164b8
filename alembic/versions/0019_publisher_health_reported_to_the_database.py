"""Publisher health reported to the database: what `/health/readiness` and `/outbox/status` show
about delivery, whichever process delivers.

`spendledger serve` delivers the outbox from a child process (or, with `--no-publisher`, from a
`spendledger publish` elsewhere), so the serving process no longer holds the publisher's state in
memory. Each publisher writes its sinks' state here when it changes and on a heartbeat; a report
older than the heartbeat's few periods says the publisher is not running.

Revision ID: 0019
Revises: 0018
"""

from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        create table publisher_health (
            sink text primary key,
            state text not null check (state in ('ok', 'failing', 'unauthorized')),
            last_error text,
            last_delivery_at timestamptz,
            reported_at timestamptz not null,
            reporter text not null
        )
        """
    )


def downgrade() -> None:
    op.execute("drop table publisher_health")
