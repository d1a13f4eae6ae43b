"""The command line as a user runs it: real processes, the embedded server, loopback HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from ledger.commands import Actor, IncidentCommands
from ledger.database import Database
from ledger.store import PostgresEventStore
from ledger.tenants import create_tenant
from projections.runtime import default_projections
from tests.ledger.seal_helpers import (
    T0,
    add_incidents,
    stored_seals,
    stream_event,
    tamper,
    wait_for_horizon,
)


def cli_env(data_dir: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    env["CIVICPULSE_DATA_DIR"] = str(data_dir)
    env["CIVICPULSE_LOG_LEVEL"] = "WARNING"
    return env


def civicpulse(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def get_json(url: str, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_embedded_database_keeps_data_between_runs(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "pgdata")

    created = civicpulse(
        "tenant", "create", "springfield", "--time-zone", "America/Chicago", env=env
    )
    again = civicpulse("tenant", "create", "springfield", env=env)
    summary = civicpulse("sla", "summary", "--tenant", "springfield", env=env)

    assert created.returncode == 0, created.stderr
    assert "created tenant springfield (America/Chicago)" in created.stderr
    assert again.returncode == 2
    assert "already exists" in again.stderr
    assert summary.returncode == 0, summary.stderr
    assert "springfield as of" in summary.stdout


def test_bad_arguments_are_clear_errors(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "pgdata")
    missing = civicpulse("import", "boston", str(tmp_path / "nope.csv"), env=env)
    not_export = tmp_path / "notes.csv"
    not_export.write_text("id,text\n1,hello\n")
    wrong_format = civicpulse("import", "boston", str(not_export), "--tenant", "x2", env=env)
    bad_zone = civicpulse("tenant", "create", "x1", "--time-zone", "Mars/Olympus", env=env)

    assert missing.returncode == 2
    assert "nope.csv not found" in missing.stderr
    assert bad_zone.returncode == 2
    assert "unknown time zone 'Mars/Olympus'" in bad_zone.stderr
    assert wrong_format.returncode == 2
    assert "missing column(s) CASE_ENQUIRY_ID, OPEN_DT" in wrong_format.stderr
    # Nothing was created for the failed import, so the tenant id is still free.
    assert civicpulse("tenant", "create", "x2", env=env).returncode == 0


@pytest.mark.slow
def test_run_serves_demo_sla_summary(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "pgdata")
    port = free_port()
    log = tmp_path / "run.log"
    with log.open("wb") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "run", "--port", str(port)],
            env=env,
            stdout=output,
            stderr=output,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        status = None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                status = get_json(f"{base}/status")
                projections = status["projections"]
                expected = len(default_projections())
                if len(projections) == expected and all(p["caught_up"] for p in projections):
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.5)
        assert status is not None, log.read_text()
        # As the README has it: the demo staff key is in a file beside the data directory.
        token = (tmp_path / "demo-staff.key").read_text().strip()
        assert (tmp_path / "demo-staff.key").stat().st_mode & 0o077 == 0
        with pytest.raises(urllib.error.HTTPError) as unauthenticated:
            get_json(f"{base}/tenants/demo/sla/summary")
        unauthenticated.value.close()
        summary = get_json(f"{base}/tenants/demo/sla/summary", token)

        assert unauthenticated.value.code == 401

        # About 6% of demo reports are rejected, and rejected reports are not judged.
        assert 250 <= summary["totals"]["total"] < 300, summary
        assert summary["totals"]["breached"] > 0
        assert {row["key"] for row in summary["by_department"]} >= {"Public Works", "Housing"}

        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0, log.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_import_time_zone_must_match_tenant(tmp_path: Path) -> None:
    import gzip

    from tests.conftest import boston_file

    with gzip.open(boston_file(), "rt", encoding="utf-8", newline="") as source:
        header = source.readline()
    export = tmp_path / "header-only.csv"
    export.write_text(header)
    env = cli_env(tmp_path / "pgdata")

    created = civicpulse("tenant", "create", "zone-check", "--time-zone", "UTC", env=env)
    mismatch = civicpulse(
        "import",
        "boston",
        str(export),
        "--tenant",
        "zone-check",
        "--time-zone",
        "America/Chicago",
        env=env,
    )
    matching = civicpulse("import", "boston", str(export), "--tenant", "zone-check", env=env)

    assert created.returncode == 0, created.stderr
    assert mismatch.returncode == 2
    assert "reads naive times in UTC, not America/Chicago" in mismatch.stderr
    assert matching.returncode == 0, matching.stderr
    assert "rows read: 0" in matching.stderr


def test_import_detects_format_and_writes_rejects(tmp_path: Path) -> None:
    export = tmp_path / "data" / "requests.tsv"
    export.parent.mkdir()
    export.write_text(
        "service_request_id\tstatus\tservice_name\trequested_datetime\tupdated_datetime\n"
        "101\tclosed\tPothole\t2019-11-14T00:21:08-05:00\t2019-11-15T09:00:00-05:00\n"
        "102\topen\tGraffiti\tlast week\t\n"
        "\topen\tGraffiti\t2019-11-14T00:21:08-05:00\t\n"
    )
    env = cli_env(tmp_path / "pgdata")

    first = civicpulse("import", str(export), "--tenant", "metro", "--no-project", env=env)
    again = civicpulse("import", str(export), "--tenant", "metro", "--no-project", env=env)
    no_tenant = civicpulse("import", str(export), env=env)
    twice = civicpulse("import", "nyc", str(export), "--format", "la", env=env)

    assert first.returncode == 0, first.stderr
    assert "format: open311, rows read: 3" in first.stderr
    assert "events appended: 2" in first.stderr
    assert "rejected: 2" in first.stderr
    rejects = export.with_name("requests.tsv.rejects.csv")
    assert rejects.read_text().splitlines() == [
        "row_number,reason",
        "3,invalid requested_datetime 'last week': expected an ISO 8601 time such as "
        "2015-01-31T14:05:00 (with or without an offset) or MM/DD/YYYY hh:mm:ss AM",
        "4,missing service_request_id",
    ]
    assert again.returncode == 0, again.stderr
    assert "events appended: 0, already present: 2" in again.stderr
    assert no_tenant.returncode == 2
    assert "missing --tenant" in no_tenant.stderr
    assert twice.returncode == 2
    assert "named twice, as nyc and --format la" in twice.stderr


@pytest.mark.slow
def test_keys_issued_listed_and_revoked(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "pgdata")
    assert civicpulse("tenant", "create", "shelbyville", env=env).returncode == 0

    issued = civicpulse(
        "key",
        "issue",
        "--tenant",
        "shelbyville",
        "--role",
        "officer",
        "--name",
        "auditor",
        env=env,
    )
    bad_role = civicpulse(
        "key", "issue", "--tenant", "shelbyville", "--role", "mayor", "--name", "x", env=env
    )
    no_tenant = civicpulse(
        "key", "issue", "--tenant", "ogdenville", "--role", "staff", "--name", "x", env=env
    )
    token = issued.stdout.strip()
    key_id = str(uuid.UUID(hex=token.split("_")[1]))
    listed = civicpulse("key", "list", "--tenant", "shelbyville", env=env)
    revoked = civicpulse(
        "key", "revoke", "--tenant", "shelbyville", key_id, "--reason", "left", env=env
    )
    listed_after = civicpulse("key", "list", "--tenant", "shelbyville", env=env)

    assert issued.returncode == 0, issued.stderr
    assert token.startswith("cpk_")
    assert "shown only now" in issued.stderr
    assert bad_role.returncode == 2
    assert "unknown role 'mayor'" in bad_role.stderr
    assert no_tenant.returncode == 2
    assert "ogdenville" in no_tenant.stderr
    assert key_id in listed.stdout
    assert "officer" in listed.stdout
    assert token.split("_", 2)[2] not in listed.stdout
    assert revoked.returncode == 0, revoked.stderr
    assert f"key {key_id} revoked" in revoked.stderr
    assert listed_after.stdout.count(key_id) == 1
    assert listed_after.stdout != listed.stdout


def test_reporter_erase(fresh_database: Database, fresh_store: PostgresEventStore) -> None:
    tenant = "erase-town"
    create_tenant(
        fresh_store,
        tenant,
        name=tenant,
        time_zone="UTC",
        occurred_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    commands = IncidentCommands(fresh_store)
    incident = commands.submit(
        tenant,
        {"description": "Broken gate"},
        actor=Actor("resident", "reporter"),
        reporter={"name": "Ines", "email": "ines@example.org"},
    ).incident_id
    reporter_id = str(commands.load(tenant, incident).reporter_id)
    env = {**os.environ, "DATABASE_URL": fresh_database.owner_conninfo}
    env["CIVICPULSE_LOG_LEVEL"] = "WARNING"

    erased = civicpulse(
        "reporter", "erase", "--tenant", tenant, reporter_id, "--reason", "request 12", env=env
    )
    again = civicpulse(
        "reporter", "erase", "--tenant", tenant, reporter_id, "--reason", "request 13", env=env
    )
    unknown = civicpulse(
        "reporter",
        "erase",
        "--tenant",
        tenant,
        str(uuid.uuid4()),
        "--reason",
        "request 14",
        env=env,
    )
    malformed = civicpulse(
        "reporter", "erase", "--tenant", tenant, "not-a-uuid", "--reason", "x", env=env
    )
    no_reason = civicpulse(
        "reporter", "erase", "--tenant", tenant, reporter_id, "--reason", " ", env=env
    )
    details = commands.contact_details(tenant, incident)

    assert erased.returncode == 0, erased.stderr
    assert f"erased reporter {reporter_id} of tenant {tenant}" in erased.stderr
    assert "ReporterErased recorded at position" in erased.stderr
    assert again.returncode == 0, again.stderr
    assert "was already erased at" in again.stderr
    assert "(reason: request 12)" in again.stderr
    assert unknown.returncode == 2
    assert "not found in tenant 'erase-town'" in unknown.stderr
    assert malformed.returncode == 2
    assert "invalid reporter id 'not-a-uuid'" in malformed.stderr
    assert no_reason.returncode == 2
    assert "missing erasure reason" in no_reason.stderr
    assert details is not None
    assert details.erased


def test_unreachable_database_is_one_line(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "pgdata")
    env["CIVICPULSE_APP_DATABASE_URL"] = "postgresql://civicpulse_app@127.0.0.1:1/civicpulse"
    result = civicpulse("sla", "summary", "--tenant", "demo", env=env)

    assert result.returncode == 2
    assert "cannot connect to the database" in result.stderr
    assert "Traceback" not in result.stderr


# Seals and verification, against a database of the test's own on the test server -------


def database_env(database: Database, **settings: str) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": database.owner_conninfo,
        "CIVICPULSE_LOG_LEVEL": "WARNING",
        **settings,
    }


@pytest.fixture
def acme(fresh_database: Database, fresh_store: PostgresEventStore) -> list[str]:
    """Tenant acme with four incidents of three events each, all below the horizon."""
    create_tenant(fresh_store, "acme", name="Acme", time_zone="UTC", occurred_at=T0)
    streams = add_incidents(fresh_store, "acme", 4)
    wait_for_horizon(fresh_database, "acme")
    return streams


def test_seal_then_verify_prints_ok(fresh_database: Database, acme: list[str]) -> None:
    env = database_env(fresh_database)

    sealed = civicpulse("seal", env=env)
    again = civicpulse("seal", "--tenant", "acme", env=env)
    checked = civicpulse("verify", env=env)
    one_tenant = civicpulse("verify", "--tenant", "acme", env=env)

    assert sealed.returncode == 0, sealed.stderr
    assert "sealed tenant acme: 13 events through position" in sealed.stdout
    assert again.returncode == 0, again.stderr
    assert "tenant acme: no new events to seal" in again.stdout
    assert checked.returncode == 0, checked.stderr
    assert "tenant acme: events 14, streams 6, seals 1 covering 13 events" in checked.stdout
    assert "OK: verified tenants 1, events 14, streams 6, seals 1" in checked.stdout
    assert one_tenant.returncode == 0, one_tenant.stderr
    assert "OK: verified tenants 1" in one_tenant.stdout


def test_verify_prints_tampered_event(fresh_database: Database, acme: list[str]) -> None:
    env = database_env(fresh_database)
    assert civicpulse("seal", env=env).returncode == 0
    target = stream_event(fresh_database, acme[1], 2)
    changed = tamper(
        fresh_database,
        """UPDATE events SET payload = '{"note": "forged"}' WHERE position = %s""",
        (target.position,),
    )

    checked = civicpulse("verify", env=env)

    assert changed == 1
    assert checked.returncode == 1, checked.stderr
    assert checked.stdout.startswith(
        f"MISMATCH: content hash mismatch at tenant acme, stream {acme[1]}, version 2, "
        f"position {target.position}, event {target.event_id}: "
    )
    assert "OK" not in checked.stdout


def test_seal_and_verify_reject_unknown_tenant(fresh_database: Database, acme: list[str]) -> None:
    env = database_env(fresh_database)

    for command in ("seal", "verify"):
        result = civicpulse(command, "--tenant", "nowhere", env=env)

        assert result.returncode == 2, command
        assert "tenant 'nowhere' not found" in result.stderr, command


@pytest.mark.slow
def test_run_seals_in_its_scheduler(
    fresh_database: Database, acme: list[str], tmp_path: Path
) -> None:
    env = database_env(fresh_database, CIVICPULSE_SEAL_INTERVAL_SECONDS="1")
    log = tmp_path / "run.log"
    with log.open("wb") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "run", "--no-demo", "--port", str(free_port())],
            env=env,
            stdout=output,
            stderr=output,
        )
    try:
        deadline = time.monotonic() + 60
        while not stored_seals(fresh_database, "acme") and time.monotonic() < deadline:
            time.sleep(0.2)
        seals = stored_seals(fresh_database, "acme")

        assert len(seals) == 1, log.read_text()
        assert seals[0].metadata["actor"] == "scheduler"
        assert seals[0].metadata["process"].endswith(f":{server.pid}")

        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0, log.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
