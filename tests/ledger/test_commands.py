from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ledger.commands import Actor, IncidentCommands
from ledger.errors import (
    CommandInvalid,
    CommandRejected,
    ConcurrencyError,
    IdempotencyKeyReused,
    IncidentNotFound,
    TenantNotFound,
)
from ledger.lifecycle import COMMANDS
from ledger.store import PostgresEventStore

STAFF = Actor("m.chen", "staff")
RESIDENT = Actor("resident", "reporter", "web")
REPORT = {"description": "Streetlight out at Elm and 3rd", "category": "Streetlight outage"}

ARGS: dict[str, dict[str, Any]] = {
    "acknowledge": {},
    "assign": {"assignee": "crew-7", "department": "Public Works"},
    "start-work": {},
    "request-information": {"question": "Which pole?"},
    "reporter-responded": {"response": "The one by the bakery"},
    "resolve": {"note": "Bulb replaced"},
    "reopen": {"reason": "Out again"},
    "close": {},
    "reject": {"reason": "Private lot", "redirect_to": "the property manager"},
}

# Paths from a new report to each status.
PATHS: dict[str, list[str]] = {
    "submitted": [],
    "acknowledged": ["acknowledge"],
    "assigned": ["assign"],
    "in_progress": ["start-work"],
    "waiting_on_reporter": ["request-information"],
    "resolved": ["resolve"],
    "closed": ["resolve", "close"],
    "reopened": ["resolve", "reopen"],
    "rejected": ["reject"],
}


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 5, 4, 8, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(minutes=1)
        return self.now


@pytest.fixture
def commands(store: PostgresEventStore) -> IncidentCommands:
    return IncidentCommands(store, clock=Clock())


def new_incident(commands: IncidentCommands, tenant_id: str, path: list[str]) -> uuid.UUID:
    incident = commands.submit(tenant_id, REPORT, actor=RESIDENT).incident_id
    for command in path:
        commands.execute(
            tenant_id, incident, command, ARGS[command], actor=STAFF, expected_version=None
        )
    return incident


@pytest.mark.parametrize("status", sorted(PATHS))
@pytest.mark.parametrize("command", sorted(ARGS))
def test_command_allowed_only_in_its_states(
    commands: IncidentCommands, tenant_id: str, status: str, command: str
) -> None:
    incident = new_incident(commands, tenant_id, PATHS[status])
    assert commands.load(tenant_id, incident).status == status
    allowed = status in COMMANDS[command][1]

    if allowed:
        result = commands.execute(
            tenant_id, incident, command, ARGS[command], actor=STAFF, expected_version=None
        )
        assert result.append.stream_version == len(PATHS[status]) + 2
    else:
        with pytest.raises(CommandRejected) as raised:
            commands.execute(
                tenant_id, incident, command, ARGS[command], actor=STAFF, expected_version=None
            )
        assert raised.value.status == status
        assert command in str(raised.value)
        assert status in str(raised.value)


def test_reporter_response_resumes_previous_status(
    commands: IncidentCommands, tenant_id: str
) -> None:
    incident = new_incident(
        commands, tenant_id, ["assign", "request-information", "reporter-responded"]
    )
    state = commands.load(tenant_id, incident)
    assert state.status == "assigned"
    assert state.assignee == "crew-7"


def test_reject_needs_reason_and_redirect(commands: IncidentCommands, tenant_id: str) -> None:
    incident = new_incident(commands, tenant_id, [])
    with pytest.raises(CommandInvalid, match="redirect_to"):
        commands.execute(
            tenant_id,
            incident,
            "reject",
            {"reason": "Not ours"},
            actor=STAFF,
            expected_version=None,
        )
    state = commands.execute(
        tenant_id,
        incident,
        "reject",
        {"reason": "Not ours", "redirect_to": "State highway department"},
        actor=STAFF,
        expected_version=None,
    )
    rejected = commands.load(tenant_id, incident)
    assert state.append.stream_version == 2
    assert rejected.redirect_to == "State highway department"
    assert rejected.rejection_reason == "Not ours"


