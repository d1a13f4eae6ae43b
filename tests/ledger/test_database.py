"""Connection strings from settings."""

from __future__ import annotations

from psycopg.conninfo import conninfo_to_dict

from ledger.database import resolve_database
from ledger.settings import Settings


def test_role_urls_alone_need_no_owner() -> None:
    settings = Settings(
        database_url=None,
        app_database_url="postgresql://civicpulse_app@db.internal:5432/civicpulse",
        app_role_password="from a secret",
        worker_database_url="postgresql://civicpulse_worker:inline@db.internal/civicpulse",
        worker_role_password="ignored, the URL has one",
    )
    database = resolve_database(settings)

    assert database.owner_conninfo == ""
    assert database.embedded is False
    assert conninfo_to_dict(database.app_conninfo)["password"] == "from a secret"
    assert conninfo_to_dict(database.worker_conninfo)["password"] == "inline"
