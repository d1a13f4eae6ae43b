from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from ledger import lifecycle as lc
from ledger.config_sections import CATEGORIES_CONFIGURED, ROUTING_CONFIGURED
from projections.sla import (
    SlaState,
    first_response_breached,
    resolution_breached,
    resolution_warning_reached,
    sla_projection,
)
from tests.projections.sla_log import Log

NY = ZoneInfo("America/New_York")
# Monday 2026-06-01, 15:00 in New York.
MONDAY_3PM = datetime(2026, 6, 1, 15, tzinfo=NY)
HOUR = timedelta(hours=1)

STANDARD = {
    "id": "standard",
    "calendar": "office",
    "first_response": "2 business hours",
    "resolution": "8 business hours",
    "warning_percent": 75,
}
URGENT = {
    "id": "urgent",
    "match": {"severities": ["critical"]},
    "first_response": "30 calendar minutes",
    "resolution": "4 calendar hours",
    "on_reopen": "restart",
}


def fold_one(log: Log, incident: str) -> SlaState:
    return sla_projection().fold(log.events)[(log.tenant_id, uuid.UUID(incident))]


def office_log() -> Log:
    log = Log()
    log.create_tenant(MONDAY_3PM - 30 * 24 * HOUR)
    log.policies(MONDAY_3PM - 29 * 24 * HOUR, URGENT, STANDARD)
    return log


def test_business_hours_due_times() -> None:
    log = office_log()
    incident = log.submit(MONDAY_3PM)
    state = fold_one(log, incident)

    assert state.policy_id == "standard"
    assert state.policy_version == 3
    # 2 business hours from Monday 15:00 end at 17:00; 8 end on Tuesday at 15:00.
    assert state.first_response_due_at == MONDAY_3PM + 2 * HOUR
    assert state.resolution_due_at == MONDAY_3PM + 24 * HOUR
    # 75 % of 8 business hours: 6 hours, so Tuesday at 13:00.
    assert state.resolution_warning_at == MONDAY_3PM + 22 * HOUR


def test_first_matching_policy_wins() -> None:
    log = office_log()
    incident = log.submit(MONDAY_3PM, severity="critical")
    state = fold_one(log, incident)

    assert state.policy_id == "urgent"
    assert state.resolution_due_at == MONDAY_3PM + 4 * HOUR
    assert state.first_response_due_at == MONDAY_3PM + timedelta(minutes=30)


def test_classification_reassesses_policy() -> None:
    log = office_log()
    incident = log.submit(MONDAY_3PM)
    log.incident(incident, lc.REPORT_CLASSIFIED, MONDAY_3PM + HOUR / 60, severity="critical")
    state = fold_one(log, incident)

    assert state.severity == "critical"
    assert state.policy_id == "urgent"
    # The clock still starts at submission.
    assert state.resolution_due_at == MONDAY_3PM + 4 * HOUR


def test_same_policy_keeps_pinned_version() -> None:
    log = office_log()
    incident = log.submit(MONDAY_3PM)
    log.policies(MONDAY_3PM + HOUR, URGENT, {**STANDARD, "resolution": "3 business days"})
    log.incident(incident, lc.REPORT_CLASSIFIED, MONDAY_3PM + 2 * HOUR, severity="low")
    state = fold_one(log, incident)

    assert state.severity == "low"
    assert state.policy_id == "standard"
    assert state.policy_version == 3
    assert state.resolution_due_at == MONDAY_3PM + 24 * HOUR


def test_reassessment_keeps_missed_deadlines() -> None:
    log = office_log()
    incident = log.submit(MONDAY_3PM, severity="critical")
    relaxed = {**URGENT, "first_response": "3 calendar hours", "resolution": "3 calendar days"}
    log.policies(MONDAY_3PM + HOUR, relaxed, STANDARD)
    # The urgent targets (30 minutes, 4 hours) are both missed when staff lower the
    # severity five hours in; the standard policy would give Tuesday 15:00.
    log.incident(incident, lc.CLASSIFICATION_CORRECTED, MONDAY_3PM + 5 * HOUR, severity="medium")
    state = fold_one(log, incident)

    assert state.policy_id == "standard"
    assert state.policy_version == 5
    assert state.first_response_due_at == MONDAY_3PM + timedelta(minutes=30)
    assert state.resolution_due_at == MONDAY_3PM + 4 * HOUR
    assert first_response_breached(state, MONDAY_3PM + 6 * HOUR)
    assert resolution_breached(state, MONDAY_3PM + 6 * HOUR)


