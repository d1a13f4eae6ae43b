"""An index for the Open311 facade's GET requests: a tenant's incidents by submission time.

Revision ID: 0011
Revises: 0009

GET requests lists a tenant's incidents submitted in a window of at most 90 days, the most
recent first. Without this index each call scans all of the tenant's incidents and sorts them.
"""

from alembic import op

revision = "0011"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE INDEX incidents_submitted ON incidents (tenant_id, submitted_at)")


def downgrade() -> None:
    op.execute("DROP INDEX incidents_submitted")
