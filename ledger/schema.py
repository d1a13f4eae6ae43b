"""Schema migrations, run through Alembic over the owner connection."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config

import migrations
from ledger.database import Database
from ledger.settings import Settings

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(migrations.__file__).parent


def alembic_config(database: Database, settings: Settings) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["owner_conninfo"] = database.owner_conninfo
    config.attributes["app_role"] = database.app_role
    if settings.app_role_password is not None:
        config.attributes["app_role_password"] = settings.app_role_password.get_secret_value()
    config.attributes["worker_role"] = database.worker_role
    if settings.worker_role_password is not None:
        secret = settings.worker_role_password.get_secret_value()
        config.attributes["worker_role_password"] = secret
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
            logger.info("running migrations")
            command.upgrade(alembic_config(database, settings), "head")
        finally:
            lock_conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
