"""The Open311 GeoReport v2 facade, against the real app served by uvicorn on loopback."""

from __future__ import annotations

import threading
import time
import uuid
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
import uvicorn
from georeport import GeoReport
from psycopg_pool import ConnectionPool

from api.app import create_app
from ledger.commands import Actor, IncidentCommands
from ledger.database import Database
from ledger.keys import Role, issue_key
from ledger.store import PostgresEventStore
from ledger.tenants import configure_categories, configure_open311, create_tenant
from tests.conftest import project_everything

CATEGORIES = {
    "categories": [
        {"name": "Pothole", "department": "Public Works", "keywords": ["pothole", "road"]},
        {"name": "Street Light Out", "department": "Street Lighting", "keywords": ["light"]},
        {"name": "Graffiti"},
    ]
}
REPORTER = {"first_name": "Dana", "last_name": "Whitfield", "email": "dana.w@example.org"}


@dataclass
class Served:
    base: str  # http://127.0.0.1:PORT
    tenant_id: str
    tokens: dict[Role, str]

    @property
    def root(self) -> str:
        return f"{self.base}/tenants/{self.tenant_id}/open311/v2"


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


def _tenant(store: PostgresEventStore, *, public: bool) -> tuple[str, dict[Role, str]]:
    tenant_id = f"o311-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    create_tenant(
        store, tenant_id, name="Open311 City", time_zone="America/Chicago", occurred_at=now
    )
    configure_categories(store, tenant_id, CATEGORIES, occurred_at=now)
    if public:
        configure_open311(store, tenant_id, public_reads=True, occurred_at=now)
    tokens = {
        role: issue_key(store, tenant_id, role=role, name=f"{role} app", issued_by="test")[1]
        for role in Role
    }
    return tenant_id, tokens


@pytest.fixture
def served(
    database: Database, session_pool: ConnectionPool[Any], store: PostgresEventStore
) -> Iterator[Served]:
    """The app on a loopback port, with a tenant whose Open311 reads are public."""
    tenant_id, tokens = _tenant(store, public=True)
    server, thread, port = _serve(create_app(database, pool=session_pool))
    try:
        yield Served(f"http://127.0.0.1:{port}", tenant_id, tokens)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def post_request(served: Served, fmt: str = "json", **fields: str) -> requests.Response:
    form = {
        "api_key": served.tokens[Role.REPORTER],
        "service_code": "pothole",
        "lat": "41.88",
        "long": "-87.63",
        "description": "Deep pothole in the bus lane",
        **fields,
    }
    return requests.post(f"{served.root}/requests.{fmt}", data=form, timeout=30)


def test_client_library_lists_services(served: Served) -> None:
    client = GeoReport(served.root)

    services = client.get_service_list()
    definition = client.get_service_definition("street-light-out")

    assert [service["service_code"] for service in services] == [
        "pothole",
        "street-light-out",
        "graffiti",
    ]
    assert services[0]["service_name"] == "Pothole"
    assert services[0]["group"] == "Public Works"
    assert services[0]["keywords"] == "pothole,road"
    assert services[0]["metadata"] is False
    assert definition == {"service_code": "street-light-out", "attributes": []}


def test_client_library_lists_services_as_xml(served: Served) -> None:
    client = GeoReport(served.root, output_format="xml")

    services = client.get_service_list()

    assert [service["service_code"] for service in services] == [
        "pothole",
        "street-light-out",
        "graffiti",
    ]
    assert services[2]["metadata"] == "false"


def test_posted_request_reads_back_through_client(served: Served, database: Database) -> None:
    posted = post_request(served, **REPORTER)
    assert posted.status_code == 201, posted.text
    [created] = posted.json()
    request_id = created["service_request_id"]
    project_everything(database)
    client = GeoReport(served.root)

    one = client.get_service_request(request_id)
    listed = client.get_service_requests()
    by_id = client.get_service_requests(service_request_id=request_id)
    one_xml = GeoReport(served.root, output_format="xml").get_service_request(request_id)

    assert one["service_request_id"] == request_id
    assert one["status"] == "open"
    assert one["service_code"] == "pothole"
    assert one["service_name"] == "Pothole"
    assert one["agency_responsible"] == "Public Works"
    assert one["description"] == "Deep pothole in the bus lane"
    assert one["lat"] == pytest.approx(41.88)
    assert one["long"] == pytest.approx(-87.63)
    assert one["expected_datetime"] is not None
    assert request_id in [item["service_request_id"] for item in listed]
    assert [item["service_request_id"] for item in by_id] == [request_id]
    assert one_xml["service_request_id"] == request_id
    assert one_xml["status"] == "open"


