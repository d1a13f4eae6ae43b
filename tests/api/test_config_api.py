from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from psycopg_pool import ConnectionPool

from api.app import create_app
from ledger.database import Database
from ledger.keys import Role, issue_key
from ledger.store import PostgresEventStore
from tests.api.test_app import assert_problem
from tests.api.test_cli import civicpulse
from tests.conftest import project_everything
from tests.ledger.test_config_sections import CALENDAR, DOCUMENT, ICS, POLICY


@pytest.fixture
def admin(
    database: Database,
    session_pool: ConnectionPool[Any],
    store: PostgresEventStore,
    tenant_id: str,
) -> Iterator[TestClient]:
    """A client that sends an admin key of `tenant_id` with every request."""
    _, token = issue_key(store, tenant_id, role=Role.ADMIN, name="test admin", issued_by="test")
    headers = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app(database, pool=session_pool), headers=headers) as test_client:
        yield test_client


def test_post_config_then_read_it(admin: TestClient, tenant_id: str) -> None:
    applied = admin.post(f"/tenants/{tenant_id}/config", json=DOCUMENT)
    again = admin.post(f"/tenants/{tenant_id}/config", json=DOCUMENT)
    current = admin.get(f"/tenants/{tenant_id}/config")
    versions = admin.get(f"/tenants/{tenant_id}/config/versions")

    assert applied.status_code == 200, applied.text
    assert applied.json()["changed"] == ["categories", "calendars", "sla_policies", "routing"]
    assert applied.json()["warnings"] == []
    assert again.json() == {"version": applied.json()["version"], "changed": [], "warnings": []}
    assert current.json()["version"] == applied.json()["version"]
    assert current.json()["sections"]["sla_policies"]["policies"][0]["id"] == "standard"
    assert [item["section"] for item in versions.json()][-4:] == [
        "categories",
        "calendars",
        "sla_policies",
        "routing",
    ]
    assert versions.json()[-1]["actor"] == "test admin"


def test_unknown_rule_category_warned(admin: TestClient, tenant_id: str) -> None:
    document = {
        **DOCUMENT,
        "routing": [{"categories": ["Potholes"], "department": "Roads"}],
        "grouping": {"related_categories": [["Pothole", "Graffiti"]]},
    }

    applied = admin.post(f"/tenants/{tenant_id}/config", json=document)

    assert applied.status_code == 200, applied.text
    assert applied.json()["warnings"] == [
        "routing rule 1 names category 'Potholes', which the categories section lacks, so it "
        "matches only reports of exactly that category; did you mean 'Pothole'?",
        "grouping related_categories names category 'Graffiti', which the categories section "
        "lacks, so it matches only reports of exactly that category",
    ]


def test_unknown_section_is_problem(admin: TestClient, tenant_id: str) -> None:
    response = admin.post(f"/tenants/{tenant_id}/config", json={**DOCUMENT, "extra": 1})
    body = assert_problem(response, 422, "extra", "unknown section")

    assert body["errors"][0]["section"] == "extra"
    assert admin.get(f"/tenants/{tenant_id}/config").json()["sections"] == {}


def test_invalid_value_is_problem(admin: TestClient, tenant_id: str) -> None:
    document = {**DOCUMENT, "sla_policies": [{**POLICY, "resolution": "soon"}]}
    response = admin.post(f"/tenants/{tenant_id}/config", json=document)
    body = assert_problem(response, 422, "sla_policies", "'soon'")
    (error,) = body["errors"]

    assert error["section"] == "sla_policies"
    assert error["field"] == "0.resolution"
    assert error["value"] == "soon"
    assert "business hours" in error["fix"]
    assert admin.get(f"/tenants/{tenant_id}/config").json()["sections"] == {}


