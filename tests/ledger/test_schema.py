"""Migrations: role passwords, and the check that the schema is current."""

from __future__ import annotations

import psycopg
import pytest

from ledger.database import Database
from ledger.schema import SchemaNotCurrent, check_schema, head_revision, migrate
from ledger.settings import Settings


def test_migrate_sets_hashed_role_passwords(fresh_database: Database) -> None:
    settings = Settings(
        database_url=fresh_database.owner_conninfo,
        app_role_password="app's secret",
        worker_role_password="worker secret",
    )
    try:
        migrate(fresh_database, settings)
        with fresh_database.connect_owner() as conn:
            stored = dict(
                conn.execute(
                    "SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY(%s)",
                    ([fresh_database.app_role, fresh_database.worker_role],),
                ).fetchall()
            )
    finally:
        # Roles belong to the whole server: leave them as other tests expect them.
        with fresh_database.connect_owner(autocommit=True) as conn:
            for role in (fresh_database.app_role, fresh_database.worker_role):
                conn.execute(f"ALTER ROLE {role} PASSWORD NULL")

    assert set(stored) == {fresh_database.app_role, fresh_database.worker_role}
    assert all(value.startswith(("SCRAM-SHA-256$", "md5")) for value in stored.values())
    assert not any("secret" in value for value in stored.values())


def test_check_schema_names_both_revisions(fresh_database: Database) -> None:
    with fresh_database.connect_owner() as conn:
        check_schema(conn)
        conn.execute("UPDATE alembic_version SET version_num = '0001'")
        with pytest.raises(SchemaNotCurrent, match="civicpulse migrate") as raised:
            check_schema(conn)

    assert raised.value.current == "0001"
    assert raised.value.head == head_revision()


def test_app_role_reads_an_empty_database_as_unmigrated(server_conninfo: str) -> None:
    import uuid

    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    name = f"civicpulse_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        database = Database.for_owner(make_conninfo(server_conninfo, dbname=name), Settings())
        with database.connect() as conn, pytest.raises(SchemaNotCurrent, match="none"):
            check_schema(conn)
    finally:
        with psycopg.connect(server_conninfo, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
