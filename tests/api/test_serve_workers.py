"""`civicpulse serve --workers 2` as a user runs it: one port, two processes, one ledger."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest
import requests
from psycopg_pool import ConnectionPool

from ledger.database import Database, set_tenant
from ledger.keys import Role, issue_key, revoke_key
from ledger.store import PostgresEventStore
from ledger.tenants import create_tenant
from tests.conftest import create_database, drop_database

TENANT = "workers"
REPORT = {"description": "Streetlight out", "category": "Street Light Outages"}
CLIENTS = 16


@dataclass(frozen=True)
class Served:
    base: str
    token: str
    process: subprocess.Popen[bytes]
    database: Database


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def serving(database: Database, log: Path) -> Iterator[Served]:
    """Start `serve --workers 2` on a tenant of its own; stop it when the block ends."""
    with ConnectionPool(database.app_conninfo, min_size=1, max_size=2) as pool:
        store = PostgresEventStore(pool)
        create_tenant(store, TENANT, name="Workers", time_zone="UTC", occurred_at=datetime.now(UTC))
        _, token = issue_key(store, TENANT, role=Role.STAFF, name="staff", issued_by="test")
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database.owner_conninfo,
        "CIVICPULSE_LOG_LEVEL": "WARNING",
        "CIVICPULSE_API_POOL_SIZE": "4",
    }
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "serve", "--workers", "2", "--port", str(port)],
            env=env,
            stdout=output,
            stderr=output,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        yield Served(base, token, process, database)
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server and its workers: SIGTERM first, as uvicorn's supervisor expects.

    A SIGKILL of the supervisor alone would leave its workers running.
    """
    if process.poll() is not None:
        return
    workers = live_workers(process)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(30)
    _, alive = psutil.wait_procs(workers, timeout=30)
    for worker in alive:
        worker.kill()


@pytest.fixture(scope="module")
def served(server_conninfo: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One server for the tests that leave it running, on a database of this module's own."""
    name, database = create_database(server_conninfo)
    try:
        with serving(database, tmp_path_factory.mktemp("serve") / "serve.log") as server:
            yield server
    finally:
        drop_database(server_conninfo, name)


def post_report(base: str, token: str, key: str) -> requests.Response:
    # A new connection each time, so that requests spread over both workers.
    return requests.post(
        f"{base}/tenants/{TENANT}/incidents",
        json=REPORT,
        headers={"Authorization": f"Bearer {token}", "Idempotency-Key": key},
        timeout=60,
    )


def live_workers(process: subprocess.Popen[bytes]) -> list[psutil.Process]:
    return [
        child
        for child in psutil.Process(process.pid).children(recursive=True)
        if child.status() != psutil.STATUS_ZOMBIE
    ]


def test_serve_starts_two_workers(served: Served) -> None:
    workers = live_workers(served.process)

    assert len(workers) >= 2, workers


def test_same_key_across_workers_one_incident(served: Served) -> None:
    base, token = served.base, served.token
    key = f"same-{uuid.uuid4().hex[:8]}"

    with ThreadPoolExecutor(CLIENTS) as pool:
        responses = list(pool.map(lambda _: post_report(base, token, key), range(CLIENTS * 2)))
    with served.database.connect_owner() as conn, conn.transaction():
        set_tenant(conn, TENANT)
        stored = conn.execute(
            "SELECT count(*) FROM events WHERE metadata->>'idempotency_key' = %s", (key,)
        ).fetchone()

    assert [r.status_code for r in responses] == [201] * len(responses), responses[0].text
    assert len({r.json()["incident_id"] for r in responses}) == 1
    assert sum(not r.json()["replayed"] for r in responses) == 1
    assert stored == (1,)


def test_distinct_keys_across_workers_all_stored(served: Served) -> None:
    base, token = served.base, served.token
    keys = [f"distinct-{n}-{uuid.uuid4().hex[:8]}" for n in range(CLIENTS * 4)]

    with ThreadPoolExecutor(CLIENTS) as pool:
        responses = list(pool.map(lambda key: post_report(base, token, key), keys))
    with served.database.connect_owner() as conn, conn.transaction():
        set_tenant(conn, TENANT)
        stored = conn.execute(
            "SELECT count(DISTINCT stream_id) FROM events WHERE event_type = 'ReportSubmitted' "
            "AND metadata->>'idempotency_key' = ANY(%s)",
            (keys,),
        ).fetchone()

    assert [r.status_code for r in responses] == [201] * len(keys)
    assert len({r.json()["incident_id"] for r in responses}) == len(keys)
    assert stored == (len(keys),)


def test_revoked_key_rejected_by_every_worker(served: Served) -> None:
    base = served.base
    with ConnectionPool(served.database.app_conninfo, min_size=1, max_size=2) as pool:
        store = PostgresEventStore(pool)
        key, token = issue_key(store, TENANT, role=Role.STAFF, name="soon revoked", issued_by="t")
        # Enough requests that both workers cache the key.
        with ThreadPoolExecutor(CLIENTS) as clients:
            before = list(clients.map(lambda n: post_report(base, token, f"r{n}"), range(32)))
        revoke_key(store, TENANT, key.key_id, revoked_by="test")
    with ThreadPoolExecutor(CLIENTS) as clients:
        after = list(clients.map(lambda n: post_report(base, token, f"r-after{n}"), range(32)))

    assert [r.status_code for r in before] == [201] * 32
    assert [r.status_code for r in after] == [401] * 32


def test_sigterm_stops_all_workers(fresh_database: Database, tmp_path: Path) -> None:
    with serving(fresh_database, tmp_path / "serve.log") as server:
        workers = live_workers(server.process)
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(60)
        _, alive = psutil.wait_procs(workers, timeout=30)

    assert code == 0
    assert len(workers) >= 2
    assert alive == []


def posted_reports(text: str) -> float:
    """Sum the request counter's series for successful report submissions in an exposition."""
    total = 0.0
    for line in text.splitlines():
        if (
            line.startswith("civicpulse_http_requests_total{")
            and 'method="POST"' in line
            and "/incidents" in line
            and 'status="201"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_sum_over_workers(served: Served) -> None:
    base, token = served.base, served.token
    before = posted_reports(requests.get(f"{base}/metrics", timeout=30).text)
    count = CLIENTS * 2

    with ThreadPoolExecutor(CLIENTS) as pool:
        keys = [f"metrics-{uuid.uuid4().hex[:8]}" for _ in range(count)]
        responses = list(pool.map(lambda key: post_report(base, token, key), keys))
    # New connections, so that the scrapes land on both workers.
    scrapes = [requests.get(f"{base}/metrics", timeout=30) for _ in range(8)]

    assert [response.status_code for response in responses] == [201] * count
    for scrape in scrapes:
        assert scrape.status_code == 200
        assert posted_reports(scrape.text) - before == count
