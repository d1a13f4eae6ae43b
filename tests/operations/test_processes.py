"""The service's processes under signals: SIGTERM during load, two copies of each, SIGKILL.

Each process runs as a user would run it (`civicpulse serve`, `project` or `schedule` in a
subprocess), connected as its own role only (no owner password), against a test database.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from ledger.commands import Actor, IncidentCommands
from ledger.database import Database
from ledger.keys import Role, issue_key
from ledger.lifecycle import REPORT_CLASSIFIED
from ledger.store import Checkpoint, PostgresEventStore, read_after
from ledger.tenants import configure_categories, create_tenant
from ledger.verification import verify
from projections.runtime import default_projections
from tests.ledger.classification.fake_llm import completion, scripted_server

EXIT_SECONDS = 10


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Processes:
    """Starts CivicPulse commands against one database and stops whatever is left."""

    def __init__(self, database: Database, log_dir: Path) -> None:
        self.env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
        self.env.update(
            {
                "CIVICPULSE_APP_DATABASE_URL": database.app_conninfo,
                "CIVICPULSE_WORKER_DATABASE_URL": database.worker_conninfo,
                "CIVICPULSE_PROJECTOR_POLL_SECONDS": "0.2",
                "CIVICPULSE_SEAL_INTERVAL_SECONDS": "1",
                "CIVICPULSE_LOG_LEVEL": "INFO",
            }
        )
        self.log_dir = log_dir
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = self.log_dir / f"{name}.log"
        with log.open("ab") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "api.cli", *args],
                env=self.env,
                stdout=output,
                stderr=output,
            )
        self.started.append(process)
        return process

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture
def processes(fresh_database: Database, tmp_path: Path) -> Iterator[Processes]:
    running = Processes(fresh_database, tmp_path)
    yield running
    running.stop_all()


def terminate(process: subprocess.Popen[bytes]) -> tuple[int, float]:
    """Send SIGTERM; return the exit code and the seconds it took to exit."""
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code = process.wait(EXIT_SECONDS + 5)
    return code, time.monotonic() - started


def wait_until(condition: Any, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.1)
    raise AssertionError(message)


def healthy(base: str) -> bool:
    with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
        return bool(response.status == 200)


class Reporters:
    """Client threads that submit reports, each with its own Idempotency-Key, and retry
    on refused connections and 5xx until the API acknowledges the report."""

    def __init__(self, base: str, tenant: str, token: str, threads: int = 4) -> None:
        self.url = f"{base}/tenants/{tenant}/incidents"
        self.token = token
        self.stop = threading.Event()
        self.acknowledged: dict[str, set[str]] = {}
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(n,)) for n in range(threads)]

    def __enter__(self) -> Reporters:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def _run(self, number: int) -> None:
        sent = 0
        while not self.stop.is_set():
            key = f"load-{number}-{sent}"
            body = json.dumps({"description": f"Report {key}"}).encode()
            deadline = time.monotonic() + 45
            while time.monotonic() < deadline:
                request = urllib.request.Request(
                    self.url,
                    data=body,
                    method="POST",
                    headers={
                        "Authorization": f"Bearer {self.token}",
                        "Content-Type": "application/json",
                        "Idempotency-Key": key,
                    },
                )
                try:
                    with urllib.request.urlopen(request, timeout=10) as response:
                        incident = json.loads(response.read())["incident_id"]
                    with self.lock:
                        self.acknowledged.setdefault(key, set()).add(incident)
                    break
                except urllib.error.HTTPError as error:
                    error.close()
                    if error.code < 500:
                        raise
                except (OSError, urllib.error.URLError):
                    pass
                time.sleep(0.05)
            sent += 1


def stored_reports(database: Database, tenant: str) -> dict[str, list[str]]:
    """Map each idempotency key to the incidents whose ReportSubmitted event carries it."""
    with database.connect_owner() as conn:
        rows = conn.execute(
            """
            SELECT metadata->>'idempotency_key', payload->>'incident_id' FROM events
            WHERE tenant_id = %s AND event_type = 'ReportSubmitted'
            """,
            (tenant,),
        ).fetchall()
    stored: dict[str, list[str]] = {}
    for key, incident in rows:
        stored.setdefault(key, []).append(incident)
    return stored


def read_models_match_a_fresh_fold(database: Database) -> bool:
    with database.connect_worker() as conn:
        events = read_after(conn, Checkpoint(), 10_000_000)
        return all(
            projection.read_all(conn) == projection.fold(events)  # type: ignore[attr-defined]
            for projection in default_projections()
        )


def seals_verify(database: Database) -> tuple[bool, int]:
    """Verify every chain and seal; return whether all match and how many seals there are.

    Two schedulers sealing the same range would show as a seal that does not start where the
    previous one ended.
    """
    result = verify(database)
    assert result.ok, [str(item) for item in result.mismatches]
    return result.ok, result.seals


def new_tenant(store: PostgresEventStore) -> tuple[str, str]:
    tenant = f"ops-{uuid.uuid4().hex[:8]}"
    create_tenant(store, tenant, name="Ops", time_zone="UTC", occurred_at=datetime.now(UTC))
    _, token = issue_key(store, tenant, role=Role.STAFF, name="load", issued_by="test")
    return tenant, token


@pytest.mark.slow
def test_sigterm_during_load_loses_nothing(
    fresh_database: Database, fresh_store: PostgresEventStore, processes: Processes
) -> None:
    tenant, token = new_tenant(fresh_store)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve = ["serve", "--port", str(port)]
    api = processes.start("api", *serve)
    projector = processes.start("projector", "project")
    scheduler = processes.start("scheduler", "schedule")
    wait_until(lambda: healthy(base), 60, "the API did not start")
    exits: dict[str, tuple[int, float]] = {}

    with Reporters(base, tenant, token) as reporters:
        time.sleep(2)
        exits["projector"] = terminate(projector)
        projector = processes.start("projector-2", "project")
        time.sleep(1)
        exits["scheduler"] = terminate(scheduler)
        scheduler = processes.start("scheduler-2", "schedule")
        time.sleep(1)
        exits["api"] = terminate(api)
        api = processes.start("api-2", *serve)
        wait_until(lambda: healthy(base), 60, "the restarted API did not start")
        time.sleep(2)

    exits["api-2"] = terminate(api)
    time.sleep(2)  # a seal run after the last report
    exits["scheduler-2"] = terminate(scheduler)
    wait_until(
        lambda: read_models_match_a_fresh_fold(fresh_database),
        60,
        "the projector did not catch up",
    )
    exits["projector-2"] = terminate(projector)

    for name, (code, seconds) in exits.items():
        assert code == 0, (name, processes.log(name))
        assert seconds < EXIT_SECONDS, (name, seconds)
    stored = stored_reports(fresh_database, tenant)
    assert reporters.acknowledged, "no report was acknowledged"
    for key, incidents in reporters.acknowledged.items():
        assert len(incidents) == 1, (key, incidents)  # retries got the first result
        assert stored.get(key) == list(incidents), key  # stored exactly once
    assert all(len(incidents) == 1 for incidents in stored.values())
    assert read_models_match_a_fresh_fold(fresh_database)
    ok, seals = seals_verify(fresh_database)
    assert ok
    assert seals >= 2


@pytest.mark.slow
def test_second_copies_take_over_after_sigkill(
    fresh_database: Database, fresh_store: PostgresEventStore, processes: Processes
) -> None:
    tenant, token = new_tenant(fresh_store)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    processes.start("api", "serve", "--port", str(port))
    first = processes.start("projector-1", "project")
    first_scheduler = processes.start("scheduler-1", "schedule")
    wait_until(lambda: healthy(base), 60, "the API did not start")
    wait_until(
        lambda: "scheduler is active: it acquired" in processes.log("scheduler-1"),
        30,
        "the first scheduler did not become active",
    )
    time.sleep(1)  # the first projector takes both projections
    second = processes.start("projector-2", "project")
    second_scheduler = processes.start("scheduler-2", "schedule")

    with Reporters(base, tenant, token, threads=2):
        time.sleep(3)
        assert "scheduler is active: it acquired" not in processes.log("scheduler-2")
        _, seals_before = seals_verify(fresh_database)
        first.send_signal(signal.SIGKILL)
        first_scheduler.send_signal(signal.SIGKILL)
        first.wait(5)
        first_scheduler.wait(5)
        killed_at = time.monotonic()
        time.sleep(1)
    wait_until(
        lambda: read_models_match_a_fresh_fold(fresh_database),
        10,
        "the second projector did not take over within 10 s",
    )
    projector_took = time.monotonic() - killed_at
    wait_until(
        lambda: seals_verify(fresh_database)[1] > seals_before,
        10,
        "the second scheduler did not seal within 10 s",
    )
    scheduler_took = time.monotonic() - killed_at

    assert second.poll() is None, processes.log("projector-2")
    assert projector_took < 10 + 1
    assert scheduler_took < 10 + 1
    assert "owns its projection" in processes.log("projector-2")
    assert "scheduler is active: it acquired" in processes.log("scheduler-2")
    for process in (second, second_scheduler):
        code, _ = terminate(process)
        assert code == 0


def test_projector_runs_classifier_pool(
    processes: Processes, fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    tenant = "classified-city"
    create_tenant(fresh_store, tenant, name="C", time_zone="UTC", occurred_at=at)
    categories = {"categories": [{"name": "Pothole"}, {"name": "Streetlight"}]}
    configure_categories(fresh_store, tenant, categories, occurred_at=at)
    commands = IncidentCommands(fresh_store)
    report = {"title": "Dark lamp", "description": "The streetlight is out"}
    incident = commands.submit(tenant, report, actor=Actor("t", "staff")).incident_id
    answer = {
        "category": "Streetlight",
        "severity": "low",
        "fields": {"location_text": None, "asset": None, "hazards": []},
        "summary": "Streetlight out",
        "language": "en",
        "confidence": 0.8,
    }

    with scripted_server([completion(json.dumps(answer))]) as server:
        processes.env.update(
            {"CIVICPULSE_LLM_BASE_URL": server.base_url, "CIVICPULSE_LLM_MODEL": "test-model"}
        )
        project = processes.start("project", "project", "--classify")
        deadline = time.monotonic() + 60
        recorded: list[str] = []
        while time.monotonic() < deadline and not recorded:
            events = fresh_store.read_stream(tenant, f"incident-{incident}")
            recorded = [e.event_type for e in events if e.event_type == REPORT_CLASSIFIED]
            time.sleep(0.2)
        project.send_signal(signal.SIGTERM)
        project.wait(30)

    assert recorded == [REPORT_CLASSIFIED], processes.log("project")
    assert len(server.requests) == 1
    assert "classifier pool started: llm classifier" in processes.log("project")
