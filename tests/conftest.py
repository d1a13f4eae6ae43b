"""Fixtures: a real PostgreSQL, one fresh database per test session (or per test on request).

With DATABASE_URL set (as in CI), databases are created on that server. Without it, an
embedded server is started in a temporary data directory.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg_pool import ConnectionPool

from ledger.database import Database
from ledger.schema import migrate
from ledger.settings import Settings
from ledger.store import PostgresEventStore
from ledger.tenants import create_tenant

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
_BOSTON_FILE = Path(os.environ.get("CIVICPULSE_BOSTON_FILE", SHARED_DATA / "boston311_2015.csv.gz"))


def boston_file() -> Path:
    """Return the Boston 2015 export, or skip the test when it is not there.

    In CI (CI=true) a missing file fails the test instead, so the data tests cannot go
    quietly unrun. CIVICPULSE_BOSTON_FILE names the file when it lives elsewhere.
    """
    if not _BOSTON_FILE.is_file():
        message = (
            f"Boston export not found at {_BOSTON_FILE}; set CIVICPULSE_BOSTON_FILE to its path"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return _BOSTON_FILE


CHROMIUM = Path("/usr/bin/chromium")
# Flags for headless Chromium on a machine without network: no sandbox (tests run as root),
# and none of the background fetches a fresh profile would try.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> Path:
    """Return Debian's Chromium, or skip the test without it (fail in CI, where CI=true)."""
    if not CHROMIUM.is_file():
        message = f"Chromium not found at {CHROMIUM}; install it with `apt-get install chromium`"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")


def pytest_configure(config: pytest.Config) -> None:
    """End the run on SIGTERM the way Ctrl-C ends it, so fixtures tear down.

    Without this, SIGTERM kills the interpreter at once and leaves the embedded server of
    `server_conninfo` running with its temporary data directory.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


@pytest.fixture(scope="session")
def server_conninfo() -> Iterator[str]:
    """Owner connection string of the server the tests create databases on."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    import pgserver

    with tempfile.TemporaryDirectory(prefix="civicpulse-test-pg-") as data_dir:
        server = pgserver.get_server(data_dir, cleanup_mode="stop")
        yield server.get_uri()
        server.cleanup()


def create_database(server_conninfo: str) -> tuple[str, Database]:
    name = f"civicpulse_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    owner = make_conninfo(server_conninfo, dbname=name)
    settings = Settings(database_url=owner)
    database = Database.for_owner(owner, settings)
    migrate(database, settings)
    return name, database


def drop_database(server_conninfo: str, name: str) -> None:
    with psycopg.connect(server_conninfo, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="session")
def database(server_conninfo: str) -> Iterator[Database]:
    """A migrated database shared by the session; tests keep apart by tenant."""
    name, database = create_database(server_conninfo)
    yield database
    drop_database(server_conninfo, name)


@pytest.fixture
def fresh_database(server_conninfo: str) -> Iterator[Database]:
    """A migrated database of this test's own, for tests that read the whole log."""
    name, database = create_database(server_conninfo)
    yield database
    drop_database(server_conninfo, name)


def app_pool(database: Database) -> ConnectionPool[Any]:
    return ConnectionPool(database.app_conninfo, min_size=1, max_size=12, open=True)


@pytest.fixture(scope="session")
def session_pool(database: Database) -> Iterator[ConnectionPool[Any]]:
    pool = app_pool(database)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def worker_pool(database: Database) -> Iterator[ConnectionPool[Any]]:
    """Connections as the worker role, which projects and reads across tenants."""
    pool: ConnectionPool[Any] = ConnectionPool(
        database.worker_conninfo, min_size=1, max_size=4, open=True
    )
    yield pool
    pool.close()


@pytest.fixture
def store(session_pool: ConnectionPool[Any]) -> PostgresEventStore:
    return PostgresEventStore(session_pool)


@pytest.fixture
def fresh_pool(fresh_database: Database) -> Iterator[ConnectionPool[Any]]:
    pool = app_pool(fresh_database)
    yield pool
    pool.close()


@pytest.fixture
def fresh_store(fresh_pool: ConnectionPool[Any]) -> PostgresEventStore:
    return PostgresEventStore(fresh_pool)


@pytest.fixture
def tenant_id(store: PostgresEventStore) -> str:
    """A new tenant (America/New_York, 72-hour resolution target) for this test."""
    tenant = f"t-{uuid.uuid4().hex[:10]}"
    create_tenant(
        store,
        tenant,
        name="Test City",
        time_zone="America/New_York",
        occurred_at=datetime(2015, 1, 1, tzinfo=UTC),
    )
    return tenant


def project_everything(database: Database, batch_size: int = 2000, timeout: float = 60.0) -> int:
    """Bring every read model up to every committed event; return the events applied.

    The projector reads only below the server-wide transaction horizon, so a transaction
    open in another database on the same server (another test run, say) can hold it back
    for a while. This waits it out instead of failing the test.
    """
    import time

    from projections.runtime import catch_up, default_projections, projection_progress

    deadline = time.monotonic() + timeout
    applied = 0
    while True:
        applied += catch_up(database, default_projections(), batch_size=batch_size)[0]
        with database.connect_worker() as conn:
            progress = projection_progress(conn)
        if len(progress) == len(default_projections()) and all(
            item.caught_up for item in progress.values()
        ):
            return applied
        if time.monotonic() > deadline:
            raise AssertionError(f"projections did not catch up within {timeout} s: {progress}")
        time.sleep(0.1)
