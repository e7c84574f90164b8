"""Keys pinned to customers, and the audit log filtered by who made a change.

- `keys.allowed_customers`: the customers a key may bill (`/key/generate` and `/key/update` take
  `allowed_customers`; empty: any). The key events carry it too (an optional field: events written
  before it replay as "any"), so a rebuild fills the column from the log. Adding a column with a
  constant default rewrites nothing.
- `events_actor`: `GET /audit/events?actor=` reads `metadata->>'actor'` ("master_key", or
  "key:<sha256>" for a generated key) in (txid, position) order, as the other audit filters read
  their own indexes; partial, because usage events name no actor and are nearly all of the log.
  Built concurrently: on a large log the build takes a while, and requests must not wait for it.

Roles need no schema: a key's role is its user's `users.user_role`, read with the key.

Revision ID: 0015
Revises: 0014
"""

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("alter table keys add column allowed_customers text[] not null default '{}'")
    with op.get_context().autocommit_block():
        # A concurrent build that was interrupted leaves an invalid index behind: build it anew.
        invalid = op.get_bind().exec_driver_sql(
            "select 1 from pg_index where indexrelid = to_regclass('events_actor') and not indisvalid"
        )
        if invalid.first() is not None:
            op.execute("drop index concurrently events_actor")
        op.execute("create index concurrently if not exists events_actor "
                   "on events ((metadata->>'actor'), txid, position) "
                   "where (metadata->>'actor') is not null")  # fmt: skip


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("drop index concurrently if exists events_actor")
    op.execute("alter table keys drop column allowed_customers")
