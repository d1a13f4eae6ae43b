from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from psycopg_pool import ConnectionPool

from api.app import create_app
from ledger.database import Database
from ledger.keys import Role, issue_key
from ledger.store import PostgresEventStore
from tests.conftest import project_everything

PROBLEM = "application/problem+json"
REPORT = {
    "description": "Water bubbling up through the sidewalk",
    "category": "Water leak",
    "latitude": 42.35,
    "longitude": -71.06,
}


@pytest.fixture
def client(
    database: Database,
    session_pool: ConnectionPool[Any],
    store: PostgresEventStore,
    tenant_id: str,
) -> Iterator[TestClient]:
    """A client that sends a staff key of `tenant_id` with every request."""
    _, token = issue_key(store, tenant_id, role=Role.STAFF, name="test staff", issued_by="test")
    headers = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app(database, pool=session_pool), headers=headers) as test_client:
        yield test_client


def submit(client: TestClient, tenant_id: str, **headers: str) -> Any:
    response = client.post(f"/tenants/{tenant_id}/incidents", json=REPORT, headers=headers)
    assert response.status_code == 201, response.text
    return response


def assert_problem(response: Any, status: int, *words: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["type"].startswith("https://")
    for word in words:
        assert word in body["detail"]
    return body


def test_submit_then_get(client: TestClient, tenant_id: str) -> None:
    created = submit(client, tenant_id)
    incident = created.json()["incident_id"]

    fetched = client.get(f"/tenants/{tenant_id}/incidents/{incident}")
    assert created.headers["location"] == f"/tenants/{tenant_id}/incidents/{incident}"
    assert created.headers["etag"] == '"1"'
    assert fetched.status_code == 200
    assert fetched.headers["etag"] == '"1"'
    assert fetched.json()["status"] == "submitted"
    assert fetched.json()["category"] == "Water leak"


def test_repeated_idempotency_key_returns_first(client: TestClient, tenant_id: str) -> None:
    first = submit(client, tenant_id, **{"Idempotency-Key": "abc-1"})
    again = submit(client, tenant_id, **{"Idempotency-Key": "abc-1"})
    incident = first.json()["incident_id"]
    history = client.get(f"/tenants/{tenant_id}/incidents/{incident}/events").json()

    assert again.json()["incident_id"] == incident
    assert again.json()["version"] == first.json()["version"]
    assert again.headers["idempotent-replayed"] == "true"
    assert len(history) == 1


def test_idempotency_key_with_other_body_rejected(client: TestClient, tenant_id: str) -> None:
    submit(client, tenant_id, **{"Idempotency-Key": "abc-2"})
    response = client.post(
        f"/tenants/{tenant_id}/incidents",
        json={**REPORT, "description": "something else"},
        headers={"Idempotency-Key": "abc-2"},
    )
    assert_problem(response, 422, "abc-2")


def test_lifecycle_through_api(client: TestClient, tenant_id: str) -> None:
    incident = submit(client, tenant_id).json()["incident_id"]
    base = f"/tenants/{tenant_id}/incidents/{incident}"

    steps: list[tuple[str, dict[str, Any]]] = [
        ("acknowledge", {}),
        ("assign", {"assignee": "crew-2"}),
        ("request-information", {"question": "Is it still flowing?"}),
        ("reporter-responded", {"response": "Yes"}),
        ("start-work", {}),
        ("resolve", {"note": "Valve replaced"}),
        ("close", {}),
    ]
    for version, (command, body) in enumerate(steps, start=1):
        response = client.post(f"{base}/{command}", json=body, headers={"If-Match": f'"{version}"'})
        assert response.status_code == 200, response.text
        assert response.json()["version"] == version + 1

    history = client.get(f"{base}/events").json()
    assert [event["event_type"] for event in history] == [
        "ReportSubmitted",
        "IncidentAcknowledged",
        "IncidentAssigned",
        "InformationRequested",
        "ReporterResponded",
        "WorkStarted",
        "IncidentResolved",
        "IncidentClosed",
    ]
    assert client.get(base).json()["status"] == "closed"


def test_stale_if_match_is_409(client: TestClient, tenant_id: str) -> None:
    incident = submit(client, tenant_id).json()["incident_id"]
    base = f"/tenants/{tenant_id}/incidents/{incident}"
    client.post(f"{base}/acknowledge", json={}, headers={"If-Match": '"1"'})

    response = client.post(f"{base}/assign", json={"assignee": "x"}, headers={"If-Match": '"1"'})
    body = assert_problem(response, 409, "version 2")
    assert body["current_version"] == 2


def test_command_out_of_state_names_both(client: TestClient, tenant_id: str) -> None:
    incident = submit(client, tenant_id).json()["incident_id"]
    response = client.post(f"/tenants/{tenant_id}/incidents/{incident}/close", json={})

    body = assert_problem(response, 409, "'close'", "'submitted'")
    assert body["state"] == "submitted"
    assert body["command"] == "close"
    assert "acknowledge" in body["allowed_commands"]


@pytest.mark.parametrize(
    ("body", "location"),
    [
        ({**REPORT, "latitude": 91}, "body.latitude"),
        ({**REPORT, "description": ""}, "body.description"),
        ({**REPORT, "reporter_ssn": "123"}, "body.reporter_ssn"),
        ({"category": "Pothole"}, "body.description"),
    ],
)
def test_invalid_report_is_422(
    client: TestClient, tenant_id: str, body: dict[str, Any], location: str
) -> None:
    response = client.post(f"/tenants/{tenant_id}/incidents", json=body)
    problem = assert_problem(response, 422, location)
    assert problem["errors"][0]["location"] == location
    if "value" in problem["errors"][0] and location in body:
        assert problem["errors"][0]["value"] == body[location.removeprefix("body.")]


def test_unknown_ids_are_404(client: TestClient, tenant_id: str) -> None:
    incident = submit(client, tenant_id).json()["incident_id"]
    other = f"t-{uuid.uuid4().hex[:10]}"

    assert_problem(client.get(f"/tenants/{tenant_id}/incidents/{uuid.uuid4()}"), 404)
    assert_problem(client.post(f"/tenants/{other}/incidents", json=REPORT), 404, other)
    # Another tenant's incident gets the same 404 as an id that does not exist.
    assert_problem(client.get(f"/tenants/{other}/incidents/{incident}"), 404)
    assert_problem(client.get(f"/tenants/{other}/incidents/{incident}/events"), 404)
    assert_problem(client.get(f"/tenants/{tenant_id}/incidents/not-a-uuid"), 422)


def test_sla_summary_as_of(client: TestClient, tenant_id: str, database: Database) -> None:
    incident = submit(client, tenant_id).json()["incident_id"]
    client.post(f"/tenants/{tenant_id}/incidents/{incident}/resolve", json={})
    submit(client, tenant_id)
    project_everything(database)

    now = client.get(f"/tenants/{tenant_id}/sla/summary").json()
    far = client.get(
        f"/tenants/{tenant_id}/sla/summary", params={"as_of": "2999-01-01T00:00"}
    ).json()
    before = client.get(
        f"/tenants/{tenant_id}/sla/summary", params={"as_of": "2000-01-01T00:00Z"}
    ).json()

    assert now["totals"]["total"] == 2
    assert now["caught_up"] is True
    assert now["projected_position"] > 0
    assert now["totals"]["open"] == 1
    assert now["totals"]["breached"] == 0
    assert now["by_category"][0]["key"] == "Water leak"
    assert far["totals"]["breached"] == 1
    assert far["totals"]["on_time_rate"] == 0.5
    assert far["as_of"].startswith("2999-01-01T00:00:00-05:00")
    assert before["totals"]["total"] == 0


def test_incident_sla_row(client: TestClient, tenant_id: str, database: Database) -> None:
    incident = submit(client, tenant_id).json()["incident_id"]
    url = f"/tenants/{tenant_id}/incidents/{incident}/sla"
    before_projection = client.get(url)
    client.post(f"/tenants/{tenant_id}/incidents/{incident}/acknowledge", json={})
    project_everything(database)

    row = client.get(url)
    unknown = client.get(f"/tenants/{tenant_id}/incidents/{uuid.uuid4()}/sla")

    assert_problem(before_projection, 503, incident, "projector has not applied")
    assert before_projection.headers["Retry-After"] == "1"
    assert row.status_code == 200, row.text
    body = row.json()
    assert body["incident_id"] == incident
    assert body["category"] == "Water leak"
    assert body["status"] == "open"
    assert body["first_response_at"] is not None
    assert body["resolution_due_at"] is not None
    assert body["resolution_breached"] is False
    assert body["caught_up"] is True
    assert_problem(unknown, 404, "not found")


def test_invalid_as_of_is_422(client: TestClient, tenant_id: str) -> None:
    response = client.get(f"/tenants/{tenant_id}/sla/summary", params={"as_of": "last week"})
    assert_problem(response, 422, "'last week'")


def test_openapi_lists_commands(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    close = paths["/tenants/{tenant_id}/incidents/{incident_id}/close"]["post"]

    assert "/tenants/{tenant_id}/incidents/{incident_id}/mark-duplicate" in paths
    assert "/tenants/{tenant_id}/sla/summary" in paths
    assert set(close["responses"]) >= {"200", "404", "409", "422"}
    assert "application/problem+json" in close["responses"]["409"]["content"]


def test_malformed_json_is_422(client: TestClient, tenant_id: str) -> None:
    response = client.post(
        f"/tenants/{tenant_id}/incidents",
        content=b'{"description": "x", ',
        headers={"content-type": "application/json"},
    )

    problem = assert_problem(response, 422, "not valid JSON", "at character 21")
    assert problem["errors"][0]["location"] == "body"


def test_plain_text_body_gets_content_type_hint(client: TestClient, tenant_id: str) -> None:
    response = client.post(
        f"/tenants/{tenant_id}/incidents",
        content=b"pothole",
        headers={"content-type": "text/plain"},
    )
    assert_problem(response, 422, "Content-Type: application/json")


def test_invalid_value_is_echoed_as_sent(client: TestClient, tenant_id: str) -> None:
    response = client.post(f"/tenants/{tenant_id}/incidents", json={**REPORT, "latitude": 500})

    problem = assert_problem(response, 422, "body.latitude")
    assert problem["errors"][0]["value"] == 500


def test_nan_latitude_rejected(client: TestClient, tenant_id: str) -> None:
    response = client.post(
        f"/tenants/{tenant_id}/incidents",
        content=b'{"description": "x", "latitude": NaN}',
        headers={"content-type": "application/json"},
    )
    assert_problem(response, 422, "body.latitude")


@pytest.mark.parametrize("field", ["reporter_email", "phone"])
def test_personal_data_rejected(client: TestClient, tenant_id: str, field: str) -> None:
    response = client.post(
        f"/tenants/{tenant_id}/incidents", json={**REPORT, field: "someone@example.org"}
    )

    problem = assert_problem(response, 422, "personal data", field)
    assert "someone@example.org" not in response.text
    assert problem["detail"].startswith("body: personal data")


def test_command_without_body(client: TestClient, tenant_id: str) -> None:
    incident = submit(client, tenant_id).json()["incident_id"]
    base = f"/tenants/{tenant_id}/incidents/{incident}"

    acknowledged = client.post(f"{base}/acknowledge", headers={"If-Match": "*"})
    started = client.post(
        f"{base}/start-work",
        content=b"",
        headers={"content-type": "application/json", "If-Match": '"2"'},
    )
    assign = client.post(f"{base}/assign")

    assert acknowledged.status_code == 200, acknowledged.text
    assert acknowledged.json()["version"] == 2
    assert started.status_code == 200, started.text
    assert started.json()["version"] == 3
    assert_problem(assign, 422, "send a JSON object")


def test_openapi_marks_optional_bodies(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    acknowledge = paths["/tenants/{tenant_id}/incidents/{incident_id}/acknowledge"]["post"]
    assign = paths["/tenants/{tenant_id}/incidents/{incident_id}/assign"]["post"]
    close = paths["/tenants/{tenant_id}/incidents/{incident_id}/close"]["post"]

    assert acknowledge["requestBody"].get("required", False) is False
    assert assign["requestBody"]["required"] is True
    assert set(close["responses"]) >= {"200", "404", "409", "422"}
    assert "application/problem+json" in close["responses"]["409"]["content"]


def test_same_key_for_other_command_rejected(client: TestClient, tenant_id: str) -> None:
    incident = submit(client, tenant_id).json()["incident_id"]
    base = f"/tenants/{tenant_id}/incidents/{incident}"

    first = client.post(f"{base}/acknowledge", headers={"Idempotency-Key": "k-7"})
    again = client.post(f"{base}/acknowledge", headers={"Idempotency-Key": "k-7"})
    other = client.post(f"{base}/start-work", headers={"Idempotency-Key": "k-7"})

    assert first.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert_problem(other, 422, "k-7")


@pytest.mark.parametrize(
    "value", ["yesterday", '"18446744073709551616"', '"0"', '"2147483648"', 'W/"1"']
)
def test_invalid_if_match_is_422(client: TestClient, tenant_id: str, value: str) -> None:
    incident = submit(client, tenant_id).json()["incident_id"]
    response = client.post(
        f"/tenants/{tenant_id}/incidents/{incident}/acknowledge", headers={"If-Match": value}
    )

    problem = assert_problem(response, 422, "If-Match")
    assert problem["type"].endswith("/invalid-request")
