"""`civicpulse audit events` run as a user runs it: a process, a database, files."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from psycopg_pool import ConnectionPool

from ledger.audit_export import event_record
from ledger.database import Database
from ledger.ids import incident_stream_id
from ledger.store import PostgresEventStore
from tests.ledger.audit_scenario import AuditScenario, build_scenario


@pytest.fixture(scope="module")
def scenario(database: Database, session_pool: ConnectionPool[Any]) -> AuditScenario:
    return build_scenario(PostgresEventStore(session_pool), database)


def audit(database: Database, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ)
    env["DATABASE_URL"] = database.owner_conninfo
    env["CIVICPULSE_LOG_LEVEL"] = "WARNING"
    return subprocess.run(
        [sys.executable, "-m", "api.cli", "audit", "events", *args],
        env=env,
        capture_output=True,
        timeout=120,
    )


def test_jsonl_export_to_file(database: Database, scenario: AuditScenario, tmp_path: Path) -> None:
    output = tmp_path / "bob.jsonl"
    expected = [event_record(e) for e in scenario.events if e.metadata.get("actor") == "bob"]

    result = audit(
        database,
        "--tenant",
        scenario.tenant_id,
        "--actor",
        "bob",
        "--format",
        "jsonl",
        "--output",
        str(output),
    )

    assert result.returncode == 0, result.stderr.decode()
    assert [json.loads(line) for line in output.read_text().splitlines()] == expected
    assert f"exported {len(expected)} events" in result.stderr.decode()
    assert not (tmp_path / "bob.jsonl.partial").exists()


def test_csv_export_to_stdout(database: Database, scenario: AuditScenario) -> None:
    potholes = {
        incident_stream_id(scenario.old_pothole),
        incident_stream_id(scenario.new_pothole),
    }
    expected = [e.position for e in scenario.events if e.stream_id in potholes]

    result = audit(
        database,
        "--tenant",
        scenario.tenant_id,
        "--category",
        "Pothole",
        "--occurred-from",
        "2015-01-01T00:00",
    )
    rows = list(csv.DictReader(io.StringIO(result.stdout.decode())))

    assert result.returncode == 0, result.stderr.decode()
    assert [int(row["position"]) for row in rows] == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--occurred-from", "yesterday"], "invalid --occurred-from 'yesterday'"),
        (["--format", "xml"], "invalid --format 'xml'"),
        (["--incident", "nope"], "invalid --incident 'nope'"),
        (["--event-type", "Reported"], "unknown event_type 'Reported'"),
    ],
)
def test_bad_options_fail_clearly(
    database: Database,
    scenario: AuditScenario,
    tmp_path: Path,
    args: list[str],
    message: str,
) -> None:
    output = tmp_path / "out.csv"

    result = audit(database, "--tenant", scenario.tenant_id, *args, "--output", str(output))

    assert result.returncode == 2
    assert message in result.stderr.decode()
    assert list(tmp_path.iterdir()) == []


def test_unknown_tenant_fails(database: Database) -> None:
    result = audit(database, "--tenant", "no-such-tenant")

    assert result.returncode == 2
    assert "tenant 'no-such-tenant' not found" in result.stderr.decode()
