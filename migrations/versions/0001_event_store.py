"""Event store, stream heads, projection checkpoints, incidents and SLA read models.

Revision ID: 0001
Revises:
"""

from alembic import context, op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    role = context.config.attributes["app_role"]
    password = context.config.attributes.get("app_role_password")

    # The application role owns nothing: it gets exactly the privileges granted below.
    # Roles are cluster-wide, so a second database on the same server reuses it.
    op.execute(
        f"""
        DO $$
        BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN
                CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS;
            END IF;
        END
        $$
        """
    )
    if password:
        op.execute(f"ALTER ROLE {role} PASSWORD '{password.replace(chr(39), chr(39) * 2)}'")

    op.execute(
        """
        CREATE TABLE events (
            position        bigint GENERATED ALWAYS AS IDENTITY,
            tx_id           xid8 NOT NULL DEFAULT pg_current_xact_id(),
            tenant_id       text NOT NULL,
            stream_id       text NOT NULL,
            stream_version  integer NOT NULL CHECK (stream_version > 0),
            event_type      text NOT NULL,
            schema_version  smallint NOT NULL CHECK (schema_version > 0),
            payload         jsonb NOT NULL,
            metadata        jsonb NOT NULL,
            occurred_at     timestamptz NOT NULL,
            recorded_at     timestamptz NOT NULL DEFAULT statement_timestamp(),
            event_id        uuid NOT NULL,
            hash            bytea NOT NULL CHECK (length(hash) = 32),
            PRIMARY KEY (tenant_id, position),
            UNIQUE (stream_id, stream_version),
            UNIQUE (tenant_id, event_id)
        )
        """
    )
    # Readers walk the log in (tx_id, position) order below the transaction horizon.
    op.execute("CREATE INDEX events_tx_order ON events (tx_id, position)")

    op.execute(
        """
        CREATE FUNCTION events_reject_change() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'events are append-only: % on events is not allowed', TG_OP
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'append a new event that corrects the earlier one';
        END
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
        FOR EACH ROW EXECUTE FUNCTION events_reject_change()
        """
    )
    op.execute(
        """
        CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
        FOR EACH STATEMENT EXECUTE FUNCTION events_reject_change()
        """
    )
    # One notification per inserting statement wakes projectors; they still poll.
    op.execute(
        """
        CREATE FUNCTION events_notify() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('civicpulse_events', '');
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER events_notify AFTER INSERT ON events
        FOR EACH STATEMENT EXECUTE FUNCTION events_notify()
        """
    )

    # The head of each stream: its tenant, version and last hash. Derived from events and
    # rebuildable, it is the row an append locks to check the expected version.
    op.execute(
        """
        CREATE TABLE streams (
            stream_id   text PRIMARY KEY,
            tenant_id   text NOT NULL,
            version     integer NOT NULL CHECK (version >= 0),
            head_hash   bytea
        )
        """
    )
    op.execute("CREATE INDEX streams_tenant ON streams (tenant_id)")

    op.execute(
        """
        CREATE TABLE projection_checkpoints (
            projection  text PRIMARY KEY,
            tx_id       xid8 NOT NULL DEFAULT '0',
            position    bigint NOT NULL DEFAULT 0,
            updated_at  timestamptz NOT NULL DEFAULT now()
        )
        """
    )

    op.execute(
        """
        CREATE TABLE incidents (
            tenant_id           text NOT NULL,
            incident_id         uuid NOT NULL,
            version             integer NOT NULL,
            status              text NOT NULL,
            resume_status       text,
            category            text,
            reason              text,
            department          text,
            queue               text,
            source_channel      text,
            source_id           text,
            title               text,
            description         text,
            address             text,
            latitude            double precision,
            longitude           double precision,
            assignee            text,
            duplicate_of        uuid,
            rejection_reason    text,
            redirect_to         text,
            closure_reason      text,
            submitted_at        timestamptz,
            updated_at          timestamptz,
            resolved_at         timestamptz,
            closed_at           timestamptz,
            PRIMARY KEY (tenant_id, incident_id)
        )
        """
    )
    op.execute("CREATE INDEX incidents_status ON incidents (tenant_id, status)")
    op.execute(
        "CREATE INDEX incidents_source_id ON incidents (tenant_id, source_id) "
        "WHERE source_id IS NOT NULL"
    )

    op.execute(
        """
        CREATE TABLE incident_sla (
            tenant_id               text NOT NULL,
            incident_id             uuid NOT NULL,
            category                text,
            department              text,
            status                  text NOT NULL,
            submitted_at            timestamptz NOT NULL,
            first_response_due_at   timestamptz,
            first_response_at       timestamptz,
            resolution_due_at       timestamptz,
            resolved_at             timestamptz,
            closed_at               timestamptz,
            paused_since            timestamptz,
            paused_seconds          double precision NOT NULL DEFAULT 0,
            earliest_occurred_at    timestamptz NOT NULL,
            latest_occurred_at      timestamptz NOT NULL,
            PRIMARY KEY (tenant_id, incident_id)
        )
        """
    )
    op.execute(
        "CREATE INDEX incident_sla_window ON incident_sla "
        "(tenant_id, earliest_occurred_at, latest_occurred_at)"
    )

    op.execute("REVOKE ALL ON events, streams, projection_checkpoints FROM PUBLIC")
    op.execute(f"GRANT SELECT, INSERT ON events TO {role}")
    op.execute(f"GRANT SELECT, INSERT, UPDATE ON streams, projection_checkpoints TO {role}")
    op.execute(
        f"GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON incidents, incident_sla TO {role}"
    )
    op.execute("GRANT USAGE ON SCHEMA public TO " + role)


def downgrade() -> None:
    raise NotImplementedError("the event store is never dropped by a migration")
