"""Health, readiness, metrics, request ids and the logs that carry them."""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from collections.abc import Iterator
from typing import Any
from uuid import UUID

import pytest
from fastapi.testclient import TestClient
from psycopg_pool import ConnectionPool

from api.app import create_app
from api.observability import new_request_id
from ledger.database import Database
from ledger.keys import Role, issue_key
from ledger.logs import configure_logging
from ledger.store import PostgresEventStore
from projections.runtime import catch_up, default_projections


@pytest.fixture
def staff(store: PostgresEventStore, tenant_id: str) -> dict[str, str]:
    _, token = issue_key(store, tenant_id, role=Role.STAFF, name="ops test", issued_by="test")
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def fresh_client(fresh_database: Database, fresh_pool: ConnectionPool[Any]) -> Iterator[TestClient]:
    with TestClient(create_app(fresh_database, pool=fresh_pool, max_lag=0)) as client:
        yield client


def test_health_answers_without_a_database() -> None:
    database = Database("", "", "app", "", "worker")
    unreachable = ConnectionPool("host=127.0.0.1 port=1 connect_timeout=1", open=False)
    with TestClient(create_app(database, pool=unreachable)) as client:
        health = client.get("/health")
        ready = client.get("/ready")

    assert health.status_code == 200
    assert ready.status_code == 503
    assert ready.json()["checks"]["database"]["ok"] is False


def test_ready_waits_for_the_projector(
    fresh_client: TestClient, fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    from ledger.commands import Actor, IncidentCommands
    from ledger.tenants import create_tenant

    catch_up(fresh_database, default_projections())
    empty = fresh_client.get("/ready")
    create_tenant(fresh_store, "ops", name="Ops", time_zone="UTC", occurred_at=_utc(2015, 1, 1))
    IncidentCommands(fresh_store).submit(
        "ops", {"description": "Lift stuck"}, actor=Actor("clerk", "staff")
    )
    behind = fresh_client.get("/ready")
    # The projector reads only below the server-wide transaction horizon, so a transaction
    # open elsewhere on a shared server can hold it back for a moment.
    deadline = time.monotonic() + 30
    while True:
        catch_up(fresh_database, default_projections())
        caught_up = fresh_client.get("/ready")
        if caught_up.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)

    assert empty.status_code == 200, empty.text
    assert empty.json()["checks"]["schema"]["ok"] is True
    assert behind.status_code == 503
    # The tenant's TenantCreated event and the report, for every projection.
    assert behind.json()["checks"]["projections"]["events_behind"] == {
        projection.name: 2 for projection in default_projections()
    }
    assert caught_up.status_code == 200


def test_ready_fails_on_an_old_schema(fresh_client: TestClient, fresh_database: Database) -> None:
    catch_up(fresh_database, default_projections())
    with fresh_database.connect_owner() as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0001'")

    ready = fresh_client.get("/ready")

    assert ready.status_code == 503
    assert ready.json()["checks"]["schema"] == {
        "ok": False,
        "revision": "0001",
        "expected": ready.json()["checks"]["schema"]["expected"],
    }
    assert ready.json()["checks"]["schema"]["expected"] != "0001"


def test_metrics_count_requests_by_route(
    database: Database,
    session_pool: ConnectionPool[Any],
    tenant_id: str,
    staff: dict[str, str],
) -> None:
    with TestClient(create_app(database, pool=session_pool)) as client:
        client.post(f"/tenants/{tenant_id}/incidents", json={"description": "x"}, headers=staff)
        client.get(f"/tenants/{tenant_id}/sla/summary")  # no key: 401
        text = client.get("/metrics").text

    route = "/tenants/{tenant_id}/incidents"
    assert _sample(text, "civicpulse_http_requests_total", route=route, status="201") >= 1
    assert _sample(text, "civicpulse_http_requests_total", route=route + "/../sla/summary") == 0
    summary = "/tenants/{tenant_id}/sla/summary"
    assert _sample(text, "civicpulse_http_requests_total", route=summary, status="401") >= 1
    assert _sample(text, "civicpulse_events_appended_total", event_type="ReportSubmitted") >= 1
    assert "civicpulse_projection_lag_events" in text
    assert tenant_id not in text


def test_request_id_is_echoed_and_logged(
    database: Database,
    session_pool: ConnectionPool[Any],
    tenant_id: str,
    staff: dict[str, str],
    capfd: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO", "json")
    try:
        with TestClient(create_app(database, pool=session_pool)) as client:
            given = client.post(
                f"/tenants/{tenant_id}/incidents",
                json={"description": "Leaking radiator", "title": "Radiator"},
                headers={**staff, "X-Request-ID": "req-42"},
            )
            hostile = client.get("/health", headers={"X-Request-ID": "bad id; drop"})
            events = client.get(
                f"/tenants/{tenant_id}/incidents/{given.json()['incident_id']}/events",
                headers=staff,
            ).json()
    finally:
        logging.getLogger().handlers.clear()
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line]

    assert given.headers["x-request-id"] == "req-42"
    assert UUID(hostile.headers["x-request-id"]).version == 4
    assert events[0]["metadata"]["correlation_id"] == "req-42"
    access = [line for line in lines if line.get("request_id") == "req-42"]
    assert access, lines
    assert access[0]["tenant_id"] == tenant_id
    assert access[0]["status"] == 201
    assert all("Bearer" not in json.dumps(line) for line in lines)
    assert all("Leaking radiator" not in json.dumps(line) for line in lines)


def _sample(text: str, name: str, **labels: str) -> float:
    """Sum the samples of metric `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        label_text, value = line[len(name) + 1 :].rsplit("} ", 1)
        found = dict(part.split("=", 1) for part in label_text.split(","))
        if all(found.get(key) == f'"{wanted}"' for key, wanted in labels.items()):
            total += float(value)
    return total


def _utc(*parts: int) -> Any:
    from datetime import UTC, datetime

    return datetime(*parts, tzinfo=UTC)


def test_worker_app_freezes_startup_objects(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    import api.server
    from ledger.settings import get_settings

    monkeypatch.setenv("DATABASE_URL", database.owner_conninfo)
    # The logging setup of the other tests stays as it is.
    monkeypatch.setattr(api.server, "configure_logging", lambda *_: None)
    get_settings.cache_clear()
    frozen_before = gc.get_freeze_count()
    try:
        app = api.server.create_worker_app()
        frozen_after = gc.get_freeze_count()
        with TestClient(app) as client:
            health = client.get("/health")
    finally:
        gc.unfreeze()
        get_settings.cache_clear()

    assert health.status_code == 200
    # At least the app's own routes and models, which are far more than a thousand objects.
    assert frozen_after - frozen_before > 1000


def test_new_request_id_fresh_per_process() -> None:
    ids = [new_request_id() for _ in range(1000)]
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    from_child = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(child, 0)
    from_parent = new_request_id()

    assert len(set(ids)) == len(ids)
    assert all(UUID(text).version == 4 for text in ids)
    assert all(str(UUID(text)) == text for text in ids)
    assert from_child != from_parent
