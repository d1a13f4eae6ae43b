"""The state of each running classifier pool, for the API's status endpoint.

Revision ID: 0007
Revises: 0006

Pools run in projector processes, which the API cannot ask directly, so each one writes its
state here. It holds no tenant data, so it has no row-level security.
"""

from alembic import context, op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    app_role = context.config.attributes["app_role"]
    worker_role = context.config.attributes["worker_role"]
    op.execute(
        """
        CREATE TABLE classifier_pools (
            pool_id         text PRIMARY KEY,
            classifier      text NOT NULL,
            state           text NOT NULL,
            reason          text,
            paused_until    timestamptz,
            started_at      timestamptz NOT NULL,
            updated_at      timestamptz NOT NULL
        )
        """
    )
    op.execute("REVOKE ALL ON classifier_pools FROM PUBLIC")
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON classifier_pools TO {worker_role}")
    op.execute(f"GRANT SELECT ON classifier_pools TO {app_role}")


def downgrade() -> None:
    op.execute("DROP TABLE classifier_pools")
