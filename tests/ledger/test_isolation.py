"""Row-level security: the application role sees one tenant's rows, and none without one."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import psycopg
import pytest
from psycopg import sql
from psycopg.pq import TransactionStatus

from ledger.commands import Actor, IncidentCommands
from ledger.database import Database, read_as_tenant, set_tenant
from ledger.store import PostgresEventStore
from ledger.tenants import create_tenant
from tests.conftest import project_everything

STAFF = Actor(name="clerk", role="staff")


def tenant_tables(database: Database) -> list[str]:
    """Every table of the schema with a tenant_id column, as later migrations add them."""
    with database.connect_owner() as conn:
        rows = conn.execute(
            """
            SELECT c.table_name FROM information_schema.columns AS c
            JOIN information_schema.tables AS t USING (table_schema, table_name)
            WHERE c.table_schema = 'public' AND c.column_name = 'tenant_id'
              AND t.table_type = 'BASE TABLE'
            ORDER BY 1
            """
        ).fetchall()
    return [row[0] for row in rows]


def _tenant(store: PostgresEventStore) -> str:
    tenant = f"iso-{uuid.uuid4().hex[:8]}"
    create_tenant(
        store,
        tenant,
        name="Isolated",
        time_zone="UTC",
        occurred_at=datetime(2015, 1, 1, tzinfo=UTC),
    )
    return tenant


@pytest.fixture
def two_tenants(fresh_database: Database, fresh_store: PostgresEventStore) -> tuple[str, str]:
    """Two tenants with one projected incident each, alone in their database."""
    commands = IncidentCommands(fresh_store)
    tenants = (_tenant(fresh_store), _tenant(fresh_store))
    for tenant in tenants:
        commands.submit(tenant, {"description": "Broken light"}, actor=STAFF)
    project_everything(fresh_database)
    return tenants


def test_every_tenant_table_has_row_level_security(fresh_database: Database) -> None:
    tables = tenant_tables(fresh_database)
    with fresh_database.connect_owner() as conn:
        protected = {
            row[0]
            for row in conn.execute(
                "SELECT relname FROM pg_class WHERE relrowsecurity AND relname = ANY(%s)",
                (tables,),
            )
        }

    assert {"events", "streams", "incidents", "incident_sla"} <= set(tables)
    assert protected == set(tables)


def test_app_role_without_tenant_sees_no_rows(
    fresh_database: Database, two_tenants: tuple[str, str]
) -> None:
    for table in tenant_tables(fresh_database):
        with fresh_database.connect() as conn:
            visible = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        assert visible == (0,), table


def test_app_role_sees_only_its_tenant(
    fresh_database: Database, two_tenants: tuple[str, str]
) -> None:
    first, _ = two_tenants
    seen = {}
    for table in tenant_tables(fresh_database):
        with fresh_database.connect() as conn:
            set_tenant(conn, first)
            seen[table] = {row[0] for row in conn.execute(f"SELECT tenant_id FROM {table}")}

    assert seen["events"] == seen["incidents"] == seen["incident_sla"] == {first}
    assert all(tenants <= {first} for tenants in seen.values())


def test_app_role_cannot_write_rows_of_another_tenant(
    fresh_database: Database, two_tenants: tuple[str, str]
) -> None:
    first, second = two_tenants
    with (
        fresh_database.connect() as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"),
    ):
        set_tenant(conn, first)
        conn.execute(
            """
            INSERT INTO events (tenant_id, stream_id, stream_version, event_type,
                schema_version, payload, metadata, occurred_at, event_id, hash)
            VALUES (%s, 'incident-forged', 1, 'Noted', 1, '{}', '{}', now(),
                gen_random_uuid(), decode(repeat('00', 32), 'hex'))
            """,
            (second,),
        )


def test_app_role_cannot_bypass_row_level_security(fresh_database: Database) -> None:
    with fresh_database.connect() as conn:
        conn.execute("SET row_security = off")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            conn.execute("SELECT count(*) FROM events")


def test_worker_role_reads_every_tenant(
    fresh_database: Database, two_tenants: tuple[str, str]
) -> None:
    with fresh_database.connect_worker() as conn:
        tenants = {row[0] for row in conn.execute("SELECT DISTINCT tenant_id FROM incidents")}

    assert tenants == set(two_tenants)


def test_setting_a_tenant_outside_a_transaction_is_an_error(fresh_database: Database) -> None:
    with (
        fresh_database.connect(autocommit=True) as conn,
        pytest.raises(RuntimeError, match="needs a transaction"),
    ):
        set_tenant(conn, "acme")


def test_read_as_tenant_scopes_tenant(
    fresh_database: Database, two_tenants: tuple[str, str]
) -> None:
    first, _ = two_tenants
    query = sql.SQL("SELECT DISTINCT tenant_id FROM events")
    with fresh_database.connect() as conn:
        rows = read_as_tenant(conn, first, query)
        status_after = conn.info.transaction_status
        autocommit_after = conn.autocommit
        # The setting ended with the statement: a later query finds no tenant's rows.
        later = conn.execute("SELECT count(*) FROM events").fetchone()
        with conn.transaction():
            set_tenant(conn, first)
            inside = read_as_tenant(conn, first, query)

    assert rows == [(first,)]
    assert status_after == TransactionStatus.IDLE
    assert autocommit_after is False
    assert later == (0,)
    # Inside a transaction it runs nothing, and the caller uses set_tenant instead.
    assert inside is None


def test_read_as_tenant_quotes_the_tenant(
    fresh_database: Database, two_tenants: tuple[str, str]
) -> None:
    with fresh_database.connect(autocommit=True) as conn:
        rows = read_as_tenant(
            conn, "x'); SET row_security = off; --", sql.SQL("SELECT count(*) FROM events")
        )
        autocommit_after = conn.autocommit

    assert rows == [(0,)]
    assert autocommit_after is True


def test_read_as_tenant_on_lost_connection(fresh_database: Database) -> None:
    with fresh_database.connect() as conn:
        backend = conn.info.backend_pid
        with fresh_database.connect_owner(autocommit=True) as owner:
            owner.execute("SELECT pg_terminate_backend(%s)", (backend,))
        # The lost connection's error, not a complaint about the autocommit setting.
        with pytest.raises(psycopg.OperationalError):
            read_as_tenant(conn, "acme", sql.SQL("SELECT 1"))
        assert conn.broken
