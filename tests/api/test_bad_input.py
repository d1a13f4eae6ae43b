"""Bad input at the API: each gets a 4xx problem document, and nothing is appended."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from psycopg_pool import ConnectionPool

from api.app import MAX_BODY_BYTES, create_app
from ledger.database import Database, set_tenant
from ledger.keys import Role, issue_key
from ledger.store import PostgresEventStore


@pytest.fixture
def client(
    database: Database,
    session_pool: ConnectionPool[Any],
    store: PostgresEventStore,
    tenant_id: str,
) -> Iterator[TestClient]:
    _, token = issue_key(store, tenant_id, role=Role.STAFF, name="bad input", issued_by="test")
    headers = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app(database, pool=session_pool), headers=headers) as test_client:
        yield test_client


def event_count(store: PostgresEventStore, tenant_id: str) -> int:
    with store.pool.connection() as conn:
        set_tenant(conn, tenant_id)
        row = conn.execute("SELECT count(*) FROM events").fetchone()
    assert row is not None
    return int(row[0])


RAW_BODIES = {
    "NaN": b'{"description": "x", "latitude": NaN}',
    "Infinity": b'{"description": "x", "longitude": Infinity}',
    "-Infinity": b'{"description": "x", "latitude": -Infinity}',
    "1e999": b'{"description": "x", "latitude": 1e999}',
    "NUL": b'{"description": "broken\\u0000light"}',
    "lone surrogate": b'{"description": "broken \\ud800 light"}',
    "latitude out of range": b'{"description": "x", "latitude": 91}',
    "longitude out of range": b'{"description": "x", "longitude": -180.5}',
    "unknown field": b'{"description": "x", "colour": "red"}',
    "long description": json.dumps({"description": "x" * 4001}).encode(),
    "long title": json.dumps({"description": "x", "title": "t" * 201}).encode(),
    "not an object": b'["description"]',
    "empty": b"",
    "truncated": b'{"description": "x"',
    "invalid UTF-8": b'{"description": "\xff\xfe"}',
}


@pytest.mark.parametrize("case", list(RAW_BODIES))
def test_bad_report_is_4xx_and_stores_nothing(
    client: TestClient, store: PostgresEventStore, tenant_id: str, case: str
) -> None:
    before = event_count(store, tenant_id)
    response = client.post(
        f"/tenants/{tenant_id}/incidents",
        content=RAW_BODIES[case],
        headers={"content-type": "application/json"},
    )

    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = json.loads(response.content)  # strict: the problem itself is valid JSON
    assert problem["status"] == response.status_code
    assert problem["detail"]
    assert event_count(store, tenant_id) == before


def test_oversized_body_is_413(
    client: TestClient, store: PostgresEventStore, tenant_id: str
) -> None:
    before = event_count(store, tenant_id)
    body = json.dumps({"description": "x", "address": "a" * MAX_BODY_BYTES}).encode()
    response = client.post(
        f"/tenants/{tenant_id}/incidents",
        content=body,
        headers={"content-type": "application/json"},
    )

    assert response.status_code == 413
    assert response.json()["status"] == 413
    assert event_count(store, tenant_id) == before


@pytest.mark.parametrize(
    "as_of",
    [
        "yesterday",
        "2016-13-01",
        "2016-01-13T25:00",
        "2016-01-13T00:00+25:00",
        "2016-02-30",
        "\x00",
    ],
)
def test_malformed_as_of_is_422(client: TestClient, tenant_id: str, as_of: str) -> None:
    response = client.get(f"/tenants/{tenant_id}/sla/summary", params={"as_of": as_of})

    assert response.status_code == 422, response.text
    assert "as_of" in response.json()["detail"]


def test_reads_after_bad_input_still_work(client: TestClient, tenant_id: str) -> None:
    for body in RAW_BODIES.values():
        client.post(
            f"/tenants/{tenant_id}/incidents",
            content=body,
            headers={"content-type": "application/json"},
        )
    created = client.post(f"/tenants/{tenant_id}/incidents", json={"description": "Lamp out"})
    incident = created.json()["incident_id"]

    assert client.get(f"/tenants/{tenant_id}/incidents/{incident}").status_code == 200
    assert client.get(f"/tenants/{tenant_id}/incidents/{incident}/events").status_code == 200
    assert client.get(f"/tenants/{tenant_id}/sla/summary").status_code == 200


def test_oversized_chunked_body_is_413(
    client: TestClient, store: PostgresEventStore, tenant_id: str
) -> None:
    before = event_count(store, tenant_id)

    def chunks() -> Iterator[bytes]:
        yield b'{"description": "x", "address": "'
        for _ in range(MAX_BODY_BYTES // 1024 + 1):
            yield b"a" * 1024
        yield b'"}'

    response = client.post(
        f"/tenants/{tenant_id}/incidents",
        content=chunks(),
        headers={"content-type": "application/json"},
    )

    assert response.status_code == 413
    assert response.headers["content-type"].startswith("application/problem+json")
    assert event_count(store, tenant_id) == before


def test_unescaped_plus_in_as_of_is_read_as_an_offset(client: TestClient, tenant_id: str) -> None:
    # A "+" left unescaped in a query string arrives as a space.
    response = client.get(f"/tenants/{tenant_id}/sla/summary?as_of=2016-01-13T05:00:00+00:00")
    spaced_date = client.get(
        f"/tenants/{tenant_id}/sla/summary", params={"as_of": "2016-01-13 05:00"}
    )

    assert response.status_code == 200, response.text
    assert response.json()["as_of"].startswith("2016-01-13T05:00:00")
    assert spaced_date.status_code == 200, spaced_date.text


def test_unknown_command_lists_the_commands(
    client: TestClient, store: PostgresEventStore, tenant_id: str
) -> None:
    submitted = client.post(f"/tenants/{tenant_id}/incidents", json={"description": "broken lamp"})
    assert submitted.status_code == 201, submitted.text
    incident_id = submitted.json()["incident_id"]
    before = event_count(store, tenant_id)

    response = client.post(f"/tenants/{tenant_id}/incidents/{incident_id}/fix", json={})

    assert response.status_code == 404
    problem = response.json()
    assert problem["type"].endswith("/unknown-command")
    assert "'fix'" in problem["detail"]
    assert "acknowledge" in problem["detail"]
    assert "resolve" in problem["detail"]
    assert problem["commands"] == sorted(problem["commands"])
    assert "start-work" in problem["commands"]
    assert event_count(store, tenant_id) == before


def test_unknown_path_keeps_plain_404(client: TestClient, tenant_id: str) -> None:
    response = client.get(f"/tenants/{tenant_id}/incidents/1/2/3")

    assert response.status_code == 404
    assert not response.json()["type"].endswith("/unknown-command")
