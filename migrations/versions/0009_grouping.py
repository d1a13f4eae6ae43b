"""The duplicate grouping read model.

Revision ID: 0009
Revises: 0008

- `grouping_settings`: each tenant's grouping settings as the projector last read them from
  its configuration stream, so that a batch applies the settings in force at its position.
- `grouping_reports`: one row per report with what the grouping rule reads, its grid cell
  (NULL without a location) and its group, named by the smallest incident id among the
  members (a report alone is its own group).
- `grouping_links`: pairs of reports, stored in both directions. `match` links come from the
  rule, `merge` links from staff merges; both join groups. `split` links record a staff
  split and keep the rule from joining the pair again.
"""

from alembic import context, op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

TABLES = ("grouping_settings", "grouping_reports", "grouping_links")


def upgrade() -> None:
    app_role = context.config.attributes["app_role"]
    worker_role = context.config.attributes["worker_role"]
    op.execute(
        """
        CREATE TABLE grouping_settings (
            tenant_id       text PRIMARY KEY,
            settings        jsonb NOT NULL,
            version         integer NOT NULL
        )
        """
    )
    op.execute(
        """
        CREATE TABLE grouping_reports (
            tenant_id       text NOT NULL,
            incident_id     uuid NOT NULL,
            submitted_at    timestamptz NOT NULL,
            category        text,
            category_source text,
            text            text NOT NULL,
            latitude        double precision,
            longitude       double precision,
            cell            bigint,
            group_id        uuid NOT NULL,
            PRIMARY KEY (tenant_id, incident_id)
        )
        """
    )
    # The spatial index: a grid cell key and a time range, both btree searches.
    op.execute(
        "CREATE INDEX grouping_reports_cell ON grouping_reports (tenant_id, cell, submitted_at) "
        "WHERE cell IS NOT NULL"
    )
    op.execute("CREATE INDEX grouping_reports_group ON grouping_reports (tenant_id, group_id)")
    op.execute(
        """
        CREATE TABLE grouping_links (
            tenant_id       text NOT NULL,
            incident_id     uuid NOT NULL,
            other_id        uuid NOT NULL,
            kind            text NOT NULL CHECK (kind IN ('match', 'merge', 'split')),
            PRIMARY KEY (tenant_id, incident_id, other_id)
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