def test_upload_ics_holidays(admin: TestClient, tenant_id: str) -> None:
    admin.post(f"/tenants/{tenant_id}/config", json={"calendars": [CALENDAR]})
    url = f"/tenants/{tenant_id}/config/calendars/office/holidays"
    response = admin.post(url, content=ICS, headers={"Content-Type": "text/calendar"})
    garbage = admin.post(url, content=b"not a calendar", headers={"Content-Type": "text/calendar"})
    unknown = admin.post(
        f"/tenants/{tenant_id}/config/calendars/night/holidays",
        content=ICS,
        headers={"Content-Type": "text/calendar"},
    )
    holidays = admin.get(f"/tenants/{tenant_id}/config").json()["sections"]["calendars"]

    assert response.status_code == 200, response.text
    assert response.json()["changed"] == ["calendars"]
    assert holidays["calendars"][0]["holidays"][:2] == ["2026-12-24", "2026-12-25"]
    assert_problem(garbage, 422, "not a valid iCalendar file")
    assert_problem(unknown, 422, "no such calendar")


def test_cli_config_apply(
    database: Database, store: PostgresEventStore, tenant_id: str, tmp_path: Path
) -> None:
    (tmp_path / "uk.ics").write_bytes(ICS)
    path = tmp_path / "config.yaml"
    path.write_text(
        f"""
tenant: {tenant_id}
calendars:
  - name: office
    time_zone: Europe/London
    weekly_hours:
      monday: ["09:00-17:00"]
    holidays_ics: uk.ics
sla_policies:
  - id: standard
    calendar: office
    resolution: 2 business days
""",
        encoding="utf-8",
    )
    env = {**os.environ, "DATABASE_URL": database.owner_conninfo}
    env["CIVICPULSE_LOG_LEVEL"] = "WARNING"
    first = civicpulse("config", "apply", str(path), env=env)
    second = civicpulse("config", "apply", str(path), env=env)
    shown = civicpulse("config", "show", "--tenant", tenant_id, env=env)
    path.write_text(
        "categories: [{name: Pothole}]\nrouting: [{categories: [Potholes], department: Roads}]\n",
        encoding="utf-8",
    )
    warned = civicpulse("config", "apply", str(path), "--tenant", tenant_id, env=env)
    path.write_text("sla_policies: [{id: x, resolution: '2 business days'}]\n", encoding="utf-8")
    bad = civicpulse("config", "apply", str(path), "--tenant", tenant_id, env=env)
    no_tenant = civicpulse("config", "apply", str(path), env=env)

    assert first.returncode == 0, first.stderr
    assert "changed: calendars, sla_policies" in first.stderr
    assert second.returncode == 0
    assert "unchanged" in second.stderr
    assert '"2026-12-24"' in shown.stdout
    assert warned.returncode == 0, warned.stderr
    assert "warning: routing rule 1 names category 'Potholes'" in warned.stderr
    assert "did you mean 'Pothole'?" in warned.stderr
    assert bad.returncode == 2
    assert "names no calendar" in bad.stderr
    assert no_tenant.returncode == 2
    assert "--tenant" in no_tenant.stderr


def test_cli_invalid_unquoted_date(
    database: Database, store: PostgresEventStore, tenant_id: str, tmp_path: Path
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"""tenant: {tenant_id}
calendars:
  - name: office
    time_zone: Europe/London
    weekly_hours: {{monday: ["09:00-17:00"]}}
    holidays: [2026-02-30]
""",
        encoding="utf-8",
    )
    env = {**os.environ, "DATABASE_URL": database.owner_conninfo}
    env["CIVICPULSE_LOG_LEVEL"] = "WARNING"
    result = civicpulse("config", "apply", str(path), env=env)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{path}, line 6" in result.stderr
    assert "invalid date 2026-02-30" in result.stderr
    assert "YYYY-MM-DD" in result.stderr


