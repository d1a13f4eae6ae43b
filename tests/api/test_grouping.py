from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from psycopg_pool import ConnectionPool

from api.app import create_app
from ledger.database import Database
from ledger.keys import Role, issue_key
from ledger.store import PostgresEventStore
from tests.api.test_app import assert_problem
from tests.conftest import project_everything

LAT, LON = 42.3474, -71.0944
REPORT = {
    "description": "Street light out on the corner",
    "category": "Street Light Outages",
    "latitude": LAT,
    "longitude": LON,
}


@pytest.fixture
def clients(
    database: Database, session_pool: ConnectionPool[Any], store: PostgresEventStore, tenant_id: str
) -> Iterator[dict[Role, TestClient]]:
    """One client per role of `tenant_id`."""
    app = create_app(database, pool=session_pool)
    clients = {}
    for role in Role:
        _, token = issue_key(store, tenant_id, role=role, name=f"test {role}", issued_by="test")
        clients[role] = TestClient(app, headers={"Authorization": f"Bearer {token}"})
    with clients[Role.STAFF]:
        yield clients


def submit(client: TestClient, tenant_id: str, **changes: Any) -> str:
    response = client.post(f"/tenants/{tenant_id}/incidents", json={**REPORT, **changes})
    assert response.status_code == 201, response.text
    incident: str = response.json()["incident_id"]
    return incident


def test_settings_round_trip(clients: dict[Role, TestClient], tenant_id: str) -> None:
    url = f"/tenants/{tenant_id}/grouping"
    before = clients[Role.STAFF].get(url)
    put = clients[Role.ADMIN].put(url, json={"distance_m": 80, "min_similarity": 70})
    after = clients[Role.OFFICER].get(url)

    assert before.status_code == 200
    assert before.json()["distance_m"] == 150
    assert put.status_code == 200, put.text
    assert after.json()["distance_m"] == 80
    assert after.json()["min_similarity"] == 70
    assert after.json()["window_hours"] == 72


@pytest.mark.parametrize(
    ("document", "words"),
    [
        ({"distance_m": -5}, ["distance_m", "-5", "give meters"]),
        ({"min_similarity": 140}, ["min_similarity", "140", "0 (any text) to 100"]),
        ({"related_categories": [["A", "A"]]}, ["related_categories", "two different"]),
        ({"placeholders": [{"latitude": 95, "longitude": 0}]}, ["placeholders.0.latitude", "95"]),
        ({"ungrouped_categories": [" "]}, ["ungrouped_categories", "empty", "category names"]),
        ({"ungrouped_categories": "Sticker Request"}, ["ungrouped_categories", "should be a list"]),
        ({"radius": 3}, ["radius", "remove it"]),
    ],
)
def test_invalid_settings_name_field_and_fix(
    clients: dict[Role, TestClient], tenant_id: str, document: dict[str, Any], words: list[str]
) -> None:
    response = clients[Role.ADMIN].put(f"/tenants/{tenant_id}/grouping", json=document)
    assert_problem(response, 422, *words)


def test_group_and_suggestions(
    clients: dict[Role, TestClient], tenant_id: str, database: Database
) -> None:
    staff = clients[Role.STAFF]
    first = submit(staff, tenant_id)
    second = submit(staff, tenant_id, description="The street light is out", longitude=LON + 0.0004)
    far = submit(staff, tenant_id, latitude=LAT + 0.01)
    project_everything(database)

    group = staff.get(f"/tenants/{tenant_id}/incidents/{first}/group")
    alone = staff.get(f"/tenants/{tenant_id}/incidents/{far}/group")
    assert group.status_code == 200, group.text
    members = group.json()["members"]
    assert {member["incident_id"] for member in members} == {first, second}
    assert group.json()["group_id"] == min(first, second)
    assert all(
        set(member)
        == {"incident_id", "category", "status", "submitted_at", "latitude", "longitude"}
        for member in members
    )
    assert [member["incident_id"] for member in alone.json()["members"]] == [far]

    url = f"/tenants/{tenant_id}/incidents/suggestions"
    draft = {"description": "light is out", "category": "Street Light Outages"}
    near = clients[Role.REPORTER].post(url, json={**draft, "latitude": LAT, "longitude": LON})
    nowhere = staff.post(url, json={**draft, "latitude": LAT - 0.02, "longitude": LON})
    other_kind = staff.post(
        url, json={**draft, "category": "Pothole", "latitude": LAT, "longitude": LON}
    )
    assert near.status_code == 200, near.text
    assert [item["incident_id"] for item in near.json()] == [first, second]
    assert near.json()[0]["distance_m"] == 0
    assert nowhere.json() == []
    assert other_kind.json() == []


