from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ledger.commands import Actor, IncidentCommands
from ledger.config_sections import apply_config
from ledger.database import Database
from ledger.escalations import escalate
from ledger.ids import incident_stream_id
from ledger.lifecycle import SLA_BREACHED, SLA_WARNING_REACHED
from ledger.scheduler import Scheduler, escalation_job
from ledger.store import PostgresEventStore
from tests.conftest import project_everything

T0 = datetime(2026, 1, 5, 9, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
STAFF = Actor("clerk", "staff")
POLICIES = {
    "sla_policies": [
        {
            "id": "hour",
            "first_response": "20 calendar minutes",
            "resolution": "1 calendar hours",
            "warning_percent": 50,
            "on_reopen": "restart",
        }
    ]
}


@pytest.fixture
def database(fresh_database: Database) -> Database:
    """Return a database of the test's own. The job escalates the incidents of every
    tenant, and the shared database contains thousands from other tests."""
    return fresh_database


@pytest.fixture
def store(fresh_store: PostgresEventStore) -> PostgresEventStore:
    return fresh_store


def escalations(store: PostgresEventStore, tenant: str, incident: uuid.UUID) -> list[Any]:
    return [
        (event.event_type, event.payload["target"], event.payload["clock"])
        for event in store.read_stream(tenant, incident_stream_id(incident))
        if event.event_type in (SLA_WARNING_REACHED, SLA_BREACHED)
    ]


def reported(store: PostgresEventStore, tenant: str, at: datetime = T0) -> uuid.UUID:
    apply_config(store, tenant, POLICIES, occurred_at=at - MINUTE)
    commands = IncidentCommands(store, clock=lambda: at)
    return commands.submit(tenant, {"description": "Flooded corridor"}, actor=STAFF).incident_id


def test_escalates_once_when_times_pass(
    database: Database, store: PostgresEventStore, tenant_id: str
) -> None:
    incident = reported(store, tenant_id)
    project_everything(database)

    escalate(database, T0 + 9 * MINUTE)
    assert escalations(store, tenant_id, incident) == []

    escalate(database, T0 + 11 * MINUTE)
    assert escalations(store, tenant_id, incident) == [(SLA_WARNING_REACHED, "first_response", 1)]

    escalate(database, T0 + 61 * MINUTE)
    project_everything(database)
    escalate(database, T0 + 90 * MINUTE)
    stored = escalations(store, tenant_id, incident)

    assert sorted(stored) == sorted(
        [
            (SLA_WARNING_REACHED, "first_response", 1),
            (SLA_BREACHED, "first_response", 1),
            (SLA_WARNING_REACHED, "resolution", 1),
            (SLA_BREACHED, "resolution", 1),
        ]
    )
    events = store.read_stream(tenant_id, incident_stream_id(incident))
    breach = next(
        e for e in events if e.event_type == SLA_BREACHED and e.payload["target"] == "resolution"
    )
    # The valid time is when the clock crossed the due time, not when the job ran.
    assert breach.occurred_at == T0 + 60 * MINUTE
    assert breach.metadata["actor"] == "scheduler"


def test_concurrent_runs_append_once(
    database: Database, store: PostgresEventStore, tenant_id: str
) -> None:
    incident = reported(store, tenant_id)
    project_everything(database)
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            barrier.wait()
            escalate(database, T0 + 2 * 60 * MINUTE)
        except BaseException as error:  # noqa: BLE001 (reported by the assert below)
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert errors == []
    assert len(escalations(store, tenant_id, incident)) == 4
    assert len(set(escalations(store, tenant_id, incident))) == 4


def test_two_schedulers_escalate_once(
    database: Database, store: PostgresEventStore, tenant_id: str
) -> None:
    incident = reported(store, tenant_id)
    project_everything(database)
    clock = lambda: T0 + 2 * 60 * MINUTE  # noqa: E731
    schedulers = [
        Scheduler(database, [escalation_job(database, 0.2, clock)], lock_retry_seconds=0.1)
        for _ in range(2)
    ]
    threads = [threading.Thread(target=item.run_forever) for item in schedulers]
    for thread in threads:
        thread.start()
    try:
        waiting = threading.Event()
        for _ in range(100):
            if len(escalations(store, tenant_id, incident)) == 4:
                break
            waiting.wait(0.1)
        # Several more job runs: any of them could append a duplicate.
        waiting.wait(1.0)
    finally:
        for item in schedulers:
            item.stop()
        for thread in threads:
            thread.join(30)

    assert sum(item.active.is_set() for item in schedulers) == 0
    assert len(escalations(store, tenant_id, incident)) == 4


def test_restarted_clock_escalates_again(
    database: Database, store: PostgresEventStore, tenant_id: str
) -> None:
    incident = reported(store, tenant_id)
    project_everything(database)
    escalate(database, T0 + 2 * 60 * MINUTE)
    later = T0 + 3 * 60 * MINUTE
    commands = IncidentCommands(store, clock=lambda: later)
    commands.execute(tenant_id, incident, "resolve", {}, actor=STAFF, expected_version=None)
    reopen = IncidentCommands(store, clock=lambda: later + MINUTE)
    reopen.execute(
        tenant_id, incident, "reopen", {"reason": "still wet"}, actor=STAFF, expected_version=None
    )
    project_everything(database)
    escalate(database, later + 2 * 60 * MINUTE)
    stored = escalations(store, tenant_id, incident)

    assert (SLA_BREACHED, "resolution", 2) in stored
    assert (SLA_WARNING_REACHED, "resolution", 2) in stored
    assert len(stored) == 6


def test_paused_incident_not_escalated(
    database: Database, store: PostgresEventStore, tenant_id: str
) -> None:
    incident = reported(store, tenant_id)
    waiting = IncidentCommands(store, clock=lambda: T0 + 5 * MINUTE)
    waiting.execute(
        tenant_id,
        incident,
        "request-information",
        {"question": "Which floor?"},
        actor=STAFF,
        expected_version=None,
    )
    project_everything(database)
    escalate(database, T0 + 10 * 60 * MINUTE)

    assert escalations(store, tenant_id, incident) == []


def test_one_run_pages_through_all(
    database: Database, store: PostgresEventStore, tenant_id: str
) -> None:
    apply_config(store, tenant_id, POLICIES, occurred_at=T0 - MINUTE)
    commands = IncidentCommands(store, clock=lambda: T0)
    incidents = [
        commands.submit(tenant_id, {"description": f"Leak {number}"}, actor=STAFF).incident_id
        for number in range(5)
    ]
    project_everything(database)
    escalate(database, T0 + 2 * 60 * MINUTE, batch_size=2)

    for incident in incidents:
        assert len(escalations(store, tenant_id, incident)) == 4, incident
