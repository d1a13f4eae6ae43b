"""Indexes and a tenant-scoped view for the audit queries.

Revision ID: 0005
Revises: 0004

Every index leads with tenant_id, because every audit query names one tenant. The filters on
metadata (actor, role) and on the reported category are expression indexes over JSONB.

PostgreSQL evaluates a condition that calls a function not marked LEAKPROOF only after the
row-level security policy, and then cannot use it as an index condition. `->>` is such a
function, so under the application role's policy none of these expression indexes would be
used. The `audit_events` view applies the same tenant condition as that policy, but as a
plain view owned by the table owner: its rows are read with the owner's rights (row-level
security does not apply to a table's owner) and filtered by the view's own WHERE clause, so
the planner may use every index. The application role gets SELECT on the view only.

NOTE: CREATE INDEX blocks appends to `events` while it runs; on a large log, run this
migration when appends may pause. Every append also maintains these indexes, which slow the
Boston import (docs/benchmarks.md). Filters on role (four values, too few to narrow a scan)
and on valid time have no index of their own: they scan the tenant's log in order.
"""

from alembic import context, op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# Audit pages and exports list events in (tx_id, position) order, as the log readers do. The
# indexes for equality filters end with those two columns, so that a page is a range scan
# that needs no sort. A stream's events are found through the (stream_id, stream_version)
# index of migration 0001.
INDEXES = {
    "events_audit_actor": "(tenant_id, (metadata->>'actor'), tx_id, position)",
    "events_audit_type": "(tenant_id, event_type, tx_id, position)",
    "events_audit_recorded": "(tenant_id, recorded_at)",
    # Only ReportSubmitted events carry an incident's category. The stream id in the key
    # lets the category filter find the incidents' streams from the index alone.
    "events_audit_category": (
        "(tenant_id, (payload->>'category'), stream_id) WHERE event_type = 'ReportSubmitted'"
    ),
}


def upgrade() -> None:
    app_role = context.config.attributes["app_role"]

    # Audit pages walk one tenant's log in (tx_id, position) order. The primary key becomes
    # that index instead of (tenant_id, position), which nothing looks up often enough to
    # keep a ninth index on events for: every append maintains each one.
    op.execute("ALTER TABLE events DROP CONSTRAINT events_pkey")
    op.execute("ALTER TABLE events ADD PRIMARY KEY (tenant_id, tx_id, position)")
    for name, definition in INDEXES.items():
        op.execute(f"CREATE INDEX {name} ON events {definition}")

    # The same rows the application role's policy on events allows: one tenant's, the one
    # named in civicpulse.tenant_id for the transaction, and none when it is not set. Both
    # options are PostgreSQL's defaults, written out because either one set to true would
    # bring back the restriction on indexes that this view exists to avoid.
    op.execute(
        """
        CREATE VIEW audit_events WITH (security_barrier = false, security_invoker = false) AS
        SELECT position, tx_id, tenant_id, stream_id, stream_version, event_type,
               schema_version, payload, metadata, occurred_at, recorded_at, event_id, hash
        FROM events
        WHERE tenant_id = current_setting('civicpulse.tenant_id', true)
        """
    )
    op.execute("REVOKE ALL ON audit_events FROM PUBLIC")
    op.execute(f"GRANT SELECT ON audit_events TO {app_role}")


def downgrade() -> None:
    op.execute("DROP VIEW audit_events")
    for name in INDEXES:
        op.execute(f"DROP INDEX {name}")
    op.execute("ALTER TABLE events DROP CONSTRAINT events_pkey")
    op.execute("ALTER TABLE events ADD PRIMARY KEY (tenant_id, position)")
