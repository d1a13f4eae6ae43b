"""Index the located grouping reports by submission time in place of grid cell.

Revision ID: 0017
Revises: 0016

Each grouping batch reads the stored reports near its new reports: inside the time window,
in the grid cells around them. The index `(tenant_id, cell, submitted_at)` did not serve
that read. PostgreSQL 15 cannot skip its leading `cell` column, so the planner walked the
tenant's whole range of the index with the time bounds as a filter, and each batch read
more as the table grew. `(tenant_id, submitted_at)` reads only the window, and the batch
keeps the reports in its cells. No other query reads the cell index, so it goes, and
inserts still maintain three indexes.
"""

from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("DROP INDEX grouping_reports_cell")
    op.execute(
        "CREATE INDEX grouping_reports_time ON grouping_reports (tenant_id, submitted_at) "
        "WHERE cell IS NOT NULL"
    )


def downgrade() -> None:
    op.execute("DROP INDEX grouping_reports_time")
    op.execute(
        "CREATE INDEX grouping_reports_cell ON grouping_reports (tenant_id, cell, submitted_at) "
        "WHERE cell IS NOT NULL"
    )
