"""Move the audit indexes off `events` into a read model the projector keeps.

Revision ID: 0016
Revises: 0015

Every append maintained the four audit indexes of migration 0005, and they cost more than
the table's own indexes: a COPY of the Boston export's 222,417 events into `events` took
about twice as long with them as without them. `audit_entries` holds one narrow row per
event with the columns the audit filters select on, and the `audit` projection writes it
in the transaction that moves its checkpoint. Audit queries read the entries up to that
checkpoint and the log after it (ledger.audit), so their answers never lag the log.
"""

from alembic import context, op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

# As in migration 0005: equality filters end with (tx_id, position), so a page of one
# actor's or one type's events is a range scan in log order that needs no sort.
INDEXES = {
    "audit_entries_actor": "(tenant_id, actor, tx_id, position)",
    "audit_entries_type": "(tenant_id, event_type, tx_id, position)",
    "audit_entries_recorded": "(tenant_id, recorded_at)",
    # Only ReportSubmitted events have a category, so the index holds only their rows.
    "audit_entries_category": "(tenant_id, category, stream_id) WHERE category IS NOT NULL",
}

# The indexes migration 0005 created on events, to drop here and restore on downgrade.
EVENT_INDEXES = {
    "events_audit_actor": "(tenant_id, (metadata->>'actor'), tx_id, position)",
    "events_audit_type": "(tenant_id, event_type, tx_id, position)",
    "events_audit_recorded": "(tenant_id, recorded_at)",
    "events_audit_category": (
        "(tenant_id, (payload->>'category'), stream_id) WHERE event_type = 'ReportSubmitted'"
    ),
}


def upgrade() -> None:
    app_role = context.config.attributes["app_role"]
    worker_role = context.config.attributes["worker_role"]
    # No key: the projector writes each event's row once, in the transaction that moves its
    # checkpoint past the event, and the events table already enforces uniqueness.
    op.execute(
        """
        CREATE TABLE audit_entries (
            tenant_id    text NOT NULL,
            tx_id        xid8 NOT NULL,
            position     bigint NOT NULL,
            stream_id    text NOT NULL,
            event_type   text NOT NULL,
            actor        text,
            role         text,
            category     text,
            recorded_at  timestamptz NOT NULL
        )
        """
    )
    for name, definition in INDEXES.items():
        op.execute(f"CREATE INDEX {name} ON audit_entries {definition}")
    current = "current_setting('civicpulse.tenant_id', true)"
    op.execute("ALTER TABLE audit_entries ENABLE ROW LEVEL SECURITY")
    op.execute(
        f"CREATE POLICY audit_entries_tenant ON audit_entries TO {app_role} "
        f"USING (tenant_id = {current})"
    )
    op.execute(f"CREATE POLICY audit_entries_worker ON audit_entries TO {worker_role} USING (true)")
    op.execute("REVOKE ALL ON audit_entries FROM PUBLIC")
    op.execute(f"GRANT SELECT, INSERT, DELETE, TRUNCATE ON audit_entries TO {worker_role}")
    op.execute(f"GRANT SELECT ON audit_entries TO {app_role}")

    # Index the log that exists now, as one projector batch would: every event below the
    # transaction horizon, with the checkpoint at the last of them. An event of a
    # transaction still running has a tx_id at or above the horizon, so it sorts after the
    # checkpoint and the projector indexes it later.
    op.execute(
        """
        INSERT INTO audit_entries
            (tenant_id, tx_id, position, stream_id, event_type, actor, role, category,
             recorded_at)
        SELECT tenant_id, tx_id, position, stream_id, event_type,
               metadata->>'actor', metadata->>'role',
               CASE WHEN event_type = 'ReportSubmitted' THEN payload->>'category' END,
               recorded_at
        FROM events
        WHERE tx_id < pg_snapshot_xmin(pg_current_snapshot())
        """
    )
    op.execute(
        """
        INSERT INTO projection_checkpoints (projection, tx_id, position)
        SELECT 'audit', tx_id, position FROM audit_entries
        ORDER BY tx_id DESC, position DESC
        LIMIT 1
        """
    )

    for name in EVENT_INDEXES:
        op.execute(f"DROP INDEX {name}")


def downgrade() -> None:
    for name, definition in EVENT_INDEXES.items():
        op.execute(f"CREATE INDEX {name} ON events {definition}")
    op.execute("DROP TABLE audit_entries")
    op.execute("DELETE FROM projection_checkpoints WHERE projection = 'audit'")
