"""SLA policies in the SLA read model, and the tenant configurations it folds.

Revision ID: 0008
Revises: 0007

`resolution_due_at` now includes the time the clock was paused, in the clock's own units
(business or calendar time), so the stored rows are dropped and the projector folds the SLA
read model again from the first event. `sla_configs` contains each version of each tenant's
SLA configuration with the log position of its event, so that a fold finds the version in
force at any event.
"""

from alembic import context, op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    app_role = context.config.attributes["app_role"]
    worker_role = context.config.attributes["worker_role"]
    op.execute(
        """
        ALTER TABLE incident_sla
            ADD COLUMN severity text,
            ADD COLUMN channel text,
            ADD COLUMN area text,
            ADD COLUMN category_source text,
            ADD COLUMN department_source text,
            ADD COLUMN policy_id text,
            ADD COLUMN policy_version integer,
            ADD COLUMN clock integer NOT NULL DEFAULT 1,
            ADD COLUMN clock_started_at timestamptz,
            ADD COLUMN first_response_warning_at timestamptz,
            ADD COLUMN resolution_warning_at timestamptz,
            ADD COLUMN pauses jsonb NOT NULL DEFAULT '[]',
            ADD COLUMN escalations jsonb NOT NULL DEFAULT '[]'
        """
    )
    op.execute("TRUNCATE incident_sla")
    op.execute("DELETE FROM projection_checkpoints WHERE projection = 'sla'")
    # The scheduler's search for incidents whose warning or due time has passed.
    op.execute(
        "CREATE INDEX incident_sla_open_due ON incident_sla (resolution_warning_at) "
        "WHERE resolved_at IS NULL AND policy_id IS NOT NULL"
    )
    op.execute(
        """
        CREATE TABLE sla_configs (
            tenant_id   text NOT NULL,
            version     integer NOT NULL,
            tx_id       bigint NOT NULL,
            position    bigint NOT NULL,
            payloads    jsonb NOT NULL,
            PRIMARY KEY (tenant_id, version)
        )
        """
    )
    # Row-level security as on every tenant table (migration 0002).
    current = "current_setting('civicpulse.tenant_id', true)"
    op.execute("ALTER TABLE sla_configs ENABLE ROW LEVEL SECURITY")
    op.execute(
        f"CREATE POLICY sla_configs_tenant ON sla_configs TO {app_role} "
        f"USING (tenant_id = {current}) WITH CHECK (tenant_id = {current})"
    )
    op.execute(f"CREATE POLICY sla_configs_worker ON sla_configs TO {worker_role} USING (true)")
    op.execute("REVOKE ALL ON sla_configs FROM PUBLIC")
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON sla_configs TO {worker_role}")
    op.execute(f"GRANT SELECT ON sla_configs TO {app_role}")

    # The last error of each projection, written by the worker that failed, for status pages.
    op.execute(
        "ALTER TABLE projection_checkpoints ADD COLUMN last_error text, "
        "ADD COLUMN last_error_at timestamptz"
    )
    # Like projection_lag(), with the age of the oldest event not applied yet and the last
    # error. Counts, times and error messages only, so the API may call it without a tenant.
    op.execute(
        """
        CREATE FUNCTION projection_status()
        RETURNS TABLE (projection text, tx_id xid8, "position" bigint,
                       updated_at timestamptz, events_behind bigint,
                       oldest_pending_recorded_at timestamptz,
                       last_error text, last_error_at timestamptz)
        LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = public, pg_temp
        AS $$
            SELECT c.projection, c.tx_id, c.position, c.updated_at,
                   (SELECT count(*) FROM (
                        SELECT 1 FROM events AS e
                        WHERE (e.tx_id, e.position) > (c.tx_id, c.position)
                        LIMIT 1000000) AS behind),
                   (SELECT e.recorded_at FROM events AS e
                    WHERE (e.tx_id, e.position) > (c.tx_id, c.position)
                    ORDER BY e.tx_id, e.position LIMIT 1),
                   c.last_error, c.last_error_at
            FROM projection_checkpoints AS c
            ORDER BY c.projection
        $$
        """
    )
    op.execute("REVOKE ALL ON FUNCTION projection_status() FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION projection_status() TO {app_role}, {worker_role}")


def downgrade() -> None:
    op.execute("DROP FUNCTION projection_status()")
    op.execute(
        "ALTER TABLE projection_checkpoints DROP COLUMN last_error, DROP COLUMN last_error_at"
    )
    op.execute("DROP TABLE sla_configs")
    op.execute("DROP INDEX incident_sla_open_due")
    op.execute("TRUNCATE incident_sla")
    op.execute("DELETE FROM projection_checkpoints WHERE projection = 'sla'")
    op.execute(
        """
        ALTER TABLE incident_sla
            DROP COLUMN severity, DROP COLUMN channel, DROP COLUMN area,
            DROP COLUMN category_source, DROP COLUMN department_source,
            DROP COLUMN policy_id, DROP COLUMN policy_version, DROP COLUMN clock,
            DROP COLUMN clock_started_at, DROP COLUMN first_response_warning_at,
            DROP COLUMN resolution_warning_at, DROP COLUMN pauses, DROP COLUMN escalations
        """
    )
