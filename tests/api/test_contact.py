"""Reporters' contact details through the API: who sees them, the access record, erasure."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from psycopg_pool import ConnectionPool

from api.app import create_app
from ledger.database import Database, set_tenant
from ledger.keys import Role, issue_key
from ledger.store import PostgresEventStore

REPORTER = {"name": "Ada Quinn", "email": "ada.quinn@example.org", "phone": "+1 617 555 0101"}


@pytest.fixture
def keys(store: PostgresEventStore, tenant_id: str) -> dict[Role, dict[str, str]]:
    headers = {}
    for role in Role:
        _, token = issue_key(store, tenant_id, role=role, name=f"{role} key", issued_by="test")
        headers[role] = {"Authorization": f"Bearer {token}"}
    return headers


@pytest.fixture
def client(database: Database, session_pool: ConnectionPool[Any]) -> Iterator[TestClient]:
    with TestClient(create_app(database, pool=session_pool)) as test_client:
        yield test_client


def submit(client: TestClient, tenant_id: str, headers: dict[str, str]) -> str:
    response = client.post(
        f"/tenants/{tenant_id}/incidents",
        json={"description": "Broken step at the library", "reporter": REPORTER},
        headers=headers,
    )
    assert response.status_code == 201, response.text
    incident_id: str = response.json()["incident_id"]
    return incident_id


def access_events(store: PostgresEventStore, tenant_id: str) -> list[tuple[Any, ...]]:
    with store.pool.connection() as conn:
        set_tenant(conn, tenant_id)
        return conn.execute(
            "SELECT payload, metadata FROM events WHERE event_type = 'ContactDetailsAccessed'"
        ).fetchall()


def test_staff_read_contact_details(
    client: TestClient, tenant_id: str, keys: dict[Role, dict[str, str]]
) -> None:
    incident = submit(client, tenant_id, keys[Role.REPORTER])
    contact = client.get(
        f"/tenants/{tenant_id}/incidents/{incident}/contact", headers=keys[Role.STAFF]
    )

    assert contact.status_code == 200, contact.text
    assert contact.json()["name"] == REPORTER["name"]
    assert contact.json()["email"] == REPORTER["email"]
    assert contact.json()["erased"] is False


def test_officers_need_a_recorded_reason(
    client: TestClient,
    tenant_id: str,
    keys: dict[Role, dict[str, str]],
    store: PostgresEventStore,
) -> None:
    incident = submit(client, tenant_id, keys[Role.STAFF])
    url = f"/tenants/{tenant_id}/incidents/{incident}/contact"

    without = client.get(url, headers=keys[Role.OFFICER])
    recorded_before = len(access_events(store, tenant_id))
    with_reason = client.get(
        url, params={"reason": "complaint 2026-17 review"}, headers=keys[Role.OFFICER]
    )
    recorded = access_events(store, tenant_id)

    assert without.status_code == 422
    assert "reason" in without.json()["detail"]
    assert recorded_before == 0
    assert with_reason.status_code == 200
    assert with_reason.json()["phone"] == REPORTER["phone"]
    assert len(recorded) == 1
    assert recorded[0][0]["reason"] == "complaint 2026-17 review"
    assert recorded[0][0]["incident_id"] == incident
    assert recorded[0][1]["role"] == "officer"


@pytest.mark.parametrize("role", [Role.REPORTER, Role.ADMIN])
def test_other_roles_never_see_contact_details(
    client: TestClient, tenant_id: str, keys: dict[Role, dict[str, str]], role: Role
) -> None:
    incident = submit(client, tenant_id, keys[Role.REPORTER])
    response = client.get(f"/tenants/{tenant_id}/incidents/{incident}/contact", headers=keys[role])

    assert response.status_code == 403


def test_incident_views_carry_no_contact_data(
    client: TestClient, tenant_id: str, keys: dict[Role, dict[str, str]]
) -> None:
    incident = submit(client, tenant_id, keys[Role.REPORTER])
    base = f"/tenants/{tenant_id}/incidents/{incident}"
    views = [
        client.get(base, headers=keys[Role.STAFF]).text,
        client.get(base, headers=keys[Role.REPORTER]).text,
        client.get(f"{base}/events", headers=keys[Role.OFFICER]).text,
    ]

    for text in views:
        for value in REPORTER.values():
            assert value not in text
        assert "aes-256-gcm" not in text
    assert "reporter_id" not in client.get(base, headers=keys[Role.REPORTER]).json()


def test_admin_erases_a_reporter(
    client: TestClient, tenant_id: str, keys: dict[Role, dict[str, str]]
) -> None:
    incident = submit(client, tenant_id, keys[Role.REPORTER])
    reporter_id = client.get(
        f"/tenants/{tenant_id}/incidents/{incident}", headers=keys[Role.STAFF]
    ).json()["reporter_id"]
    url = f"/tenants/{tenant_id}/reporters/{reporter_id}/erase"

    erased = client.post(url, json={"reason": "request by phone"}, headers=keys[Role.ADMIN])
    again = client.post(url, json={"reason": "request by phone"}, headers=keys[Role.ADMIN])
    by_staff = client.post(url, json={"reason": "x"}, headers=keys[Role.STAFF])
    contact = client.get(
        f"/tenants/{tenant_id}/incidents/{incident}/contact", headers=keys[Role.STAFF]
    )
    unknown = client.post(
        f"/tenants/{tenant_id}/reporters/00000000-0000-4000-8000-000000000000/erase",
        json={"reason": "x"},
        headers=keys[Role.ADMIN],
    )

    assert erased.status_code == 200, erased.text
    assert erased.json()["already_erased"] is False
    assert again.json()["already_erased"] is True
    assert by_staff.status_code == 403
    assert contact.json()["erased"] is True
    assert contact.json().get("name") is None
    assert unknown.status_code == 404


def test_plain_personal_fields_are_rejected(
    client: TestClient, tenant_id: str, keys: dict[Role, dict[str, str]]
) -> None:
    response = client.post(
        f"/tenants/{tenant_id}/incidents",
        json={"description": "Leak", "email": "ada.quinn@example.org"},
        headers=keys[Role.STAFF],
    )
    bad_email = client.post(
        f"/tenants/{tenant_id}/incidents",
        json={"description": "Leak", "reporter": {"email": "not an address"}},
        headers=keys[Role.STAFF],
    )

    assert response.status_code == 422
    assert "reporter.email" in response.json()["detail"]
    assert "ada.quinn@example.org" not in response.text
    assert bad_email.status_code == 422


def test_officer_access_shows_in_the_incident_audit_trail(
    client: TestClient, tenant_id: str, keys: dict[Role, dict[str, str]]
) -> None:
    incident = submit(client, tenant_id, keys[Role.REPORTER])
    client.get(
        f"/tenants/{tenant_id}/incidents/{incident}/contact",
        params={"reason": "complaint review"},
        headers=keys[Role.OFFICER],
    )
    other = submit(client, tenant_id, keys[Role.REPORTER])
    trail = client.get(
        f"/tenants/{tenant_id}/audit/events",
        params={"incident_id": incident},
        headers=keys[Role.OFFICER],
    )
    other_trail = client.get(
        f"/tenants/{tenant_id}/audit/events",
        params={"incident_id": other},
        headers=keys[Role.OFFICER],
    )

    assert trail.status_code == 200, trail.text
    types = [event["event_type"] for event in trail.json()["events"]]
    assert types == ["ReportSubmitted", "ContactDetailsAccessed"]
    other_types = [event["event_type"] for event in other_trail.json()["events"]]
    assert other_types == ["ReportSubmitted"]
