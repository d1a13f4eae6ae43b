"""Schema migrations, run through Alembic over the owner connection."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import psycopg
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from psycopg import sql

import migrations
from ledger.database import Database
from ledger.errors import LedgerError
from ledger.settings import Settings

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(migrations.__file__).parent


def alembic_config(database: Database, settings: Settings) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["owner_conninfo"] = database.owner_conninfo
    config.attributes["app_role"] = database.app_role
    config.attributes["worker_role"] = database.worker_role
    # No passwords here: migrate() sets them after the upgrade, hashed on this side.
    return config


# Key of the advisory lock that serializes migrations when several processes start at once.
MIGRATION_LOCK = 0x43504D47  # "CPMG"


def migrate(database: Database, settings: Settings) -> None:
    """Upgrade the schema to the latest revision.

    Safe to call from several processes at once: they take turns, and the later ones find
    nothing left to do.
    """
    with database.connect_owner(autocommit=True) as lock_conn:
        lock_conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        try:
            # Checked first because a run that migrates also fingerprints every event,
            # which takes seconds on a large ledger.
            if schema_revision(lock_conn) == head_revision():
                logger.info("schema is at revision %s; nothing to migrate", head_revision())
            else:
                logger.info("running migrations")
                command.upgrade(alembic_config(database, settings), "head")
            _set_role_passwords(lock_conn, database, settings)
        finally:
            lock_conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))


def _set_role_passwords(
    conn: psycopg.Connection[Any], database: Database, settings: Settings
) -> None:
    """Set the passwords the settings give on the two roles, so that rotating a password
    is: change the secret, run `civicpulse migrate`, restart the processes.

    libpq hashes each password on this side (SCRAM-SHA-256 on servers that use it), so the
    plain password never appears in a statement the server could log.
    """
    for role, secret in (
        (database.app_role, settings.app_role_password),
        (database.worker_role, settings.worker_role_password),
    ):
        if secret is not None:
            hashed = conn.pgconn.encrypt_password(secret.get_secret_value().encode(), role.encode())
            conn.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(hashed.decode())
                )
            )


class SchemaNotCurrent(LedgerError):
    """The database schema is not at the revision this version of the code needs."""

    def __init__(self, current: str | None, head: str) -> None:
        self.current = current
        self.head = head
        super().__init__(
            f"the database schema is at revision {current or 'none'}, this version of "
            f"CivicPulse needs {head}: run `civicpulse migrate` (as the owner, with "
            "DATABASE_URL), or start with CIVICPULSE_MIGRATE_ON_START=true"
        )


def head_revision() -> str:
    """Return the latest migration revision in the code."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def schema_revision(conn: psycopg.Connection[Any]) -> str | None:
    """Return the database's migration revision, or None before the first migration.

    A role without access to the revision table reads it as None too, because that table
    becomes readable to the application and worker roles in the same migration that
    creates them.
    """
    try:
        with conn.transaction():
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    except (psycopg.errors.UndefinedTable, psycopg.errors.InsufficientPrivilege):
        return None
    return str(row[0]) if row else None


def check_schema(conn: psycopg.Connection[Any]) -> None:
    """Raise SchemaNotCurrent unless the database is at the code's latest revision."""
    current, head = schema_revision(conn), head_revision()
    if current != head:
        raise SchemaNotCurrent(current, head)
