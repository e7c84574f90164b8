"""A settle batch wakes the publishers only when its caller asks (`ctx.notify`, default true).

Each `NOTIFY` costs its transaction a global lock at commit and wakes every listening publisher
(their backend and their process): at 1 connection about 0.1 ms of every request's latency
(the floor app of scripts/bench/floor.py, a durable insert without and with it: +0.58 against
+0.68 ms over the upstream direct). A publisher
that is woken lingers 50 ms and then claims every row due, so a notification per batch is
wasted while one is pending: `GroupRecorder` asks for one at most every 50 ms and sends a trailing
one itself when it let a batch go without.

`sl_record_usages` is 0006's definition with that one condition changed (taken from 0006's text
here rather than restated: the rest of it is unchanged).

Revision ID: 0009
Revises: 0008
"""

from pathlib import Path

from alembic import op
from ledger.db import definitions_in_revision

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

REVISION_0006 = Path(__file__).with_name("0006_settle_shared_rows_last.py")
ALWAYS = "    if webhooks or jsonb_path_exists(outboxes, '$[*][*]') then\n        perform pg_notify('sl_outbox', '');"
WHEN_ASKED = (
    "    if coalesce((ctx->>'notify')::boolean, true)\n"
    "       and (webhooks or jsonb_path_exists(outboxes, '$[*][*]')) then\n"
    "        perform pg_notify('sl_outbox', '');"
)
GENERIC_PLANS = (
    "alter function sl_record_usages(jsonb, jsonb, jsonb, jsonb) set plan_cache_mode = force_generic_plan"
)


def _record_usages_of_0006() -> str:
    (definition,) = definitions_in_revision(REVISION_0006, "sl_record_usages")
    assert definition.count(ALWAYS) == 1, "0006's sl_record_usages notifies in one place"
    return definition


def definition() -> str:
    """This revision's sl_record_usages (a later revision derives its own from it)."""
    return _record_usages_of_0006().replace(ALWAYS, WHEN_ASKED)


def upgrade() -> None:
    op.get_bind().exec_driver_sql(definition())
    op.get_bind().exec_driver_sql(GENERIC_PLANS)  # create or replace resets the function's settings


def downgrade() -> None:
    op.get_bind().exec_driver_sql(_record_usages_of_0006())
    op.get_bind().exec_driver_sql(GENERIC_PLANS)
