"""An index of the outbox rows that wait, so that counting them does not read the delivered ones.

Delivered rows stay in the outbox (two per request: a month of traffic is hundreds of millions),
and every serving process refreshes its outbox gauges every 5 s: counted by sink and state with a
scan of the whole table, that refresh grew with every request ever served, and so did the search
for dead letters. The rows that wait — pending, dead, unbillable — are few; this partial index
holds only them. Built concurrently: on a large outbox the build takes a while, and settles must
not wait for it.

Revision ID: 0008
Revises: 0007
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        # A concurrent build that was interrupted leaves an invalid index behind: build it anew.
        invalid = op.get_bind().exec_driver_sql(
            "select 1 from pg_index where indexrelid = to_regclass('outbox_waiting') and not indisvalid"
        )
        if invalid.first() is not None:
            op.execute("drop index concurrently outbox_waiting")
        op.execute("create index concurrently if not exists outbox_waiting on outbox (sink, state, id) "
                   "where state <> 'delivered'")  # fmt: skip


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("drop index concurrently if exists outbox_waiting")