def test_no_personal_data_leaves(served: Served, database: Database) -> None:
    posted = post_request(served, phone="312 555 0142", **REPORTER)
    request_id = posted.json()[0]["service_request_id"]
    project_everything(database)

    for path in (f"requests/{request_id}", "requests"):
        for fmt in ("json", "xml"):
            text = requests.get(f"{served.root}/{path}.{fmt}", timeout=30).text
            for value in ("Dana", "Whitfield", "dana.w@example.org", "312 555 0142"):
                assert value not in text, (path, fmt)
            assert "reporter_id" not in text
            assert "contact" not in text


def test_contact_is_stored_encrypted_for_staff(served: Served, database: Database) -> None:
    posted = post_request(served, phone="312 555 0142", **REPORTER)
    request_id = posted.json()[0]["service_request_id"]
    staff = {"Authorization": f"Bearer {served.tokens[Role.STAFF]}"}

    contact = requests.get(
        f"{served.base}/tenants/{served.tenant_id}/incidents/{request_id}/contact",
        headers=staff,
        timeout=30,
    )

    assert contact.status_code == 200, contact.text
    assert contact.json()["name"] == "Dana Whitfield"
    assert contact.json()["email"] == "dana.w@example.org"
    assert contact.json()["phone"] == "312 555 0142"
    with database.connect_owner() as conn:
        payloads = conn.execute(
            "SELECT payload::text FROM events WHERE tenant_id = %s", (served.tenant_id,)
        ).fetchall()
    assert all("Whitfield" not in payload for (payload,) in payloads)


def test_token_maps_to_request(served: Served) -> None:
    [created] = post_request(served).json()

    found = requests.get(f"{served.root}/tokens/{created['token']}.json", timeout=30)
    found_xml = requests.get(f"{served.root}/tokens/{created['token']}.xml", timeout=30)
    unknown = requests.get(f"{served.root}/tokens/{uuid.uuid4()}.json", timeout=30)

    assert found.status_code == 200
    assert found.json() == [
        {"token": created["token"], "service_request_id": created["service_request_id"]}
    ]
    assert created["service_request_id"] in found_xml.text
    assert unknown.status_code == 404
    assert unknown.json()[0]["code"] == 404


def test_requests_filter_by_status_and_code(
    served: Served, database: Database, store: PostgresEventStore
) -> None:
    pothole = post_request(served).json()[0]["service_request_id"]
    graffiti = post_request(served, service_code="graffiti").json()[0]["service_request_id"]
    commands = IncidentCommands(store)
    staff = Actor("crew", "staff")
    commands.execute(
        served.tenant_id, uuid.UUID(graffiti), "resolve", {}, actor=staff, expected_version=None
    )
    project_everything(database)

    def ids(**params: str) -> list[str]:
        response = requests.get(f"{served.root}/requests.json", params=params, timeout=30)
        assert response.status_code == 200, response.text
        return [item["service_request_id"] for item in response.json()]

    assert ids(status="open") == [pothole]
    assert ids(status="closed") == [graffiti]
    assert set(ids(status="open,closed")) == {pothole, graffiti}
    assert ids(service_code="graffiti") == [graffiti]
    assert set(ids(service_code="graffiti,pothole")) == {pothole, graffiti}
    assert ids(service_code="street-light-out") == []
    # The id list overrides every other filter.
    assert ids(service_request_id=graffiti, status="open") == [graffiti]


