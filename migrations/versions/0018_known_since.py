"""Record when the ledger knew each SLA and trends row, so past summaries read the live rows.

Revision ID: 0018
Revises: 0017

`known_since` is the latest `recorded_at` of everything a row was folded from: its
incident's events and the configuration versions the fold consulted. A row with
`known_since` at or before a transaction time T is exactly what a fold of the events
recorded by T gives for that incident, so the SLA summary as known at T counts it straight
from the table and folds again only the incidents that changed after T.
`earliest_recorded_at` tells which of those already existed at T. The configuration
tables get the same time per version. No index: the summary reads all of a tenant's
rows anyway, and an index on a column that every event changes would cost each write.

The values depend on every event of a row, so the migration empties both models, their
configuration tables, checkpoints and snapshots; the projector folds them again from the
first event, as after migration 0008. A projector of the previous release that still runs
fails its SLA and trends batches on the new NOT NULL columns, and moves no checkpoint,
until the new release replaces it; nothing is lost.
"""

from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

MODELS = {"sla": ("incident_sla", "sla_configs"), "trends": ("incident_trends", "trend_configs")}


def _reset() -> None:
    for projection, (table, configs) in MODELS.items():
        op.execute(f"TRUNCATE {table}, {configs}")
        op.execute(f"DELETE FROM projection_checkpoints WHERE projection = '{projection}'")
        op.execute(f"DELETE FROM projection_snapshots WHERE projection = '{projection}'")


def upgrade() -> None:
    _reset()
    for table, configs in MODELS.values():
        op.execute(
            f"ALTER TABLE {table} ADD COLUMN earliest_recorded_at timestamptz NOT NULL, "
            "ADD COLUMN known_since timestamptz NOT NULL"
        )
        op.execute(f"ALTER TABLE {configs} ADD COLUMN known_since timestamptz NOT NULL")


def downgrade() -> None:
    _reset()
    for table, configs in MODELS.values():
        op.execute(f"ALTER TABLE {table} DROP COLUMN earliest_recorded_at, DROP COLUMN known_since")
        op.execute(f"ALTER TABLE {configs} DROP COLUMN known_since")
