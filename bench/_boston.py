"""Databases filled with the Boston 2015 export, imported once per tenant boston-1..N."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from psycopg.conninfo import make_conninfo
from psycopg_pool import ConnectionPool

from bench._databases import drop, fresh_database
from ledger.database import Database
from ledger.grouping import configure_grouping
from ledger.imports.pipeline import import_boston
from ledger.settings import Settings
from ledger.store import PostgresEventStore
from ledger.tenants import create_tenant

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FILE = ROOT.parent / "shared" / "data" / "boston311_2015.csv.gz"
TIME_ZONE = "America/New_York"
BOSTON_DEFAULT_POINT = {"latitude": 42.3594, "longitude": -71.0587, "radius_m": 5}


def fill(database: Database, path: Path, copies: int) -> None:
    """Import the export `copies` times, each into tenant boston-N with grouping settings."""
    at = datetime(2014, 12, 31, tzinfo=UTC)
    with ConnectionPool(database.app_conninfo, min_size=1, max_size=2) as pool:
        store = PostgresEventStore(pool)
        for number in range(1, copies + 1):
            tenant = f"boston-{number}"
            create_tenant(
                store, tenant, name=f"Boston {number}", time_zone=TIME_ZONE, occurred_at=at
            )
            configure_grouping(
                store, tenant, {"placeholders": [BOSTON_DEFAULT_POINT]}, occurred_at=at
            )
    for number in range(1, copies + 1):
        started = time.perf_counter()
        with database.connect_owner() as conn:
            report = import_boston(conn, path, tenant_id=f"boston-{number}", time_zone=TIME_ZONE)
        print(
            f"imported copy {number}: {report.events_appended:,} events in "
            f"{time.perf_counter() - started:.0f} s",
            flush=True,
        )


def boston_database(
    server_conninfo: str, *, name: str | None, path: Path, copies: int
) -> tuple[str, Database]:
    """Open the database `name`, filled by an earlier run, or create and fill a fresh one."""
    if name:
        owner = make_conninfo(server_conninfo, dbname=name)
        return name, Database.for_owner(owner, Settings(database_url=owner))
    name, database = fresh_database(server_conninfo)
    fill(database, path, copies)
    return name, database


def release(server_conninfo: str, name: str, *, keep: bool) -> None:
    """Drop the database `name`, or print its name when it is to be kept."""
    if keep:
        print(f"kept database {name}")
    else:
        drop(server_conninfo, name)
