"""What-if replays: a proposed SLA policy judged against the policies in force."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from psycopg_pool import ConnectionPool

from api.app import create_app
from ledger import lifecycle as lc
from ledger.config_sections import apply_config
from ledger.database import Database
from ledger.errors import ConfigInvalid
from ledger.events import NewEvent
from ledger.ids import incident_stream_id
from ledger.keys import Role, issue_key
from ledger.store import PostgresEventStore
from ledger.tenants import create_tenant, require_tenant
from projections.sla import SlaProjection
from replay.time_travel import read_tenant_events
from replay.what_if import WhatIfReport, parse_proposal, what_if
from tests.api.test_app import assert_problem
from tests.conftest import project_everything

T0 = datetime(2026, 3, 2, 12, tzinfo=UTC)
# Judged well after every incident below was resolved.
JUDGED_AT = T0 + timedelta(days=30)
# In force from T0 on; before it the tenant's default of 72 calendar hours applies.
IN_FORCE = {"sla_policies": [{"id": "standard", "resolution": "48 calendar hours"}]}
STRICT = {"sla_policies": [{"id": "strict", "resolution": "24 calendar hours"}]}
LOOSE = {"sla_policies": [{"id": "loose", "resolution": "72 calendar hours"}]}
# Incident name -> (hours after T0 it was submitted, category, hours it took to resolve).
CASES: dict[str, tuple[float, str, float]] = {
    "early": (-50, "Pothole", 60),  # before the policy: judged by the 72-hour default
    "quick": (1, "Graffiti", 10),
    "day_and_half": (2, "Pothole", 30),
    "slow": (3, "Pothole", 60),
    "forty": (4, "Graffiti", 40),
}


def _submit(
    store: PostgresEventStore,
    tenant: str,
    at: datetime,
    category: str,
    *,
    resolved_after: float | None,
    extra: dict[str, Any] | None = None,
    rejected: bool = False,
) -> uuid.UUID:
    incident = uuid.uuid4()
    payload = {"incident_id": str(incident), "category": category, **(extra or {})}
    events = [NewEvent(lc.REPORT_SUBMITTED, payload, at)]
    if rejected:
        events.append(NewEvent(lc.INCIDENT_REJECTED, {"reason": "not ours"}, at + timedelta(1)))
    if resolved_after is not None:
        events.append(NewEvent(lc.INCIDENT_RESOLVED, {}, at + timedelta(hours=resolved_after)))
    store.append(tenant, incident_stream_id(incident), events, expected_version=0)
    return incident


def seed_history(store: PostgresEventStore, tenant: str) -> dict[str, uuid.UUID]:
    """Create `tenant` with the cases above, a report with its own target and a rejected one."""
    create_tenant(
        store,
        tenant,
        name="What-if City",
        time_zone="America/New_York",
        occurred_at=T0 - timedelta(days=10),
        resolution_hours=72,
    )
    ids: dict[str, uuid.UUID] = {}
    ids["early"] = _submit(
        store, tenant, T0 - timedelta(hours=50), "Pothole", resolved_after=CASES["early"][2]
    )
    apply_config(store, tenant, IN_FORCE, occurred_at=T0)
    for name, (hours, category, resolved_after) in CASES.items():
        if name != "early":
            at = T0 + timedelta(hours=hours)
            ids[name] = _submit(store, tenant, at, category, resolved_after=resolved_after)
    # An imported report keeps the city's own target (2 hours, missed) under any policy.
    ids["imported"] = _submit(
        store,
        tenant,
        T0 + timedelta(hours=5),
        "Streetlight",
        resolved_after=5,
        extra={"source": "city", "resolution_due_at": (T0 + timedelta(hours=7)).isoformat()},
    )
    ids["rejected"] = _submit(
        store, tenant, T0 + timedelta(hours=6), "Pothole", resolved_after=None, rejected=True
    )
    return ids


def _compare(store: PostgresEventStore, tenant: str, document: Any, **times: Any) -> WhatIfReport:
    proposal = parse_proposal(document, require_tenant(store, tenant))
    with store.pool.connection() as conn:
        return what_if(conn, tenant, proposal, judged_at=JUDGED_AT, **times)


@pytest.fixture
def history(store: PostgresEventStore) -> tuple[str, dict[str, uuid.UUID]]:
    tenant = f"wi-{uuid.uuid4().hex[:10]}"
    return tenant, seed_history(store, tenant)


def _rates(report: WhatIfReport) -> dict[str | None, tuple[float | None, float | None]]:
    return {
        item.category: (item.in_force.on_time_rate, item.proposed.on_time_rate)
        for item in report.categories
    }


def test_stricter_policy_adds_breaches(
    store: PostgresEventStore, history: tuple[str, dict[str, uuid.UUID]]
) -> None:
    tenant, ids = history
    report = _compare(store, tenant, STRICT)
    newly = {change.incident_id: change for change in report.newly_breached}

    # Against 24 hours, 30, 40 and 60 hours (the early case) are late. The slow case (60
    # hours) was already late against 48.
    assert set(newly) == {ids["early"], ids["day_and_half"], ids["forty"]}
    assert report.no_longer_breached == []
    early = newly[ids["early"]]
    assert early.policy_in_force == "default"
    assert early.due_in_force == T0 + timedelta(hours=-50 + 72)
    assert early.policy_proposed == "strict"
    assert early.due_proposed == T0 + timedelta(hours=-50 + 24)
    assert newly[ids["forty"]].due_in_force == T0 + timedelta(hours=4 + 48)
    assert newly[ids["forty"]].due_proposed == T0 + timedelta(hours=4 + 24)
    assert _rates(report) == {
        "Graffiti": (1.0, 0.5),
        "Pothole": (2 / 3, 0.0),
        "Streetlight": (0.0, 0.0),
    }
    assert report.totals_in_force.total == 6
    assert report.totals_in_force.breached == 2
    assert report.totals_proposed.breached == 5
    assert report.sections == ["sla_policies"]


def test_looser_policy_removes_breaches(
    store: PostgresEventStore, history: tuple[str, dict[str, uuid.UUID]]
) -> None:
    tenant, ids = history
    report = _compare(store, tenant, LOOSE)
    (no_longer,) = report.no_longer_breached

    assert report.newly_breached == []
    assert no_longer.incident_id == ids["slow"]
    assert no_longer.policy_in_force == "standard"
    assert no_longer.policy_proposed == "loose"
    assert no_longer.due_proposed == T0 + timedelta(hours=3 + 72)
    assert _rates(report) == {
        "Graffiti": (1.0, 1.0),
        "Pothole": (2 / 3, 1.0),
        "Streetlight": (0.0, 0.0),
    }


def test_same_policy_changes_nothing(
    store: PostgresEventStore, history: tuple[str, dict[str, uuid.UUID]]
) -> None:
    tenant, ids = history
    # The policy in force, but from the tenant's creation on: only the early case moves.
    report = _compare(store, tenant, IN_FORCE)

    assert [change.incident_id for change in report.newly_breached] == [ids["early"]]
    assert report.no_longer_breached == []


def test_as_of_limits_history(
    store: PostgresEventStore, history: tuple[str, dict[str, uuid.UUID]]
) -> None:
    tenant, ids = history
    # By T0 + 3.5 hours early, quick, day_and_half and slow were submitted and none was
    # resolved. Judged then, only early (53.5 hours old) has passed the strict 24 hours.
    moment = T0 + timedelta(hours=3.5)
    proposal = parse_proposal(STRICT, require_tenant(store, tenant))
    with store.pool.connection() as conn:
        report = what_if(conn, tenant, proposal, judged_at=moment, as_of=moment)

    assert [change.incident_id for change in report.newly_breached] == [ids["early"]]
    assert report.totals_in_force.total == 4
    assert report.totals_in_force.open == 4
    assert report.totals_in_force.breached == 0


@pytest.mark.parametrize(
    ("document", "section", "words"),
    [
        ({"sla_policies": [{"id": "x", "resolution": "soon"}]}, "sla_policies", "'soon'"),
        ({"routing": []}, "sla_policies", "missing"),
        ({**STRICT, "routing": []}, "routing", "compares SLA policies only"),
        ({**STRICT, "weather": 1}, "weather", "unknown section"),
        (
            {"sla_policies": [{"id": "b", "calendar": "nowhere", "resolution": "2 business days"}]},
            "sla_policies",
            "'nowhere', which is not configured",
        ),
        (["not", "an", "object"], "(document)", "the document is a list"),
        (None, "(document)", "the document is empty"),
    ],
)
def test_bad_proposal_is_rejected(
    store: PostgresEventStore, tenant_id: str, document: Any, section: str, words: str
) -> None:
    with pytest.raises(ConfigInvalid) as raised:
        parse_proposal(document, require_tenant(store, tenant_id))

    assert section in [problem.section for problem in raised.value.problems]
    assert words in str(raised.value)
    assert "nothing replayed" in str(raised.value)
    assert "applied" not in str(raised.value)


def _table_digests(database: Database) -> dict[str, tuple[int, str]]:
    """Return the row count and an MD5 of the sorted rows of every table in the schema."""
    digests = {}
    # The owner role: row-level security would hide the rows from the other roles.
    with database.connect_owner() as conn:
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
            )
        ]
        for table in tables:
            row = conn.execute(
                f"SELECT count(*), md5(coalesce(string_agg(t::text, chr(10) ORDER BY t::text), ''))"
                f' FROM public."{table}" t'
            ).fetchone()
            assert row is not None
            digests[table] = (row[0], row[1])
    return digests


def _cli(database: Database, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["DATABASE_URL"] = database.owner_conninfo
    env["CIVICPULSE_LOG_LEVEL"] = "WARNING"
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_what_if_writes_nothing(
    fresh_database: Database, fresh_store: PostgresEventStore, tmp_path: Path
) -> None:
    tenant = f"wi-{uuid.uuid4().hex[:10]}"
    ids = seed_history(fresh_store, tenant)
    project_everything(fresh_database)
    policy_file = tmp_path / "strict.yaml"
    policy_file.write_text(yaml.safe_dump({"tenant": tenant, **STRICT}))
    before = _table_digests(fresh_database)

    report = _compare(fresh_store, tenant, STRICT)
    command = _cli(
        fresh_database, "what-if", "--tenant", tenant, str(policy_file), "--format", "json"
    )
    after = _table_digests(fresh_database)

    assert command.returncode == 0, command.stderr
    assert {"events", "incident_sla", "sla_configs", "projection_checkpoints"} <= set(before)
    assert before["events"][0] > 0
    assert before["incident_sla"][0] == len(ids)
    assert after == before
    assert len(report.newly_breached) == 3
    assert json.loads(command.stdout)["newly_breached"] == [
        {**item, "incident_id": str(item["incident_id"])}
        for item in report.to_json()["newly_breached"]
    ]


def test_cli_table_and_csv(database: Database, store: PostgresEventStore, tmp_path: Path) -> None:
    tenant = f"wi-{uuid.uuid4().hex[:10]}"
    ids = seed_history(store, tenant)
    policy_file = tmp_path / "loose.json"
    policy_file.write_text(json.dumps(LOOSE))
    # A fixed clock, so the figures do not depend on when the test runs.
    as_of = (T0 + timedelta(days=30)).isoformat()

    table = _cli(database, "what-if", "--tenant", tenant, str(policy_file), "--as-of", as_of)
    as_csv = _cli(
        database,
        "what-if",
        "--tenant",
        tenant,
        str(policy_file),
        "--as-of",
        as_of,
        "--format",
        "csv",
    )

    assert table.returncode == 0, table.stderr
    assert "1 incidents would no longer breach" in table.stdout
    assert str(ids["slow"]) in table.stdout
    assert "0 incidents would breach under the proposal" in table.stdout
    assert as_csv.returncode == 0, as_csv.stderr
    lines = as_csv.stdout.splitlines()
    assert lines[0] == (
        "category,total,breached_in_force,breached_proposed,"
        "on_time_rate_in_force,on_time_rate_proposed"
    )
    assert "Pothole,3,1,0,0.666667,1.000000" in lines
    assert lines[-1] == "(all),6,2,1,0.666667,0.833333"


@pytest.mark.parametrize(
    ("content", "args", "words"),
    [
        ("sla_policies: [{id: x, resolution: soon}]", [], "invalid target 'soon'"),
        ("sla_policies: [", [], "invalid YAML or JSON"),
        (json.dumps({"tenant": "elsewhere", **STRICT}), [], "names tenant 'elsewhere'"),
        (json.dumps(STRICT), ["--format", "xml"], "invalid --format 'xml'"),
        (json.dumps(STRICT), ["--as-of", "yesterday"], "invalid as_of 'yesterday'"),
    ],
)
def test_cli_bad_input(
    database: Database, tenant_id: str, tmp_path: Path, content: str, args: list[str], words: str
) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(content)
    result = _cli(database, "what-if", "--tenant", tenant_id, str(policy_file), *args)

    assert result.returncode == 2
    assert words in result.stderr


@pytest.fixture
def officer(
    database: Database, session_pool: ConnectionPool[Any], store: PostgresEventStore
) -> Iterator[tuple[TestClient, str, dict[str, uuid.UUID]]]:
    tenant = f"wi-{uuid.uuid4().hex[:10]}"
    ids = seed_history(store, tenant)
    _, token = issue_key(store, tenant, role=Role.OFFICER, name="auditor", issued_by="test")
    headers = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app(database, pool=session_pool), headers=headers) as client:
        yield client, tenant, ids


def test_api_compares_policies(
    officer: tuple[TestClient, str, dict[str, uuid.UUID]],
) -> None:
    client, tenant, ids = officer
    as_of = (T0 + timedelta(days=30)).isoformat()
    response = client.post(f"/tenants/{tenant}/sla/what-if", params={"as_of": as_of}, json=STRICT)

    assert response.status_code == 200, response.text
    body = response.json()
    assert {case["incident_id"] for case in body["newly_breached"]} == {
        str(ids["early"]),
        str(ids["day_and_half"]),
        str(ids["forty"]),
    }
    assert body["no_longer_breached"] == []
    assert body["totals"]["in_force"]["breached"] == 2
    assert body["totals"]["proposed"]["breached"] == 5
    pothole = next(item for item in body["categories"] if item["category"] == "Pothole")
    assert pothole["proposed"]["on_time_rate"] == 0.0


def test_api_rejects_bad_policy(
    officer: tuple[TestClient, str, dict[str, uuid.UUID]],
) -> None:
    client, tenant, _ = officer
    document = {"sla_policies": [{"id": "x", "resolution": "3 weeks"}]}
    response = client.post(f"/tenants/{tenant}/sla/what-if", json=document)
    body = assert_problem(response, 422, "sla_policies", "'3 weeks'")

    assert body["errors"][0]["section"] == "sla_policies"
    assert "e.g. '4 business hours'" in body["errors"][0]["fix"]
    bad_time = client.post(f"/tenants/{tenant}/sla/what-if", params={"as_of": "soon"}, json=STRICT)
    assert_problem(bad_time, 422, "invalid as_of 'soon'")


def test_proposal_with_its_own_calendar(
    store: PostgresEventStore, history: tuple[str, dict[str, uuid.UUID]]
) -> None:
    tenant, ids = history
    office = {
        "name": "office",
        "time_zone": "America/New_York",
        "weekly_hours": {
            day: ["09:00-17:00"] for day in ("monday", "tuesday", "wednesday", "thursday", "friday")
        },
    }
    document = {
        "calendars": [office],
        "sla_policies": [{"id": "office", "calendar": "office", "resolution": "1 business days"}],
    }
    report = _compare(store, tenant, document)
    newly = {change.incident_id: change for change in report.newly_breached}

    assert report.sections == ["calendars", "sla_policies"]
    # Submitted on Monday 2 March at 08:00 in New York: 8 business hours end at 17:00 (EST),
    # and it was resolved at 18:00.
    assert newly[ids["quick"]].due_proposed == datetime(2026, 3, 2, 22, tzinfo=UTC)


def test_what_if_projection_never_writes(
    store: PostgresEventStore, history: tuple[str, dict[str, uuid.UUID]]
) -> None:
    tenant, _ = history
    proposal = parse_proposal(STRICT, require_tenant(store, tenant))
    projection = SlaProjection(proposed=proposal)
    with store.pool.connection() as conn:
        events = read_tenant_events(conn, tenant)
        for write in (
            lambda: projection.apply(conn, events),
            lambda: projection.write_states(conn, projection.fold(events)),
            lambda: projection.write_log_rows(conn, events),
        ):
            with pytest.raises(RuntimeError, match="folds in memory only"):
                write()