def test_mark_duplicate_needs_existing_incident(commands: IncidentCommands, tenant_id: str) -> None:
    original = new_incident(commands, tenant_id, [])
    copy = new_incident(commands, tenant_id, [])

    with pytest.raises(CommandInvalid, match="not an incident"):
        commands.execute(
            tenant_id,
            copy,
            "mark-duplicate",
            {"duplicate_of": str(uuid.uuid4())},
            actor=STAFF,
            expected_version=None,
        )
    with pytest.raises(CommandInvalid, match="itself"):
        commands.execute(
            tenant_id,
            copy,
            "mark-duplicate",
            {"duplicate_of": str(copy)},
            actor=STAFF,
            expected_version=None,
        )
    commands.execute(
        tenant_id,
        copy,
        "mark-duplicate",
        {"duplicate_of": str(original)},
        actor=STAFF,
        expected_version=None,
    )
    state = commands.load(tenant_id, copy)
    assert state.status == "duplicate"
    assert state.duplicate_of == original


def test_stale_expected_version_conflicts(commands: IncidentCommands, tenant_id: str) -> None:
    incident = new_incident(commands, tenant_id, ["acknowledge"])
    with pytest.raises(ConcurrencyError) as raised:
        commands.execute(
            tenant_id, incident, "assign", ARGS["assign"], actor=STAFF, expected_version=1
        )
    assert raised.value.actual == 2
    assert commands.load(tenant_id, incident).status == "acknowledged"


def test_submit_with_same_key_returns_first_incident(
    commands: IncidentCommands, tenant_id: str
) -> None:
    first = commands.submit(tenant_id, REPORT, actor=RESIDENT, idempotency_key="k-1")
    again = commands.submit(tenant_id, REPORT, actor=RESIDENT, idempotency_key="k-1")

    assert again.incident_id == first.incident_id
    assert again.append.positions == first.append.positions
    assert again.append.replayed
    with pytest.raises(IdempotencyKeyReused):
        commands.submit(
            tenant_id, {**REPORT, "description": "other"}, actor=RESIDENT, idempotency_key="k-1"
        )


def test_command_retry_after_state_moved_returns_first(
    commands: IncidentCommands, tenant_id: str
) -> None:
    incident = new_incident(commands, tenant_id, [])
    first = commands.execute(
        tenant_id,
        incident,
        "acknowledge",
        {},
        actor=STAFF,
        expected_version=1,
        idempotency_key="ack-1",
    )
    commands.execute(tenant_id, incident, "start-work", {}, actor=STAFF, expected_version=2)

    again = commands.execute(
        tenant_id,
        incident,
        "acknowledge",
        {},
        actor=STAFF,
        expected_version=1,
        idempotency_key="ack-1",
    )
    assert again.append.replayed
    assert again.append.positions == first.append.positions
    assert commands.load(tenant_id, incident).version == 3


def test_unknown_tenant_and_incident(commands: IncidentCommands, tenant_id: str) -> None:
    with pytest.raises(TenantNotFound):
        commands.submit("no-such-tenant", REPORT, actor=RESIDENT)
    with pytest.raises(IncidentNotFound):
        commands.load(tenant_id, uuid.uuid4())


def test_other_tenants_incident_not_found(
    commands: IncidentCommands, tenant_id: str, store: PostgresEventStore
) -> None:
    from ledger.tenants import create_tenant

    other = f"t-{uuid.uuid4().hex[:10]}"
    create_tenant(
        store, other, name="Other", time_zone="UTC", occurred_at=datetime(2026, 1, 1, tzinfo=UTC)
    )
    incident = new_incident(commands, tenant_id, [])

    with pytest.raises(IncidentNotFound):
        commands.load(other, incident)
    with pytest.raises(IncidentNotFound):
        commands.execute(other, incident, "acknowledge", {}, actor=STAFF, expected_version=None)


def test_submit_leaves_due_times_to_policies(
    commands: IncidentCommands, tenant_id: str, store: PostgresEventStore
) -> None:
    incident = new_incident(commands, tenant_id, [])
    (event,) = store.read_stream(tenant_id, f"incident-{incident}")

    assert "resolution_due_at" not in event.payload
    assert "first_response_due_at" not in event.payload
    assert event.metadata["actor"] == "resident"
