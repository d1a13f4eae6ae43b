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
    return config


def migrate(database: Database, settings: Settings) -> None:
    """Upgrade the schema to the latest revision."""
    logger.info("running migrations")
    command.upgrade(alembic_config(database, settings), "head")
