"""Keep the SLA rows as they stood before each incident's last event, by valid time.

Revision ID: 0019
Revises: 0018

`incident_sla_versions` holds, for each incident, its `incident_sla` row as it stood from
`valid_from` up to, not including, `valid_to`; the live row holds from its
`latest_occurred_at` on (projections/versions.py). An SLA summary as of a past valid time
then reads one row per incident in SQL instead of folding, on each request, the incidents
open across that time.

The versions depend on every event of an incident, so the migration empties the SLA model,
its configuration table, checkpoint and snapshots, and the projector folds it again from
the first event, as after migration 0018. `civicpulse rebuild sla` does the same on a
process pool. Until either has caught up, the SLA summary counts fewer incidents and
`GET /status` shows the lag.
"""

from alembic import context, op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

TABLE = "incident_sla_versions"


def upgrade() -> None:
    app_role = context.config.attributes["app_role"]
    worker_role = context.config.attributes["worker_role"]
    op.execute("TRUNCATE incident_sla, sla_configs")
    op.execute("DELETE FROM projection_checkpoints WHERE projection = 'sla'")
    op.execute("DELETE FROM projection_snapshots WHERE projection = 'sla'")
    # NOTE: the columns are copied from incident_sla as it stands at this revision; a later
    # migration that adds a column to SlaState must add it to incident_sla, incident_trends
    # and this table.
    op.execute(f"CREATE TABLE {TABLE} (LIKE incident_sla INCLUDING DEFAULTS)")
    op.execute(
        f"""
        ALTER TABLE {TABLE}
            ADD COLUMN valid_from timestamptz NOT NULL,
            ADD COLUMN valid_to timestamptz NOT NULL,
            ADD PRIMARY KEY (tenant_id, incident_id, valid_from),
            ADD CHECK (valid_from < valid_to)
        """
    )
    current = "current_setting('civicpulse.tenant_id', true)"
    op.execute(f"ALTER TABLE {TABLE} ENABLE ROW LEVEL SECURITY")
    op.execute(
        f"CREATE POLICY {TABLE}_tenant ON {TABLE} TO {app_role} "
        f"USING (tenant_id = {current}) WITH CHECK (tenant_id = {current})"
    )
    op.execute(f"CREATE POLICY {TABLE}_worker ON {TABLE} TO {worker_role} USING (true)")
    op.execute(f"REVOKE ALL ON {TABLE} FROM PUBLIC")
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON {TABLE} TO {worker_role}")
    # The API reads read models and writes none.
    op.execute(f"GRANT SELECT ON {TABLE} TO {app_role}")


def downgrade() -> None:
    op.execute(f"DROP TABLE {TABLE}")
