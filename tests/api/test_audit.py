"""The officers' audit endpoints over HTTP: pages, exports, histories, changes, bad input and
a client that disconnects in the middle of an export."""

from __future__ import annotations

import csv
import io
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import uvicorn
from fastapi.testclient import TestClient
from psycopg_pool import ConnectionPool

from api.app import create_app
from ledger.database import Database
from ledger.ids import incident_stream_id
from ledger.keys import Role, issue_key
from ledger.store import PostgresEventStore
from ledger.tenants import create_tenant
from tests.ledger.audit_scenario import (
    MARCH_1,
    MARCH_3,
    AuditScenario,
    build_scenario,
    copy_events,
    tenant_events,
    wait_for_horizon,
)

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def scenario(database: Database, session_pool: ConnectionPool[Any]) -> AuditScenario:
    return build_scenario(PostgresEventStore(session_pool), database)


@pytest.fixture
def client(
    database: Database, session_pool: ConnectionPool[Any], scenario: AuditScenario
) -> Iterator[TestClient]:
    """A client that sends an officer key of the scenario's tenant."""
    headers = {"Authorization": f"Bearer {scenario.officer_token}"}
    with TestClient(create_app(database, pool=session_pool), headers=headers) as test_client:
        yield test_client


def events_url(scenario: AuditScenario) -> str:
    return f"/tenants/{scenario.tenant_id}/audit/events"