def test_requests_window_defaults_and_limits(served: Served, database: Database) -> None:
    request_id = post_request(served).json()[0]["service_request_id"]
    project_everything(database)
    now = datetime.now(UTC)

    def get(**params: str) -> requests.Response:
        return requests.get(f"{served.root}/requests.json", params=params, timeout=30)

    inside = get(start_date=(now - timedelta(days=1)).isoformat())
    before = get(end_date=(now - timedelta(days=1)).isoformat())
    naive = get(start_date=(now - timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%S"))
    too_long = get(start_date=(now - timedelta(days=100)).isoformat(), end_date=now.isoformat())
    reversed_window = get(
        start_date=now.isoformat(), end_date=(now - timedelta(days=1)).isoformat()
    )
    malformed = get(start_date="yesterday")

    assert [item["service_request_id"] for item in inside.json()] == [request_id]
    assert before.json() == []
    assert [item["service_request_id"] for item in naive.json()] == [request_id]
    for response, words in (
        (too_long, "more than 90 days"),
        (reversed_window, "before start_date"),
        (malformed, "invalid start_date 'yesterday'"),
    ):
        assert response.status_code == 400
        [error] = response.json()
        assert error["code"] == 400
        assert words in error["description"]


@pytest.mark.parametrize(
    ("fields", "dropped", "words"),
    [
        ({"service_code": "sinkhole"}, (), "unknown service_code 'sinkhole'"),
        ({}, ("service_code",), "missing service_code"),
        ({"lat": "91"}, (), "invalid lat '91'"),
        ({"long": "east"}, (), "invalid long 'east'"),
        ({}, ("long",), "lat and long go together"),
        ({}, ("lat", "long"), "missing location"),
        ({"media_url": "file:///etc/passwd"}, (), "invalid media_url"),
        ({"email": "not-an-address"}, (), "not a valid e-mail address"),
        ({"description": "x" * 4001}, (), "description is 4001 characters long"),
        ({"attribute[depth]": "deep"}, (), "attribute[depth]"),
    ],
)
def test_post_rejects_bad_fields(
    served: Served, fields: dict[str, str], dropped: tuple[str, ...], words: str
) -> None:
    form = {
        "api_key": served.tokens[Role.REPORTER],
        "service_code": "pothole",
        "lat": "41.88",
        "long": "-87.63",
        **fields,
    }
    for name in dropped:
        del form[name]

    response = requests.post(f"{served.root}/requests.json", data=form, timeout=30)

    assert response.status_code == 400, response.text
    [error] = response.json()
    assert error["code"] == 400
    assert words in error["description"]


def test_api_keys_and_roles(served: Served) -> None:
    missing = requests.post(
        f"{served.root}/requests.json", data={"service_code": "pothole"}, timeout=30
    )
    invalid = post_request(served, api_key="cpk_" + "0" * 32 + "_" + "A" * 43)
    officer = post_request(served, api_key=served.tokens[Role.OFFICER])
    xml_error = post_request(served, "xml", api_key="not-a-key")
    staff = post_request(served, api_key=served.tokens[Role.STAFF])

    assert missing.status_code == 401
    assert missing.json()[0]["code"] == 401
    assert invalid.status_code == 403
    assert "invalid api_key" in invalid.json()[0]["description"]
    assert officer.status_code == 403
    assert "'officer'" in officer.json()[0]["description"]
    assert xml_error.status_code == 403
    root = ElementTree.fromstring(xml_error.content)
    assert root.tag == "errors"
    assert root.findtext("error/code") == "403"
    assert staff.status_code == 201


def test_reads_need_a_key_unless_published(
    database: Database, session_pool: ConnectionPool[Any], store: PostgresEventStore
) -> None:
    tenant_id, tokens = _tenant(store, public=False)
    server, thread, port = _serve(create_app(database, pool=session_pool))
    try:
        root = f"http://127.0.0.1:{port}/tenants/{tenant_id}/open311/v2"
        anonymous = requests.get(f"{root}/services.json", timeout=30)
        keyed = requests.get(
            f"{root}/services.json", params={"api_key": tokens[Role.REPORTER]}, timeout=30
        )
        configure_open311(store, tenant_id, public_reads=True, occurred_at=datetime.now(UTC))
        published = requests.get(f"{root}/services.json", timeout=30)
        other_tenant = requests.get(
            f"http://127.0.0.1:{port}/tenants/nowhere-{uuid.uuid4().hex[:6]}/open311/v2/"
            "services.json",
            timeout=30,
        )
    finally:
        server.should_exit = True
        thread.join(timeout=10)

    assert anonymous.status_code == 401
    assert anonymous.json()[0]["code"] == 401
    assert keyed.status_code == 200
    assert len(keyed.json()) == 3
    assert published.status_code == 200
    assert other_tenant.status_code == 401


def test_unknown_things_answer_404(served: Served) -> None:
    cases = {
        f"{served.root}/requests/{uuid.uuid4()}.json": "not found",
        f"{served.root}/services/sinkhole.json": "unknown service_code 'sinkhole'",
        f"{served.root}/services.csv": "unsupported format 'csv'",
    }
    for url, words in cases.items():
        response = requests.get(url, timeout=30)
        assert response.status_code == 404, url
        [error] = response.json()
        assert error["code"] == 404
        assert words in error["description"]
    malformed_id = requests.get(f"{served.root}/requests/12345.json", timeout=30)
    assert malformed_id.status_code == 400


def test_large_body_answers_413_as_error_list(served: Served) -> None:
    response = requests.post(
        f"{served.root}/requests.json",
        data={"api_key": served.tokens[Role.REPORTER], "description": "x" * 70_000},
        timeout=30,
    )

    assert response.status_code == 413
    [error] = response.json()
    assert error["code"] == 413
    assert "larger than" in error["description"]