def test_cli_unknown_category_field(
    database: Database, store: PostgresEventStore, tenant_id: str, tmp_path: Path
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "categories:\n  - {name: Pothole, departmnt: Public Works}\n"
        "calendars:\n  - {name: office, time_zone: UTC, weekly_hours: {funday: ['09:00-17:00']}}\n",
        encoding="utf-8",
    )
    env = {**os.environ, "DATABASE_URL": database.owner_conninfo}
    env["CIVICPULSE_LOG_LEVEL"] = "WARNING"
    result = civicpulse("config", "apply", str(path), "--tenant", tenant_id, env=env)

    assert result.returncode == 2
    assert "unknown field(s) departmnt" in result.stderr
    assert "field 0.weekly_hours.funday," in result.stderr
    assert "invalid key 'funday'" in result.stderr


def test_impossible_date_is_problem(admin: TestClient, tenant_id: str) -> None:
    document = {"calendars": [{**CALENDAR, "holidays": ["2026-02-30"]}]}
    response = admin.post(f"/tenants/{tenant_id}/config", json=document)
    body = assert_problem(response, 422, "calendars", "'2026-02-30'")
    (error,) = body["errors"]

    assert error["field"] == "0.holidays.0"
    assert error["value"] == "2026-02-30"
    assert "existing date, written YYYY-MM-DD" in error["fix"]


def test_removing_used_calendar_is_problem(admin: TestClient, tenant_id: str) -> None:
    admin.post(f"/tenants/{tenant_id}/config", json=DOCUMENT)
    other = {**CALENDAR, "name": "other"}
    response = admin.post(f"/tenants/{tenant_id}/config", json={"calendars": [other]})
    body = assert_problem(response, 422, "calendars", "'office'")
    (error,) = body["errors"]
    sections = admin.get(f"/tenants/{tenant_id}/config").json()["sections"]

    assert error["value"] == "office"
    assert "SLA policies standard name it" in error["fix"]
    assert sections["calendars"]["calendars"][0]["name"] == "office"


def test_cli_projections_status(database: Database) -> None:
    env = {**os.environ, "DATABASE_URL": database.owner_conninfo}
    env["CIVICPULSE_LOG_LEVEL"] = "WARNING"
    project_everything(database)
    with database.connect_owner() as conn:
        conn.execute(
            "UPDATE projection_checkpoints SET last_error = 'boom at 7', "
            "last_error_at = now() WHERE projection = 'incidents'"
        )
    try:
        shown = civicpulse("projections", "status", env=env)
    finally:
        with database.connect_owner() as conn:
            conn.execute(
                "UPDATE projection_checkpoints SET last_error = NULL, last_error_at = NULL"
            )

    assert shown.returncode == 0, shown.stderr
    assert "incidents" in shown.stdout
    assert "sla" in shown.stdout
    assert "boom at 7" in shown.stdout


def test_status_shows_lag_and_last_error(
    database: Database, session_pool: ConnectionPool[Any], store: PostgresEventStore, tenant_id: str
) -> None:
    from ledger.commands import Actor, IncidentCommands
    from projections.runtime import record_error

    project_everything(database)
    with database.connect_worker(autocommit=True) as conn:
        record_error(conn, "sla", "projection sla failed at position 12: boom")
    IncidentCommands(store).submit(tenant_id, {"description": "Leak"}, actor=Actor("r", "reporter"))
    try:
        with TestClient(create_app(database, pool=session_pool)) as client:
            projections = {
                item["name"]: item for item in client.get("/status").json()["projections"]
            }
    finally:
        with database.connect_owner() as conn:
            conn.execute(
                "UPDATE projection_checkpoints SET last_error = NULL, last_error_at = NULL"
            )

    sla = projections["sla"]
    assert sla["events_behind"] >= 1
    assert sla["caught_up"] is False
    assert sla["lag_seconds"] >= 0
    assert sla["last_error"] == "projection sla failed at position 12: boom"
    assert sla["last_error_at"] is not None
    assert projections["incidents"]["last_error"] is None
