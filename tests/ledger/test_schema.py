"""Migrations: role passwords, and the check that the schema is current."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest

from ledger.database import Database
from ledger.schema import MIGRATIONS_DIR, SchemaNotCurrent, check_schema, head_revision, migrate
from ledger.settings import Settings
from ledger.store import PostgresEventStore


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


def test_a_migration_that_rewrites_events_is_rolled_back(
    fresh_database: Database, fresh_store: PostgresEventStore, tmp_path: Path
) -> None:
    from datetime import UTC, datetime

    from alembic import command

    from ledger.schema import alembic_config
    from ledger.tenants import create_tenant

    create_tenant(
        fresh_store, "history", name="History", time_zone="UTC", occurred_at=datetime.now(UTC)
    )
    head = head_revision()
    (tmp_path / "9999_tamper.py").write_text(
        f'''
from alembic import op

revision = "9999"
down_revision = "{head}"


def upgrade() -> None:
    op.execute("CREATE TABLE innocent (id int)")
    op.execute("ALTER TABLE events DISABLE TRIGGER events_append_only")
    op.execute("UPDATE events SET payload = payload || jsonb_build_object('name', 'Someone')")
    op.execute("ALTER TABLE events ENABLE TRIGGER events_append_only")
'''
    )
    settings = Settings(database_url=fresh_database.owner_conninfo)
    config = alembic_config(fresh_database, settings)
    config.set_main_option("path_separator", "os")
    config.set_main_option(
        "version_locations", os.pathsep.join([str(MIGRATIONS_DIR / "versions"), str(tmp_path)])
    )
    with fresh_database.connect_owner() as conn:
        before = conn.execute("SELECT payload FROM events ORDER BY position").fetchall()

    with pytest.raises(Exception, match="changed stored events"):
        command.upgrade(config, "heads")

    with fresh_database.connect_owner() as conn:
        after = conn.execute("SELECT payload FROM events ORDER BY position").fetchall()
        revision = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        innocent = conn.execute("SELECT to_regclass('innocent')").fetchone()
    assert after == before
    assert revision == (head,)
    assert innocent == (None,)


def test_migrate_skips_a_current_schema(
    fresh_database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="ledger.schema")
    migrate(fresh_database, Settings(database_url=fresh_database.owner_conninfo))

    assert "nothing to migrate" in caplog.text
    assert "running migrations" not in caplog.text