def test_reassessment_moves_open_deadlines() -> None:
    log = office_log()
    incident = log.submit(MONDAY_3PM, severity="critical")
    log.incident(incident, lc.INCIDENT_ACKNOWLEDGED, MONDAY_3PM + HOUR / 6)
    log.incident(incident, lc.CLASSIFICATION_CORRECTED, MONDAY_3PM + 2 * HOUR, severity="low")
    state = fold_one(log, incident)

    assert state.policy_id == "standard"
    # Acknowledged within 30 minutes under the urgent policy, so that target stays met.
    assert state.first_response_due_at == MONDAY_3PM + timedelta(minutes=30)
    assert not first_response_breached(state, MONDAY_3PM + 6 * HOUR)
    # The resolution target was still ahead, so the standard one replaces it.
    assert state.resolution_due_at == MONDAY_3PM + 24 * HOUR
    assert not resolution_breached(state, MONDAY_3PM + 6 * HOUR)


def test_resolved_incident_keeps_its_verdict() -> None:
    log = office_log()
    incident = log.submit(MONDAY_3PM)
    log.incident(incident, lc.INCIDENT_RESOLVED, MONDAY_3PM + 5 * HOUR)
    log.incident(incident, lc.REPORT_CLASSIFIED, MONDAY_3PM + 30 * HOUR, severity="critical")
    state = fold_one(log, incident)

    assert state.severity == "critical"
    assert state.policy_id == "standard"
    assert state.resolution_due_at == MONDAY_3PM + 24 * HOUR
    assert not resolution_breached(state, MONDAY_3PM + 40 * HOUR)


def test_staff_correction_wins_over_classifier() -> None:
    log = office_log()
    incident = log.submit(MONDAY_3PM)
    log.incident(incident, lc.CLASSIFICATION_CORRECTED, MONDAY_3PM + HOUR, severity="critical")
    log.incident(incident, lc.REPORT_CLASSIFIED, MONDAY_3PM + 2 * HOUR, severity="low")
    state = fold_one(log, incident)

    assert state.severity == "critical"
    assert state.category_source == "staff"
    assert state.policy_id == "urgent"


def test_keep_policy_ignores_category_change() -> None:
    log = office_log()
    log.policies(MONDAY_3PM - HOUR, URGENT, {**STANDARD, "on_category_change": "keep"})
    incident = log.submit(MONDAY_3PM)
    log.incident(incident, lc.REPORT_CLASSIFIED, MONDAY_3PM + HOUR, severity="critical")
    state = fold_one(log, incident)

    assert state.severity == "critical"
    assert state.policy_id == "standard"
    assert state.resolution_due_at == MONDAY_3PM + 24 * HOUR


def test_policy_change_never_rewrites_past() -> None:
    log = office_log()
    before = log.submit(MONDAY_3PM)
    log.policies(MONDAY_3PM + HOUR, {**STANDARD, "resolution": "1 business days"})
    after = log.submit(MONDAY_3PM + 2 * HOUR)
    states = sla_projection().fold(log.events)

    old = states[(log.tenant_id, uuid.UUID(before))]
    new = states[(log.tenant_id, uuid.UUID(after))]
    assert old.policy_version == 3
    assert old.resolution_due_at == MONDAY_3PM + 24 * HOUR
    assert new.policy_version == 5
    # One business day is 8 business hours. Nothing is left of Monday at 17:00, so the
    # target is Tuesday 17:00.
    assert new.resolution_due_at == MONDAY_3PM + 26 * HOUR


def test_in_force_follows_log_order_not_valid_time() -> None:
    log = office_log()
    # A change back-dated to before the report, appended after it, does not apply to it.
    incident = log.submit(MONDAY_3PM)
    log.policies(MONDAY_3PM - 10 * 24 * HOUR, {**STANDARD, "resolution": "1 business hours"})
    state = fold_one(log, incident)

    assert state.policy_version == 3
    assert state.resolution_due_at == MONDAY_3PM + 24 * HOUR


def test_pause_moves_business_due_time() -> None:
    log = office_log()
    incident = log.submit(MONDAY_3PM)
    log.incident(incident, lc.INFORMATION_REQUESTED, MONDAY_3PM + HOUR)
    # Waiting from Monday 16:00 to Tuesday 10:00: 2 business hours paused.
    log.incident(incident, lc.REPORTER_RESPONDED, MONDAY_3PM + 19 * HOUR)
    state = fold_one(log, incident)

    assert state.paused_seconds == 18 * 3600
    assert len(state.pauses) == 1
    assert state.resolution_due_at == MONDAY_3PM + 26 * HOUR
    assert not resolution_breached(state, MONDAY_3PM + 25 * HOUR)
    assert resolution_breached(state, MONDAY_3PM + 26 * HOUR + timedelta(seconds=1))


def test_running_pause_stops_breach_and_warning() -> None:
    log = office_log()
    incident = log.submit(MONDAY_3PM)
    log.incident(incident, lc.INFORMATION_REQUESTED, MONDAY_3PM + HOUR)
    state = fold_one(log, incident)
    much_later = MONDAY_3PM + 30 * 24 * HOUR

    assert state.status == "paused"
    assert not resolution_breached(state, much_later)
    assert not resolution_warning_reached(state, much_later)


