"""Row-level security by tenant, the worker role, and API keys.

Revision ID: 0002
Revises: 0001

Two roles own nothing and cannot bypass row-level security:

- the application role (the API) sees the rows of one tenant: the one set for the
  transaction in `civicpulse.tenant_id`. Without it set, every tenant table looks empty.
- the worker role (projectors, the scheduler, imports) reads and appends across tenants,
  because it walks the whole log. Policies name it explicitly, so what it may do is
  written here rather than granted by a BYPASSRLS attribute.
"""

from alembic import context, op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Tables that hold tenant rows. Every later table with a tenant_id joins this list in its
# own migration, through enable_tenant_isolation.
TENANT_TABLES = ("events", "streams", "incidents", "incident_sla", "api_keys")
TENANT_SETTING = "civicpulse.tenant_id"


def enable_tenant_isolation(table: str, app_role: str, worker_role: str) -> None:
    """Turn on row-level security for `table` with the two roles' policies."""
    current = f"current_setting('{TENANT_SETTING}', true)"
    op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
    op.execute(
        f"CREATE POLICY {table}_tenant ON {table} TO {app_role} "
        f"USING (tenant_id = {current}) WITH CHECK (tenant_id = {current})"
    )
    op.execute(f"CREATE POLICY {table}_worker ON {table} TO {worker_role} USING (true)")


def _create_role(role: str) -> None:
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


def upgrade() -> None:
    app_role = context.config.attributes["app_role"]
    worker_role = context.config.attributes["worker_role"]
    _create_role(worker_role)  # its password is set by ledger.schema.migrate

    # A derived read model of the key events in each tenant's configuration stream, written
    # in the same transaction as the event. Only a SHA-256 of each secret is kept: the
    # secrets are 256 random bits, so a slow password hash would add nothing.
    op.execute(
        """
        CREATE TABLE api_keys (
            tenant_id       text NOT NULL,
            key_id          uuid NOT NULL,
            role            text NOT NULL,
            name            text NOT NULL,
            secret_sha256   bytea NOT NULL CHECK (length(secret_sha256) = 32),
            created_at      timestamptz NOT NULL,
            expires_at      timestamptz,
            revoked_at      timestamptz,
            PRIMARY KEY (tenant_id, key_id),
            UNIQUE (key_id)
        )
        """
    )
    # The API learns a key's tenant from the key itself, before any tenant is set. This
    # function, run with its owner's rights, returns the one matching key and nothing else.
    op.execute(
        """
        CREATE FUNCTION authenticate_api_key(p_key_id uuid, p_secret_sha256 bytea)
        RETURNS TABLE (tenant_id text, role text, name text,
                       expires_at timestamptz, revoked_at timestamptz)
        LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = public, pg_temp
        AS $$
            SELECT k.tenant_id, k.role, k.name, k.expires_at, k.revoked_at
            FROM api_keys AS k
            WHERE k.key_id = p_key_id AND k.secret_sha256 = p_secret_sha256
        $$
        """
    )
    op.execute("REVOKE ALL ON FUNCTION authenticate_api_key(uuid, bytea) FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION authenticate_api_key(uuid, bytea) TO {app_role}")

    # Reporters may read the incidents their own key submitted.
    op.execute("ALTER TABLE incidents ADD COLUMN submitted_by text")

    for table in TENANT_TABLES:
        enable_tenant_isolation(table, app_role, worker_role)

    # How far each projection is behind, across tenants, for health checks and metrics.
    # It returns counts only, so the API may call it without seeing any tenant's rows. The
    # count stops at a million to bound its cost when a projection is far behind.
    op.execute(
        """
        CREATE FUNCTION projection_lag()
        RETURNS TABLE (projection text, tx_id xid8, "position" bigint,
                       updated_at timestamptz, events_behind bigint)
        LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = public, pg_temp
        AS $$
            SELECT c.projection, c.tx_id, c.position, c.updated_at,
                   (SELECT count(*) FROM (
                        SELECT 1 FROM events AS e
                        WHERE (e.tx_id, e.position) > (c.tx_id, c.position)
                        LIMIT 1000000) AS behind)
            FROM projection_checkpoints AS c
            ORDER BY c.projection
        $$
        """
    )
    op.execute("REVOKE ALL ON FUNCTION projection_lag() FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION projection_lag() TO {app_role}, {worker_role}")
    # Readiness checks compare the schema's revision with the code's.
    op.execute(f"GRANT SELECT ON alembic_version TO {app_role}, {worker_role}")

    op.execute("REVOKE ALL ON api_keys FROM PUBLIC")
    op.execute(f"GRANT SELECT, INSERT, UPDATE ON api_keys TO {app_role}, {worker_role}")
    op.execute(f"GRANT USAGE ON SCHEMA public TO {worker_role}")
    op.execute(f"GRANT SELECT, INSERT ON events TO {worker_role}")
    op.execute(f"GRANT SELECT, INSERT, UPDATE ON streams, projection_checkpoints TO {worker_role}")
    op.execute(
        "GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON incidents, incident_sla "
        f"TO {worker_role}"
    )
    # The API reads read models and checkpoints, and writes neither.
    op.execute(
        f"REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON incidents, incident_sla FROM {app_role}"
    )
    op.execute(f"REVOKE INSERT, UPDATE ON projection_checkpoints FROM {app_role}")


def downgrade() -> None:
    raise NotImplementedError("tenant isolation is never removed by a migration")