def walk(client: TestClient, url: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Follow next_cursor until has_more is false; return every event read."""
    events: list[dict[str, Any]] = []
    cursor = None
    for _ in range(1000):
        response = client.get(url, params={**params, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200, response.text
        body = response.json()
        events.extend(body["events"])
        cursor = body["next_cursor"]
        if not body["has_more"]:
            return events
    raise AssertionError("pages never end")


def assert_problem(response: Any, status: int, *words: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = response.json()
    for word in words:
        assert word in body["detail"], body["detail"]
    return body


def test_pages_walk_every_event(client: TestClient, scenario: AuditScenario) -> None:
    walked = walk(client, events_url(scenario), {"limit": 2})

    assert [event["position"] for event in walked] == [e.position for e in scenario.events]
    assert walked[0]["event_type"] == "TenantCreated"


def test_filters_in_query_string(client: TestClient, scenario: AuditScenario) -> None:
    potholes = {
        incident_stream_id(scenario.old_pothole),
        incident_stream_id(scenario.new_pothole),
    }
    expected = [
        e.position
        for e in scenario.events
        if e.metadata.get("actor") == "bob" and e.stream_id in potholes
    ]

    by_bob = walk(client, events_url(scenario), {"actor": "bob", "category": "Pothole"})
    repeated = walk(
        client, events_url(scenario), {"event_type": ["ReportSubmitted", "IncidentResolved"]}
    )
    comma = walk(client, events_url(scenario), {"event_type": "ReportSubmitted,IncidentResolved"})
    incident = walk(client, events_url(scenario), {"incident_id": str(scenario.graffiti)})

    assert [event["position"] for event in by_bob] == expected
    assert len(expected) == 2
    assert {event["event_type"] for event in repeated} == {"ReportSubmitted", "IncidentResolved"}
    assert repeated == comma
    assert [event["stream_version"] for event in incident] == [1, 2, 3]


def test_naive_times_read_in_tenant_zone(client: TestClient, scenario: AuditScenario) -> None:
    # The report happened at 14:00 UTC on 1 March 2015: 09:00 in New York.
    at_nine = walk(
        client, events_url(scenario), {"occurred_from": "2015-03-01T09:00", "role": "reporter"}
    )
    after_nine = walk(
        client,
        events_url(scenario),
        {"occurred_from": "2015-03-01T09:00:01", "role": "reporter"},
    )

    assert [event["occurred_at"] for event in at_nine] == [MARCH_1.isoformat()]
    assert after_nine == []


@pytest.mark.parametrize("export_format", ["csv", "jsonl"])
def test_export_matches_pages(
    client: TestClient, scenario: AuditScenario, export_format: str
) -> None:
    params = {"category": "Pothole"}
    pages = walk(client, events_url(scenario), params)

    response = client.get(events_url(scenario), params={**params, "format": export_format})
    if export_format == "csv":
        exported = list(csv.DictReader(io.StringIO(response.text)))
        as_text = [
            {
                key: json.dumps(value, sort_keys=True, separators=(",", ":"))
                if key in ("payload", "metadata")
                else ("" if value is None else str(value))
                for key, value in event.items()
            }
            for event in pages
        ]
        assert exported == as_text
    else:
        assert [json.loads(line) for line in response.text.splitlines()] == pages

    assert response.status_code == 200
    assert response.headers["content-type"].split(";")[0] in ("text/csv", "application/x-ndjson")
    assert (
        f"{scenario.tenant_id}-audit-events.{export_format}"
        in (response.headers["content-disposition"])
    )
    assert len(pages) == 4


@pytest.mark.parametrize(
    ("path", "params", "words"),
    [
        ("events", {"occurred_from": "yesterday"}, ["invalid occurred_from 'yesterday'"]),
        ("events", {"recorded_to": "2015-02-30"}, ["invalid recorded_to"]),
        ("events", {"occurred_to": "9999-12-31T23:59"}, ["invalid occurred_to", "out of range"]),
        ("events", {"event_type": "Reported"}, ["unknown event_type 'Reported'", "Report"]),
        ("events", {"role": "mayor"}, ["unknown role 'mayor'", "officer"]),
        ("events", {"incident_id": "not-a-uuid"}, ["query.incident_id"]),
        ("events", {"limit": "0"}, ["query.limit"]),
        ("events", {"limit": "1001"}, ["query.limit", "1000"]),
        ("events", {"limit": "many"}, ["query.limit"]),
        ("events", {"cursor": "garbage"}, ["invalid cursor 'garbage'"]),
        ("events", {"format": "xml"}, ["query.format"]),
        ("events", {"format": "csv", "limit": "5"}, ["limit and cursor apply"]),
        ("events", {"actor": "a\x00b"}, ["invalid actor"]),
        (
            "events",
            {"recorded_from": "2016-01-02", "recorded_to": "2016-01-01"},
            ["invalid recorded range"],
        ),
        ("incidents/{incident}", {"known_at": "noon"}, ["invalid known_at 'noon'"]),
        ("incidents/{incident}", {"as_of": "2015-03-01T25:00"}, ["invalid as_of"]),
        ("incidents/not-a-uuid", {}, ["path.incident_id"]),
        ("changes", {}, ["query.from", "Field required"]),
        ("changes", {"from": "2016-01-01", "to": "2015-01-01"}, ["invalid recorded range"]),
        ("changes", {"from": "last week"}, ["invalid from 'last week'"]),
    ],
)
def test_bad_input_is_422(
    client: TestClient,
    scenario: AuditScenario,
    path: str,
    params: dict[str, str],
    words: list[str],
) -> None:
    url = f"/tenants/{scenario.tenant_id}/audit/" + path.format(incident=scenario.graffiti)

    assert_problem(client.get(url, params=params), 422, *words)


def test_cursor_of_other_filters_is_422(client: TestClient, scenario: AuditScenario) -> None:
    first = client.get(events_url(scenario), params={"actor": "alice", "limit": 1}).json()
    reused = client.get(
        events_url(scenario), params={"actor": "bob", "cursor": first["next_cursor"]}
    )
    with_export = client.get(
        events_url(scenario), params={"format": "jsonl", "cursor": first["next_cursor"]}
    )

    assert_problem(reused, 422, "other filters")
    assert_problem(with_export, 422, "limit and cursor apply")


def test_incident_as_known_at(client: TestClient, scenario: AuditScenario) -> None:
    url = f"/tenants/{scenario.tenant_id}/audit/incidents/{scenario.graffiti}"
    stream = incident_stream_id(scenario.graffiti)
    acknowledged = next(
        e for e in scenario.events if e.stream_id == stream and e.stream_version == 2
    )

    then = client.get(url, params={"known_at": acknowledged.recorded_at.isoformat()}).json()
    now = client.get(url).json()
    old = client.get(
        f"/tenants/{scenario.tenant_id}/audit/incidents/{scenario.old_pothole}",
        params={"as_of": "2015-03-01T23:00"},
    ).json()

    assert [event["stream_version"] for event in then["events"]] == [1, 2]
    assert then["state"]["status"] == "acknowledged"
    assert then["state"]["version"] == 2
    assert now["state"]["status"] == "resolved"
    assert [event["event_type"] for event in old["events"]] == ["ReportSubmitted"]
    assert old["as_of"] == "2015-03-01T23:00:00-05:00"


def test_unknown_and_foreign_ids_are_404(
    client: TestClient,
    scenario: AuditScenario,
    database: Database,
    session_pool: ConnectionPool[Any],
) -> None:
    other = build_scenario(PostgresEventStore(session_pool), database)
    base = f"/tenants/{scenario.tenant_id}/audit/incidents"

    assert_problem(client.get(f"{base}/{uuid.uuid4()}"), 404)
    assert_problem(client.get(f"{base}/{other.graffiti}"), 404, str(other.graffiti))
    assert_problem(client.get(f"/tenants/{other.tenant_id}/audit/events"), 404, other.tenant_id)
    foreign = walk(client, events_url(scenario), {"incident_id": str(other.graffiti)})
    assert foreign == []


def test_changes_between_two_moments(client: TestClient, scenario: AuditScenario) -> None:
    stream = incident_stream_id(scenario.old_pothole)
    assigned = next(e for e in scenario.events if e.stream_id == stream and e.stream_version == 3)
    acknowledged = next(
        e for e in scenario.events if e.stream_id == stream and e.stream_version == 2
    )
    params = {
        "from": acknowledged.recorded_at.isoformat(),
        "to": assigned.recorded_at.isoformat(),
    }

    response = client.get(f"/tenants/{scenario.tenant_id}/audit/changes", params=params)
    body = response.json()

    assert response.status_code == 200, response.text
    assert [change["event_type"] for change in body["changes"]] == ["IncidentAcknowledged"]
    change = body["changes"][0]
    assert change["actor"] == "alice"
    assert change["role"] == "staff"
    assert change["incident_id"] == str(scenario.old_pothole)
    assert change["source"] == "state"
    assert change["changes"] == [
        {"field": "status", "before": "submitted", "after": "acknowledged"}
    ]
    assert body["has_more"] is False


def test_changes_pages_keep_their_cursor(client: TestClient, scenario: AuditScenario) -> None:
    url = f"/tenants/{scenario.tenant_id}/audit/changes"
    events: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"from": "2000-01-01", "limit": 3, **({"cursor": cursor} if cursor else {})}
        body = client.get(url, params=params).json()
        events.extend(body["changes"])
        cursor = body["next_cursor"]
        if not body["has_more"]:
            break

    assert [event["position"] for event in events] == [e.position for e in scenario.events]


def test_officer_of_march_sees_nothing_recorded_later(
    client: TestClient, scenario: AuditScenario
) -> None:
    # Valid time in March 2015 has events, transaction time in March 2015 has none.
    happened = walk(
        client,
        events_url(scenario),
        {"occurred_from": MARCH_1.isoformat(), "occurred_to": "2015-03-04T00:00Z"},
    )
    recorded = walk(
        client,
        events_url(scenario),
        {"recorded_from": MARCH_1.isoformat(), "recorded_to": MARCH_3.isoformat()},
    )

    assert len(happened) == 3
    assert recorded == []


@pytest.fixture
def big_tenant(database: Database, session_pool: ConnectionPool[Any]) -> tuple[str, str]:
    """A tenant with 20,000 events and an officer key: (tenant id, token)."""
    store = PostgresEventStore(session_pool)
    tenant_id = f"big-{uuid.uuid4().hex[:8]}"
    create_tenant(
        store, tenant_id, name="Big", time_zone="UTC", occurred_at=datetime(2015, 1, 1, tzinfo=UTC)
    )
    _, token = issue_key(store, tenant_id, role=Role.OFFICER, name="auditor", issued_by="test")
    copy_events(database, tenant_id, 20_000)
    wait_for_horizon(database, tenant_events(database, tenant_id)[-1].tx_id)
    return tenant_id, token


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


def test_disconnect_mid_export_returns_the_connection(
    database: Database, big_tenant: tuple[str, str]
) -> None:
    tenant_id, token = big_tenant
    pool: ConnectionPool[Any] = ConnectionPool(
        database.app_conninfo, min_size=2, max_size=2, open=True
    )
    server, thread, port = _serve(create_app(database, pool=pool))
    try:
        # Read the start of the export, then hang up: 20,000 events are several megabytes,
        # more than the socket buffers hold, so the server is still streaming.
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(
                (
                    f"GET /tenants/{tenant_id}/audit/events?format=jsonl HTTP/1.1\r\n"
                    f"Host: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n"
                ).encode()
            )
            received = b""
            while len(received) < 100_000:
                received += client.recv(65536)
            in_use_while_streaming = pool.get_stats()["pool_size"] - pool.get_stats().get(
                "pool_available", 0
            )

        deadline = time.monotonic() + 30
        while True:
            stats = pool.get_stats()
            if stats.get("pool_available", 0) == stats["pool_size"]:
                break
            assert time.monotonic() < deadline, f"the export kept its connection: {stats}"
            time.sleep(0.05)
        with database.connect_owner() as conn:
            open_transactions = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND usename = %s AND state LIKE 'idle in transaction%%'",
                (database.app_role,),
            ).fetchone()
        # The pool serves the next export from the start.
        after = TestClient(create_app(database, pool=pool)).get(
            f"/tenants/{tenant_id}/audit/events",
            params={"format": "jsonl", "actor": "nobody"},
            headers={"Authorization": f"Bearer {token}"},
        )
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        pool.close()

    assert received.startswith(b"HTTP/1.1 200")
    assert in_use_while_streaming >= 1
    assert open_transactions == (0,)
    assert after.status_code == 200
    assert after.text == ""


def test_export_streams_every_event(client: TestClient, big_tenant: tuple[str, str]) -> None:
    tenant_id, token = big_tenant
    lines = 0
    positions = set()
    with client.stream(
        "GET",
        f"/tenants/{tenant_id}/audit/events",
        params={"format": "jsonl", "event_type": "ReportSubmitted"},
        headers={"Authorization": f"Bearer {token}"},
    ) as response:
        for line in response.iter_lines():
            if line:
                positions.add(json.loads(line)["position"])
                lines += 1

    assert response.status_code == 200
    assert lines == 20_000
    assert len(positions) == 20_000
