"""The officer's view of tamper evidence: the latest seal and a verify over the API."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient
from psycopg_pool import ConnectionPool

from api.app import create_app
from ledger.commands import Actor, IncidentCommands
from ledger.database import Database
from ledger.keys import Role, issue_key
from ledger.seals import seal_all
from ledger.store import PostgresEventStore
from ledger.tenants import create_tenant

TENANT = "sealed-city"


@pytest.fixture
def officer(fresh_store: PostgresEventStore) -> dict[str, str]:
    create_tenant(
        fresh_store, TENANT, name="Sealed", time_zone="UTC", occurred_at=datetime.now(UTC)
    )
    commands = IncidentCommands(fresh_store)
    for number in range(5):
        commands.submit(TENANT, {"description": f"Report {number}"}, actor=Actor("c", "staff"))
    _, token = issue_key(fresh_store, TENANT, role=Role.OFFICER, name="auditor", issued_by="t")
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def client(fresh_database: Database, fresh_pool: ConnectionPool[Any]) -> Iterator[TestClient]:
    with TestClient(create_app(fresh_database, pool=fresh_pool)) as test_client:
        yield test_client


def test_verify_names_an_altered_event(
    client: TestClient, fresh_database: Database, officer: dict[str, str]
) -> None:
    before_seal = client.get(f"/tenants/{TENANT}/seals/latest", headers=officer)
    seal_all(fresh_database)
    sealed = client.get(f"/tenants/{TENANT}/seals/latest", headers=officer)
    clean = client.get(f"/tenants/{TENANT}/verify", headers=officer)
    with fresh_database.connect_owner() as conn:
        conn.execute("SET session_replication_role = replica")  # skip the append-only trigger
        altered = conn.execute(
            """
            UPDATE events SET payload = jsonb_set(payload, '{description}', '"Nothing"')
            WHERE position = (SELECT min(position) FROM events
                              WHERE tenant_id = %s AND event_type = 'ReportSubmitted')
            RETURNING position, stream_id
            """,
            (TENANT,),
        ).fetchone()
    assert altered is not None
    tampered = client.get(f"/tenants/{TENANT}/verify", headers=officer)

    assert before_seal.status_code == 200 and before_seal.json() is None
    assert sealed.json()["event_count"] >= 6
    assert len(sealed.json()["merkle_root"]) == 64
    assert clean.status_code == 200, clean.text
    assert clean.json()["ok"] is True
    assert clean.json()["unsealed_events"] == 1  # the seal event itself, sealed next time
    assert tampered.json()["ok"] is False
    first = tampered.json()["mismatches"][0]
    assert first["position"] == altered[0]
    assert first["stream_id"] == altered[1]


def test_staff_may_not_verify(
    client: TestClient, fresh_store: PostgresEventStore, officer: dict[str, str]
) -> None:
    _, token = issue_key(fresh_store, TENANT, role=Role.STAFF, name="clerk", issued_by="t")
    response = client.get(f"/tenants/{TENANT}/verify", headers={"Authorization": f"Bearer {token}"})

    assert response.status_code == 403
