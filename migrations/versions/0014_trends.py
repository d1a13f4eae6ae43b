"""The trends read model.

Revision ID: 0014
Revises: 0013

- `incident_trends`: one row per incident with its SLA facts (the columns of
  `incident_sla`) plus its area, anomalies, a `flagged` mark and business-time durations.
  Trend counts, duration percentiles and rankings are aggregates over these rows.
- `trend_configs`: the tenant configuration versions this model folds with, as
  `sla_configs` holds them for the SLA model.
"""

from alembic import context, op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

TABLES = ("incident_trends", "trend_configs")


def upgrade() -> None:
    app_role = context.config.attributes["app_role"]
    worker_role = context.config.attributes["worker_role"]
    # NOTE: the SLA columns are copied from incident_sla as it stands at this revision; a
    # later migration that adds a column to SlaState must add it to both tables.
    op.execute("CREATE TABLE incident_trends (LIKE incident_sla INCLUDING DEFAULTS)")
    op.execute(
        """
        ALTER TABLE incident_trends
            ADD COLUMN report_area text,
            ADD COLUMN anomalies jsonb NOT NULL DEFAULT '[]',
            ADD COLUMN flagged boolean NOT NULL DEFAULT false,
            ADD COLUMN first_response_business_seconds double precision,
            ADD COLUMN resolution_business_seconds double precision,
            ADD PRIMARY KEY (tenant_id, incident_id)
        """
    )
    # Trend queries bucket by submission and by resolution time inside one tenant.
    op.execute(
        "CREATE INDEX incident_trends_submitted ON incident_trends (tenant_id, submitted_at)"
    )
    op.execute(
        "CREATE INDEX incident_trends_resolved ON incident_trends (tenant_id, resolved_at) "
        "WHERE resolved_at IS NOT NULL"
    )
    op.execute(
        """
        CREATE TABLE trend_configs (
            tenant_id   text NOT NULL,
            version     integer NOT NULL,
            tx_id       bigint NOT NULL,
            position    bigint NOT NULL,
            payloads    jsonb NOT NULL,
            PRIMARY KEY (tenant_id, version)
        )
        """
    )
    current = "current_setting('civicpulse.tenant_id', true)"
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(
            f"CREATE POLICY {table}_tenant ON {table} TO {app_role} "
            f"USING (tenant_id = {current}) WITH CHECK (tenant_id = {current})"
        )
        op.execute(f"CREATE POLICY {table}_worker ON {table} TO {worker_role} USING (true)")
        op.execute(f"REVOKE ALL ON {table} FROM PUBLIC")
        op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON {table} TO {worker_role}")
        # The API reads read models and writes none.
        op.execute(f"GRANT SELECT ON {table} TO {app_role}")


def downgrade() -> None:
    for table in reversed(TABLES):
        op.execute(f"DROP TABLE {table}")
