"""Classification columns on the incidents read model.

Revision ID: 0006
Revises: 0005

`severity`, `category_source` and `classifier` mirror the fields of the incident state that
classification events set. `incidents` already has row-level security by tenant, which
covers new columns. The partial index serves the classifier pool's search for reports
without a classification outcome.
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "ALTER TABLE incidents ADD COLUMN severity text, ADD COLUMN category_source text, "
        "ADD COLUMN classifier text"
    )
    # The same value a rebuild would fold: a category stored now came with the report.
    op.execute("UPDATE incidents SET category_source = 'report' WHERE category IS NOT NULL")
    op.execute(
        "CREATE INDEX incidents_unclassified ON incidents (submitted_at) WHERE classifier IS NULL"
    )


def downgrade() -> None:
    op.execute("DROP INDEX incidents_unclassified")
    op.execute(
        "ALTER TABLE incidents DROP COLUMN severity, DROP COLUMN category_source, "
        "DROP COLUMN classifier"
    )
