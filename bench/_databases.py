"""Databases for the benchmarks: a server to run on, and fresh migrated databases on it."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from ledger.database import Database
from ledger.schema import migrate
from ledger.settings import Settings


def server() -> str:
    """Return the owner connection string of DATABASE_URL, or of an embedded server."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    import pgserver

    data_dir = Path(os.environ.get("CIVICPULSE_BENCH_PGDATA", "/tmp/civicpulse-bench-pg"))
    data_dir.mkdir(parents=True, exist_ok=True)
    return str(pgserver.get_server(data_dir).get_uri())


def fresh_database(server_conninfo: str) -> tuple[str, Database]:
    """Create and migrate a database of its own; return its name and connections."""
    name = f"civicpulse_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    owner = make_conninfo(server_conninfo, dbname=name)
    settings = Settings(database_url=owner)
    database = Database.for_owner(owner, settings)
    migrate(database, settings)
    return name, database


def drop(server_conninfo: str, name: str) -> None:
    with psycopg.connect(server_conninfo, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
