"""The API pool's checkout test: a socket poll for quiet idle connections, a query otherwise."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from ledger.database import Database, checked_pool, quietly_idle


@pytest.fixture
def pool(database: Database) -> Iterator[ConnectionPool[Any]]:
    opened = checked_pool(database.owner_conninfo, min_size=1, max_size=1, name="check-test")
    opened.open(wait=True)
    yield opened
    opened.close()


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the checkout tests that went to the server with an empty query."""
    counted: list[int] = []
    original = ConnectionPool.check_connection

    def counting(conn: psycopg.Connection[Any]) -> None:
        counted.append(conn.info.backend_pid)
        original(conn)

    monkeypatch.setattr(ConnectionPool, "check_connection", staticmethod(counting))
    return counted


def backend_pid(pool: ConnectionPool[Any]) -> int:
    with pool.connection() as conn:
        return int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])


def wait_until_readable(conn: psycopg.Connection[Any]) -> None:
    deadline = time.monotonic() + 10
    while quietly_idle(conn):
        assert time.monotonic() < deadline, "the server's message never reached the socket"
        time.sleep(0.01)


def test_checkout_skips_query_when_quiet(pool: ConnectionPool[Any], checks: list[int]) -> None:
    pids = {backend_pid(pool) for _ in range(20)}

    assert len(pids) == 1
    assert checks == []


def test_checkout_replaces_terminated_connection(
    pool: ConnectionPool[Any], database: Database, checks: list[int]
) -> None:
    first = backend_pid(pool)
    conn = pool.getconn()
    try:
        with database.connect_owner(autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(%s)", (first,))
        wait_until_readable(conn)
    finally:
        pool.putconn(conn)

    second = backend_pid(pool)

    assert second != first
    assert checks == [first]


def test_checkout_queries_pending_message(
    pool: ConnectionPool[Any], database: Database, checks: list[int]
) -> None:
    conn = pool.getconn()
    try:
        conn.execute("LISTEN check_test")
        conn.commit()
        with database.connect_owner(autocommit=True) as other:
            other.execute("NOTIFY check_test")
        wait_until_readable(conn)
        pid = conn.info.backend_pid
    finally:
        pool.putconn(conn)

    # The message is harmless, so the query succeeds and the same connection is handed out.
    assert backend_pid(pool) == pid
    assert checks == [pid]


def test_quietly_idle_false_in_transaction(database: Database) -> None:
    with database.connect_owner() as conn:
        conn.execute("SELECT 1")

        assert conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
        assert not quietly_idle(conn)

        conn.rollback()

        assert quietly_idle(conn)


def test_quietly_idle_false_when_closed(database: Database) -> None:
    conn = database.connect_owner()
    conn.close()

    assert not quietly_idle(conn)
