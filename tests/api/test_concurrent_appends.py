"""Many concurrent clients against the real app on loopback: group commit loses nothing."""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests
import uvicorn
from psycopg_pool import ConnectionPool

from api.app import create_app
from ledger.database import Database
from ledger.keys import Role, issue_key
from ledger.store import PostgresEventStore

CLIENTS = 32


def _serve(app: Any) -> tuple[uvicorn.Server, threading.Thread, int]:
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port: int = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, port


def test_concurrent_clients_each_get_their_answer(
    database: Database, store: PostgresEventStore, tenant_id: str
) -> None:
    _, token = issue_key(store, tenant_id, role=Role.STAFF, name="load", issued_by="test")
    pool: ConnectionPool[Any] = ConnectionPool(
        database.app_conninfo, min_size=4, max_size=16, open=True
    )
    server, thread, port = _serve(create_app(database, pool=pool))
    base = f"http://127.0.0.1:{port}/tenants/{tenant_id}"
    local = threading.local()

    def session() -> requests.Session:
        if not hasattr(local, "session"):
            local.session = requests.Session()
            local.session.headers["Authorization"] = f"Bearer {token}"
        http: requests.Session = local.session
        return http

    # Every fifth request repeats an earlier key: a client retrying while its first try runs.
    keys = [f"load-{n}" if n % 5 else f"load-{n - 5 if n >= 5 else n}" for n in range(400)]

    def submit(key: str) -> tuple[str, requests.Response]:
        body = {"description": f"Report {key}"}
        response = session().post(
            f"{base}/incidents", json=body, headers={"Idempotency-Key": key}, timeout=60
        )
        return key, response

    try:
        with ThreadPoolExecutor(max_workers=CLIENTS) as clients:
            submitted = list(clients.map(submit, keys))
        assert all(response.status_code == 201 for _, response in submitted), [
            response.text for _, response in submitted if response.status_code != 201
        ][:3]
        incident_of: dict[str, set[str]] = defaultdict(set)
        for key, response in submitted:
            incident_of[key].add(response.json()["incident_id"])

        # Then every client acts on a few shared incidents with the version it read, so
        # most lose the race and must get 409 with the current version, not a lost write.
        shared = sorted({next(iter(ids)) for ids in incident_of.values()})[:4]

        def acknowledge_or_assign(n: int) -> tuple[str, requests.Response]:
            incident = shared[n % len(shared)]
            read = session().get(f"{base}/incidents/{incident}", timeout=60)
            command = "assign" if read.json()["status"] != "submitted" else "acknowledge"
            body = {"assignee": f"crew-{n}"} if command == "assign" else None
            response = session().post(
                f"{base}/incidents/{incident}/{command}",
                json=body,
                headers={"If-Match": read.headers["etag"]},
                timeout=60,
            )
            return incident, response

        with ThreadPoolExecutor(max_workers=CLIENTS) as clients:
            acted = list(clients.map(acknowledge_or_assign, range(200)))
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        pool.close()

    # Each key made one incident, whatever the number of tries.
    assert all(len(ids) == 1 for ids in incident_of.values())
    assert len(incident_of) == len(set(keys))
    replayed = Counter(response.json()["replayed"] for _, response in submitted)
    assert replayed[False] == len(set(keys))
    assert replayed[True] == len(keys) - len(set(keys))

    statuses = Counter(response.status_code for _, response in acted)
    assert set(statuses) <= {200, 409}, statuses
    assert statuses[409] > 0
    with database.connect_owner() as conn:
        reports = conn.execute(
            "SELECT count(*) FROM events WHERE tenant_id = %s AND event_type = 'ReportSubmitted'",
            (tenant_id,),
        ).fetchone()
        versions = dict(
            conn.execute(
                "SELECT stream_id, version FROM streams WHERE stream_id = ANY(%s)",
                ([f"incident-{incident}" for incident in shared],),
            ).fetchall()
        )
    assert reports is not None and reports[0] == len(set(keys))
    for incident in shared:
        won = sorted(
            response.json()["version"]
            for acted_on, response in acted
            if acted_on == incident and response.status_code == 200
        )
        # Every success is a distinct version of the stream, and every version after the
        # report was returned to one client as a success.
        assert won == list(range(2, versions[f"incident-{incident}"] + 1))
    for _, response in acted:
        if response.status_code == 409:
            assert response.json()["current_version"] >= 1