def test_reopen_resumes_clock() -> None:
    log = office_log()
    incident = log.submit(MONDAY_3PM)
    log.incident(incident, lc.INCIDENT_RESOLVED, MONDAY_3PM + HOUR)
    # Resolved from Monday 16:00 to Tuesday 11:00: 3 business hours do not count.
    log.incident(incident, lc.INCIDENT_REOPENED, MONDAY_3PM + 20 * HOUR)
    state = fold_one(log, incident)

    # 8 + 3 business hours from Monday 15:00: 2 on Monday, 8 on Tuesday, 1 on Wednesday.
    assert state.clock == 1
    assert state.resolution_due_at == datetime(2026, 6, 3, 10, tzinfo=NY)


def test_reopen_restarts_clock() -> None:
    log = office_log()
    incident = log.submit(MONDAY_3PM, severity="critical")
    log.incident(incident, lc.INCIDENT_RESOLVED, MONDAY_3PM + HOUR)
    log.incident(incident, lc.SLA_WARNING_REACHED, MONDAY_3PM + HOUR, target="resolution", clock=1)
    reopened = MONDAY_3PM + 20 * HOUR
    log.incident(incident, lc.INCIDENT_REOPENED, reopened)
    state = fold_one(log, incident)

    assert state.clock == 2
    assert state.clock_started_at == reopened
    assert state.resolution_due_at == reopened + 4 * HOUR
    assert state.escalations == ["SlaWarningReached:resolution:1"]


def test_first_response_judgement() -> None:
    log = office_log()
    incident = log.submit(MONDAY_3PM)
    log.incident(incident, lc.INCIDENT_ACKNOWLEDGED, MONDAY_3PM + 3 * HOUR)
    state = fold_one(log, incident)

    assert first_response_breached(state, MONDAY_3PM)
    assert state.first_response_at == MONDAY_3PM + 3 * HOUR


def test_report_keeps_its_own_target() -> None:
    log = office_log()
    due = MONDAY_3PM + 100 * HOUR
    incident = log.submit(MONDAY_3PM, source="boston", resolution_due_at=due.isoformat())
    state = fold_one(log, incident)

    assert state.policy_id is None
    assert state.resolution_due_at == due
    assert state.first_response_due_at is None


def test_imported_report_without_target_has_none() -> None:
    log = office_log()
    incident = log.submit(MONDAY_3PM, source="boston")
    state = fold_one(log, incident)

    assert state.policy_id is None
    assert state.resolution_due_at is None
    assert not resolution_breached(state, MONDAY_3PM + 1000 * HOUR)


def test_default_policy_without_configured_policies() -> None:
    log = Log()
    log.create_tenant(MONDAY_3PM - HOUR, resolution_hours=10)
    incident = log.submit(MONDAY_3PM)
    state = fold_one(log, incident)

    assert state.policy_id == "default"
    assert state.resolution_due_at == MONDAY_3PM + 10 * HOUR
    assert state.first_response_due_at == MONDAY_3PM + 24 * HOUR


@pytest.mark.parametrize(
    ("area", "department"),
    [("north", "Streets North"), ("south", "Public Works"), (None, "Public Works")],
)
def test_department_from_routing_or_category(area: str | None, department: str) -> None:
    log = office_log()
    log.config(
        CATEGORIES_CONFIGURED,
        MONDAY_3PM - HOUR,
        {"categories": [{"name": "Pothole", "department": "Public Works", "keywords": []}]},
    )
    log.config(
        ROUTING_CONFIGURED,
        MONDAY_3PM - HOUR,
        {
            "routes": [
                {"categories": ["Pothole"], "areas": ["north"], "department": "Streets North"}
            ]
        },
    )
    incident = log.submit(MONDAY_3PM, area=area) if area else log.submit(MONDAY_3PM)
    log.incident(incident, lc.REPORT_CLASSIFIED, MONDAY_3PM + HOUR, category="Pothole")
    state = fold_one(log, incident)

    assert state.category == "Pothole"
    assert state.department == department
    assert state.department_source == "config"


def test_assigned_department_wins_over_routing() -> None:
    log = office_log()
    log.config(
        CATEGORIES_CONFIGURED,
        MONDAY_3PM - HOUR,
        {"categories": [{"name": "Pothole", "department": "Public Works", "keywords": []}]},
    )
    incident = log.submit(MONDAY_3PM)
    log.incident(incident, lc.INCIDENT_ASSIGNED, MONDAY_3PM + HOUR, department="Parks")
    log.incident(incident, lc.REPORT_CLASSIFIED, MONDAY_3PM + 2 * HOUR, category="Pothole")
    state = fold_one(log, incident)

    assert state.department == "Parks"
