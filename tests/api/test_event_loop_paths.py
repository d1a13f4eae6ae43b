"""Requests that wait in threads while the event loop serves others."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
from fastapi.testclient import TestClient
from psycopg_pool import ConnectionPool

from api.app import create_app
from ledger.database import Database
from ledger.keys import Role, issue_key
from ledger.store import PostgresEventStore

# More than the threads of asyncio's default executor (the CPU count plus 4) below 8 CPUs.
WAITING_SUBMITS = 12


def test_waiting_submits_leave_threads_for_key_checks(
    database: Database,
    session_pool: ConnectionPool[Any],
    store: PostgresEventStore,
    tenant_id: str,
) -> None:
    _, token = issue_key(store, tenant_id, role=Role.STAFF, name="loop test", issued_by="test")
    headers = {"Authorization": f"Bearer {token}"}
    release = threading.Event()
    holding = threading.Semaphore(0)

    def hold(_: psycopg.Connection[Any]) -> None:
        holding.release()
        assert release.wait(30)

    with TestClient(create_app(database, pool=session_pool), headers=headers) as client:
        committer = client.app.state.commands.store.committer  # type: ignore[attr-defined]
        # Occupy every committer thread, so that each submit waits for its commit.
        holders = [
            threading.Thread(
                target=committer.run, args=(tenant_id, hold), kwargs={"lock_key": f"hold-{n}"}
            )
            for n in range(committer.workers)
        ]
        for holder in holders:
            # One at a time: units queued together would share one worker's batch.
            holder.start()
            assert holding.acquire(timeout=30)

        def submit(n: int) -> int:
            # A reporter's contact makes the submit wait for its commit in a thread.
            response = client.post(
                f"/tenants/{tenant_id}/incidents",
                json={"description": f"Loose railing {n}", "reporter": {"email": f"r{n}@ex.org"}},
            )
            return response.status_code

        with ThreadPoolExecutor(max_workers=WAITING_SUBMITS) as pool:
            submits = [pool.submit(submit, n) for n in range(WAITING_SUBMITS)]
            time.sleep(1.0)
            started = time.monotonic()
            summary = client.get(f"/tenants/{tenant_id}/sla/summary")
            answered_in = time.monotonic() - started
            release.set()
            statuses = [future.result(timeout=60) for future in submits]
        for holder in holders:
            holder.join(30)

    assert summary.status_code == 200, summary.text
    # The key check found a free thread while the submits waited for their commit.
    assert answered_in < 5
    assert statuses == [201] * WAITING_SUBMITS
