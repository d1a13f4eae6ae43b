"""An index on each tenant's log in (tx_id, position) order, for seals and their checks.

Revision ID: 0003
Revises: 0002

A seal covers one tenant's events in (transaction id, position) order, and `verify` reads
them back the same way. The (tx_id, position) index of 0001 serves readers of the whole
log. Filtering it by tenant would make each tenant's scan read every tenant's events.
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE INDEX events_tenant_tx_order ON events (tenant_id, tx_id, position)")


def downgrade() -> None:
    op.execute("DROP INDEX events_tenant_tx_order")
