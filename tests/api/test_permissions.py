"""Keys, roles and tenants at every endpoint, walked from the table in docs/security.md."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from psycopg_pool import ConnectionPool

from api.app import create_app
from api.auth import route_roles
from ledger.commands import Actor, IncidentCommands
from ledger.config_sections import apply_config
from ledger.database import Database, set_tenant
from ledger.keys import Role, issue_key, revoke_key
from ledger.store import PostgresEventStore
from ledger.tenants import configure_categories, create_tenant

SECURITY_DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"
NO_KEY = "(no key)"
OPEN311 = "/open311/v2/"
ROLES = list(Role)


def documented_permissions() -> dict[tuple[str, str], set[str]]:
    """Read the permissions table: (method, path) -> role names, or {NO_KEY}."""
    text = SECURITY_DOC.read_text()
    section = text.split("## Permissions", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (GET|POST|PUT|PATCH|DELETE) \| (\S+) \| (.+?) \|$", section, re.M)
    assert rows, "no permission rows found in docs/security.md"
    return {
        (method, path): {role.strip() for role in roles.split(",")} for method, path, roles in rows
    }


def app_routes(app: Any) -> list[APIRoute]:
    documentation = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
    return [
        route
        for route in app.routes
        if isinstance(route, APIRoute) and route.path not in documentation
    ]


@dataclass
class Tenant:
    tenant_id: str
    tokens: dict[Role, str]
    incident_id: str  # submitted by the tenant's reporter key, with contact details
    key_id: str  # a staff key to revoke
    reporter_id: str  # the reporter of that incident
    token: str  # the Open311 token of that incident: the id of its ReportSubmitted event


def _make_tenant(store: PostgresEventStore) -> Tenant:
    tenant_id = f"perm-{uuid.uuid4().hex[:8]}"
    create_tenant(
        store,
        tenant_id,
        name="Permissions",
        time_zone="UTC",
        occurred_at=datetime(2015, 1, 1, tzinfo=UTC),
    )
    configure_categories(
        store,
        tenant_id,
        {"categories": [{"name": "Pothole"}]},
        occurred_at=datetime(2015, 1, 1, tzinfo=UTC),
    )
    apply_config(
        store,
        tenant_id,
        {"dashboards": [{"name": "overview", "widgets": [DASHBOARD_WIDGET]}]},
        occurred_at=datetime(2015, 1, 1, tzinfo=UTC),
    )
    tokens = {}
    keys = {}
    for role in ROLES:
        key, tokens[role] = issue_key(
            store, tenant_id, role=role, name=f"{role} key", issued_by="test"
        )
        keys[role] = key
    reporter = keys[Role.REPORTER]
    commands = IncidentCommands(store)
    result = commands.submit(
        tenant_id,
        {"description": "Streetlight out on Elm St"},
        actor=Actor(reporter.name, "reporter", key_id=reporter.key_id),
        reporter={"name": "Lee Park", "phone": "617 555 0199"},
    )
    contact = commands.load(tenant_id, result.incident_id)
    spare, _ = issue_key(store, tenant_id, role=Role.STAFF, name="spare", issued_by="test")
    [report] = store.read_stream(tenant_id, f"incident-{result.incident_id}")
    return Tenant(
        tenant_id,
        tokens,
        str(result.incident_id),
        str(spare.key_id),
        str(contact.reporter_id),
        str(report.event_id),
    )


@pytest.fixture
def tenants(store: PostgresEventStore) -> tuple[Tenant, Tenant]:
    return _make_tenant(store), _make_tenant(store)


@pytest.fixture
def client(database: Database, session_pool: ConnectionPool[Any]) -> Iterator[TestClient]:
    with TestClient(create_app(database, pool=session_pool)) as test_client:
        yield test_client


BODIES: dict[str, dict[str, Any]] = {
    "incidents": {"description": "Pothole on Main St"},
    "assign": {"assignee": "m.chen"},
    "request-information": {"question": "Which side of the street?"},
    "reporter-responded": {"response": "North side"},
    "reopen": {"reason": "Still broken"},
    "reject": {"reason": "Not ours", "redirect_to": "the state highway agency"},
    "keys": {"role": "staff", "name": "new clerk"},
    "erase": {"reason": "erasure request"},
    "reclassify": {"severity": "high"},
    "suggestions": {"latitude": 42.3474, "longitude": -71.0944, "description": "Light out"},
    "grouping": {"distance_m": 120},
    "config": {"routing": []},
    "{dashboard}": {"widgets": [{"id": "seals", "kind": "recent_seals", "public": True}]},
    "what-if": {"sla_policies": [{"id": "fast", "resolution": "2 calendar hours"}]},
}
DASHBOARD_WIDGET = {"id": "seals", "kind": "recent_seals", "public": True}


def call(
    client: TestClient, method: str, path: str, tenant: Tenant, ids: Tenant, token: str | None
) -> Any:
    """Call `path` for `tenant`, with the incident and key ids of `ids` filled in."""
    url = path.format(
        tenant_id=tenant.tenant_id,
        incident_id=ids.incident_id,
        key_id=ids.key_id,
        reporter_id=ids.reporter_id,
        format="json",
        service_code="pothole",
        service_request_id=ids.incident_id,
        token=ids.token,
        calendar_name="office",
        dashboard="overview",
        widget_id="seals",
    )
    last = path.rstrip("/").rsplit("/", 1)[-1]
    body = BODIES.get(last)
    if last == "mark-duplicate":
        body = {"duplicate_of": ids.incident_id}
    if last == "merge-group":
        body = {"with_incident": ids.incident_id}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if method == "POST" and OPEN311 in path:
        # GeoReport requests are form-encoded.
        form = {"service_code": "pothole", "address_string": "1 Main St"}
        return client.post(url, data=form, headers=headers)
    if method == "GET":
        # Officers must give a reason for contact details; others may and it is ignored.
        return client.get(url, headers=headers, params={"reason": "permission walk"})
    if method == "PUT":
        return client.put(url, json=body, headers=headers)
    return client.post(url, json=body, headers=headers)


def test_documented_permissions_match_the_code() -> None:
    app = create_app(Database("", "", "app", "", "worker"))
    in_code = {}
    for route in app_routes(app):
        roles = route_roles(route)
        for method in route.methods:
            in_code[(method, route.path)] = (
                {role.value for role in roles} if roles is not None else {NO_KEY}
            )

    assert in_code == documented_permissions()


def test_openapi_lists_roles_of_each_operation(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    documented = documented_permissions()

    for (method, path), roles in documented.items():
        operation = schema["paths"][path][method.lower()]
        expected = set() if roles == {NO_KEY} else roles
        assert set(operation["x-roles"]) == expected, (method, path)


def test_each_role_reaches_exactly_its_endpoints(
    client: TestClient, tenants: tuple[Tenant, Tenant]
) -> None:
    tenant, _ = tenants
    for (method, path), allowed in documented_permissions().items():
        if allowed == {NO_KEY}:
            # Readiness may fail here (the session database has no projector running),
            # but never for want of a key.
            assert call(client, method, path, tenant, tenant, None).status_code in (200, 503)
            continue
        assert call(client, method, path, tenant, tenant, None).status_code == 401, path
        for role in ROLES:
            response = call(client, method, path, tenant, tenant, tenant.tokens[role])
            if role.value in allowed:
                assert response.status_code not in (401, 403, 404, 500), (
                    method,
                    path,
                    role,
                    response.text,
                )
            else:
                assert response.status_code == 403, (method, path, role, response.text)
                if OPEN311 in path:
                    # GeoReport errors are lists of codes and descriptions.
                    assert response.json()[0]["code"] == 403
                    continue
                assert response.json()["allowed_roles"] == sorted(
                    allowed, key=[r.value for r in ROLES].index
                )


def test_keys_of_one_tenant_see_nothing_of_another(
    client: TestClient, tenants: tuple[Tenant, Tenant], database: Database
) -> None:
    mine, theirs = tenants
    before = their_events(database, theirs)
    for (method, path), allowed in documented_permissions().items():
        if allowed == {NO_KEY}:
            continue
        for role in ROLES:
            token = mine.tokens[role]
            # Their tenant in the path: as if the tenant did not exist.
            across = call(client, method, path, theirs, theirs, token)
            # My tenant in the path, their ids: as if the ids did not exist.
            their_ids = call(client, method, path, mine, theirs, token)

            assert across.status_code == 404, (method, path, role, across.text)
            body = across.json()
            detail = body[0]["description"] if OPEN311 in path else body["detail"]
            assert detail.startswith(f"tenant {theirs.tenant_id!r} not found")
            if any(
                name in path
                for name in (
                    "{incident_id}",
                    "{key_id}",
                    "{reporter_id}",
                    "{service_request_id}",
                    "{token}",
                )
            ):
                assert their_ids.status_code in (403, 404), (method, path, role)

    assert their_events(database, theirs) == before


def their_events(database: Database, tenant: Tenant) -> list[tuple[Any, ...]]:
    with database.connect_owner() as conn:
        return conn.execute(
            "SELECT position, hash FROM events WHERE tenant_id = %s ORDER BY position",
            (tenant.tenant_id,),
        ).fetchall()


def test_reporters_see_only_their_own_reports(
    client: TestClient, tenants: tuple[Tenant, Tenant], store: PostgresEventStore
) -> None:
    tenant, _ = tenants
    other, other_token = issue_key(
        store, tenant.tenant_id, role=Role.REPORTER, name="neighbour", issued_by="test"
    )
    url = f"/tenants/{tenant.tenant_id}/incidents/{tenant.incident_id}"
    own = client.get(url, headers={"Authorization": f"Bearer {tenant.tokens[Role.REPORTER]}"})
    foreign = client.get(url, headers={"Authorization": f"Bearer {other_token}"})
    answer = client.post(
        f"{url}/reporter-responded",
        json={"response": "It is fixed"},
        headers={"Authorization": f"Bearer {other_token}"},
    )

    assert own.status_code == 200
    assert own.json()["submitted_by"] is not None
    assert foreign.status_code == 404
    assert answer.status_code == 404


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("not-a-key", "malformed API key"),
        ("cpk_" + "0" * 32 + "_" + "A" * 43, "unknown API key"),
    ],
)
def test_bad_keys_answer_401(
    client: TestClient, tenants: tuple[Tenant, Tenant], token: str, reason: str
) -> None:
    tenant, _ = tenants
    response = client.get(
        f"/tenants/{tenant.tenant_id}/sla/summary", headers={"Authorization": f"Bearer {token}"}
    )

    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert reason in response.json()["detail"]
    assert token not in response.text


def test_revoked_and_expired_keys_answer_401(
    client: TestClient, tenants: tuple[Tenant, Tenant], store: PostgresEventStore
) -> None:
    tenant, _ = tenants
    revoked, revoked_token = issue_key(
        store, tenant.tenant_id, role=Role.STAFF, name="leaver", issued_by="test"
    )
    revoke_key(store, tenant.tenant_id, revoked.key_id, revoked_by="test")
    past = datetime.now(UTC) - timedelta(days=2)
    _, expired_token = issue_key(
        store,
        tenant.tenant_id,
        role=Role.STAFF,
        name="contractor",
        issued_by="test",
        now=past,
        expires_at=past + timedelta(days=1),
    )
    url = f"/tenants/{tenant.tenant_id}/sla/summary"

    for token, reason in ((revoked_token, "revoked"), (expired_token, "expired")):
        response = client.get(url, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401
        assert reason in response.json()["detail"]


def test_admin_issues_and_revokes_keys_through_the_api(
    client: TestClient, tenants: tuple[Tenant, Tenant], store: PostgresEventStore
) -> None:
    tenant, _ = tenants
    admin = {"Authorization": f"Bearer {tenant.tokens[Role.ADMIN]}"}
    base = f"/tenants/{tenant.tenant_id}/keys"

    issued = client.post(base, json={"role": "officer", "name": "auditor"}, headers=admin)
    token = issued.json()["token"]
    officer = {"Authorization": f"Bearer {token}"}
    before = client.get(f"/tenants/{tenant.tenant_id}/sla/summary", headers=officer)
    revoked = client.post(
        f"{base}/{issued.json()['key_id']}/revoke", json={"reason": "audit over"}, headers=admin
    )
    after = client.get(f"/tenants/{tenant.tenant_id}/sla/summary", headers=officer)
    listed = client.get(base, headers=admin).json()
    bad_role = client.post(base, json={"role": "mayor", "name": "x"}, headers=admin)

    assert issued.status_code == 201
    assert before.status_code == 200
    assert revoked.status_code == 200
    assert revoked.json()["revoked_at"] is not None
    assert after.status_code == 401
    assert all("token" not in key and token not in str(key) for key in listed)
    assert bad_role.status_code == 422
    with store.pool.connection() as conn:
        set_tenant(conn, tenant.tenant_id)
        actors = conn.execute(
            "SELECT metadata->>'actor', metadata->>'actor_id' FROM events "
            "WHERE stream_id = %s AND payload->>'key_id' = %s ORDER BY stream_version",
            (f"keys-{tenant.tenant_id}", issued.json()["key_id"]),
        ).fetchall()
    admin_key_id = str(uuid.UUID(hex=tenant.tokens[Role.ADMIN].split("_")[1]))
    assert actors == [("admin key", admin_key_id), ("admin key", admin_key_id)]


def test_report_severity_and_department_staff_only(
    client: TestClient, tenants: tuple[Tenant, Tenant]
) -> None:
    tenant, _ = tenants
    url = f"/tenants/{tenant.tenant_id}/incidents"
    reporter = {"Authorization": f"Bearer {tenant.tokens[Role.REPORTER]}"}
    staff = {"Authorization": f"Bearer {tenant.tokens[Role.STAFF]}"}
    report = {"description": "Deep pothole", "category": "Pothole", "area": "North"}
    decided = {**report, "severity": "high", "department": "Roads"}

    with_area = client.post(url, json=report, headers=reporter)
    with_severity = client.post(url, json={**report, "severity": "critical"}, headers=reporter)
    with_both = client.post(url, json=decided, headers=reporter)
    by_staff = client.post(url, json=decided, headers=staff)
    unknown_severity = client.post(url, json={**report, "severity": "urgent"}, headers=staff)
    history = client.get(f"{url}/{by_staff.json()['incident_id']}/events", headers=staff)

    assert with_area.status_code == 201
    assert with_severity.status_code == 403
    assert "may not set severity on a report; leave it out" in with_severity.json()["detail"]
    assert with_both.status_code == 403
    assert "set severity or department on a report; leave them out" in with_both.json()["detail"]
    assert by_staff.status_code == 201
    assert unknown_severity.status_code == 422
    assert "urgent" in unknown_severity.text
    payload = history.json()[0]["payload"]
    assert (payload["area"], payload["severity"], payload["department"]) == (
        "North",
        "high",
        "Roads",
    )