def test_suggestions_reject_bad_draft(clients: dict[Role, TestClient], tenant_id: str) -> None:
    url = f"/tenants/{tenant_id}/incidents/suggestions"
    missing = clients[Role.STAFF].post(url, json={"description": "light out"})
    wrong = clients[Role.STAFF].post(url, json={"latitude": 91, "longitude": 0})
    assert_problem(missing, 422, "latitude")
    assert_problem(wrong, 422, "latitude")


def test_placeholder_draft_gets_no_suggestions(
    clients: dict[Role, TestClient], tenant_id: str, database: Database
) -> None:
    placeholder = {"latitude": LAT, "longitude": LON, "radius_m": 5}
    response = clients[Role.ADMIN].put(
        f"/tenants/{tenant_id}/grouping", json={"placeholders": [placeholder]}
    )
    assert response.status_code == 200, response.text
    staff = clients[Role.STAFF]
    first = submit(staff, tenant_id)
    submit(staff, tenant_id)
    project_everything(database)

    group = staff.get(f"/tenants/{tenant_id}/incidents/{first}/group")
    draft = {**REPORT, "latitude": LAT, "longitude": LON}
    suggestions = staff.post(f"/tenants/{tenant_id}/incidents/suggestions", json=draft)
    assert [member["incident_id"] for member in group.json()["members"]] == [first]
    assert suggestions.json() == []


def test_split_and_merge_through_commands(
    clients: dict[Role, TestClient], tenant_id: str, database: Database
) -> None:
    staff = clients[Role.STAFF]
    first = submit(staff, tenant_id)
    second = submit(staff, tenant_id)
    far = submit(staff, tenant_id, latitude=LAT + 0.01)
    base = f"/tenants/{tenant_id}/incidents"

    stale = staff.post(f"{base}/{second}/split-group", headers={"If-Match": '"7"'})
    split = staff.post(
        f"{base}/{second}/split-group", headers={"If-Match": '"1"', "Idempotency-Key": "split-1"}
    )
    again = staff.post(
        f"{base}/{second}/split-group", headers={"If-Match": '"1"', "Idempotency-Key": "split-1"}
    )
    merge = staff.post(f"{base}/{far}/merge-group", json={"with_incident": first})
    itself = staff.post(f"{base}/{far}/merge-group", json={"with_incident": far})
    unknown = staff.post(
        f"{base}/{far}/merge-group", json={"with_incident": "00000000-0000-4000-8000-000000000000"}
    )
    reporter = clients[Role.REPORTER].post(
        f"{base}/{far}/merge-group", json={"with_incident": first}
    )
    project_everything(database)

    assert_problem(stale, 409, "7")
    assert split.status_code == 200, split.text
    assert split.headers["etag"] == '"2"'
    assert again.headers["idempotent-replayed"] == "true"
    assert merge.status_code == 200, merge.text
    assert_problem(itself, 422, "itself")
    assert_problem(unknown, 422, "with_incident")
    assert reporter.status_code == 403
    members = staff.get(f"{base}/{first}/group").json()["members"]
    assert {member["incident_id"] for member in members} == {first, far}
    alone = staff.get(f"{base}/{second}/group").json()["members"]
    assert [member["incident_id"] for member in alone] == [second]


def test_reporter_sees_only_own_group(
    clients: dict[Role, TestClient], tenant_id: str, store: PostgresEventStore
) -> None:
    own = submit(clients[Role.REPORTER], tenant_id)
    other = submit(clients[Role.STAFF], tenant_id)

    mine = clients[Role.REPORTER].get(f"/tenants/{tenant_id}/incidents/{own}/group")
    theirs = clients[Role.REPORTER].get(f"/tenants/{tenant_id}/incidents/{other}/group")
    assert mine.status_code == 200
    assert_problem(theirs, 404)
