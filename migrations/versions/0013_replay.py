"""Read-model snapshots, the schema that holds rebuild shadow tables, and snapshot grants.

Revision ID: 0013
Revises: 0012

`projection_snapshots` holds one tenant's rows of one read model at a known log position,
as zlib-compressed canonical JSON with the SHA-256 of the uncompressed bytes. It is derived
data: dropping every snapshot changes no answer, only how long time travel takes.

`replay_shadow` is where a rebuild folds a read model before swapping its rows in. Only the
worker role may use it, so the application role never sees a half-built model.
"""

from alembic import context, op

TENANT_SETTING = "current_setting('civicpulse.tenant_id', true)"

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    app_role = context.config.attributes["app_role"]
    worker_role = context.config.attributes["worker_role"]

    op.execute(
        """
        CREATE TABLE projection_snapshots (
            tenant_id           text NOT NULL,
            projection          text NOT NULL,
            snapshot_id         bigint GENERATED ALWAYS AS IDENTITY,
            tx_id               xid8 NOT NULL,
            position            bigint NOT NULL,
            last_recorded_at    timestamptz,
            last_occurred_at    timestamptz,
            event_count         bigint NOT NULL,
            row_count           bigint NOT NULL,
            sha256              bytea NOT NULL CHECK (length(sha256) = 32),
            content             bytea NOT NULL,
            taken_at            timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, projection, snapshot_id)
        )
        """
    )
    # Time travel looks for the latest snapshot whose last event was recorded by known_at.
    op.execute(
        "CREATE INDEX projection_snapshots_known ON projection_snapshots "
        "(tenant_id, projection, last_recorded_at)"
    )
    op.execute("ALTER TABLE projection_snapshots ENABLE ROW LEVEL SECURITY")
    op.execute(
        f"CREATE POLICY projection_snapshots_tenant ON projection_snapshots TO {app_role} "
        f"USING (tenant_id = {TENANT_SETTING}) WITH CHECK (tenant_id = {TENANT_SETTING})"
    )
    op.execute(
        f"CREATE POLICY projection_snapshots_worker ON projection_snapshots TO {worker_role} "
        "USING (true)"
    )
    op.execute("REVOKE ALL ON projection_snapshots FROM PUBLIC")
    op.execute(f"GRANT SELECT ON projection_snapshots TO {app_role}")
    op.execute(f"GRANT SELECT, INSERT, DELETE ON projection_snapshots TO {worker_role}")

    op.execute("CREATE SCHEMA replay_shadow")
    op.execute("REVOKE ALL ON SCHEMA replay_shadow FROM PUBLIC")
    op.execute(f"GRANT USAGE, CREATE ON SCHEMA replay_shadow TO {worker_role}")


def downgrade() -> None:
    op.execute("DROP SCHEMA replay_shadow CASCADE")
    op.execute("DROP TABLE projection_snapshots")
