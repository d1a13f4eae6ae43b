"""Events an operator set aside for one projection.

Revision ID: 0015
Revises: 0014

`parked_events` lists, per projection, the log positions of the events that projection
skips: streaming, rebuilds and time travel alike. Each row is also recorded as an
`EventParked` event in the tenant's `operations-<tenant>` stream, so the decision is part of
the sealed log; the table is what the projector reads before each batch.
"""

from alembic import context, op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    app_role = context.config.attributes["app_role"]
    worker_role = context.config.attributes["worker_role"]
    op.execute(
        """
        CREATE TABLE parked_events (
            projection  text NOT NULL,
            position    bigint NOT NULL,
            tenant_id   text NOT NULL,
            event_id    uuid NOT NULL,
            reason      text NOT NULL,
            parked_by   text NOT NULL,
            parked_at   timestamptz NOT NULL DEFAULT statement_timestamp(),
            PRIMARY KEY (projection, position)
        )
        """
    )
    current = "current_setting('civicpulse.tenant_id', true)"
    op.execute("ALTER TABLE parked_events ENABLE ROW LEVEL SECURITY")
    op.execute(
        f"CREATE POLICY parked_events_tenant ON parked_events TO {app_role} "
        f"USING (tenant_id = {current}) WITH CHECK (tenant_id = {current})"
    )
    op.execute(f"CREATE POLICY parked_events_worker ON parked_events TO {worker_role} USING (true)")
    op.execute("REVOKE ALL ON parked_events FROM PUBLIC")
    op.execute(f"GRANT SELECT, INSERT, DELETE ON parked_events TO {worker_role}")
    op.execute(f"GRANT SELECT ON parked_events TO {app_role}")


def downgrade() -> None:
    op.execute("DROP TABLE parked_events")
