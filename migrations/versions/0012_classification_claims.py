"""Claims on reports being classified, so that two classifier pools never ask twice.

Revision ID: 0012
Revises: 0011

A pool claims a report before it calls a model and deletes the claim once the outcome is
recorded. A claim expires, so a report claimed by a pool that died is taken by another one
later. Claims are working state of running pools, like classifier_pools: no read model
depends on them, and an empty table loses nothing.
"""

from alembic import context, op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

TENANT = "current_setting('civicpulse.tenant_id', true)"


def upgrade() -> None:
    app_role = context.config.attributes["app_role"]
    worker_role = context.config.attributes["worker_role"]
    op.execute(
        """
        CREATE TABLE classification_claims (
            tenant_id       text NOT NULL,
            incident_id     uuid NOT NULL,
            pool_id         text NOT NULL,
            claimed_at      timestamptz NOT NULL DEFAULT now(),
            expires_at      timestamptz NOT NULL,
            PRIMARY KEY (tenant_id, incident_id)
        )
        """
    )
    op.execute("REVOKE ALL ON classification_claims FROM PUBLIC")
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON classification_claims TO {worker_role}")
    # Staff may see which reports are being classified; the API writes no claims.
    op.execute(f"GRANT SELECT ON classification_claims TO {app_role}")
    op.execute("ALTER TABLE classification_claims ENABLE ROW LEVEL SECURITY")
    op.execute(
        f"CREATE POLICY classification_claims_tenant ON classification_claims TO {app_role} "
        f"USING (tenant_id = {TENANT})"
    )
    op.execute(
        f"CREATE POLICY classification_claims_worker ON classification_claims "
        f"TO {worker_role} USING (true)"
    )


def downgrade() -> None:
    op.execute("DROP TABLE classification_claims")
