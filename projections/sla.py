"""The SLA read model: due times, pauses, response and resolution times per incident.

Whether an incident is breached depends on the clock, so the fold stores only facts and
`resolution_breached` (and its SQL twin) judge them against a time passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from ledger import lifecycle as lc
from ledger.events import RecordedEvent
from projections.base import IncidentRowProjection

OPEN = "open"
PAUSED = "paused"
RESOLVED = "resolved"
CLOSED = "closed"
REJECTED = "rejected"
DUPLICATE = "duplicate"

# Rejected reports and duplicates are not judged against a target: the work is done (or
# counted) elsewhere.
NOT_JUDGED = (REJECTED, DUPLICATE)

_FIRST_RESPONSES = frozenset(
    {
        lc.INCIDENT_ACKNOWLEDGED,
        lc.INCIDENT_ASSIGNED,
        lc.WORK_STARTED,
        lc.INFORMATION_REQUESTED,
        lc.INCIDENT_RESOLVED,
        lc.INCIDENT_CLOSED,
        lc.INCIDENT_REJECTED,
        lc.INCIDENT_MARKED_DUPLICATE,
    }
)


@dataclass(frozen=True, slots=True)
class SlaState:
    """SLA facts of one incident. Times are valid times (when things happened)."""

    incident_id: UUID
    category: str | None
    department: str | None
    status: str
    submitted_at: datetime
    first_response_due_at: datetime | None
    first_response_at: datetime | None
    resolution_due_at: datetime | None
    resolved_at: datetime | None
    closed_at: datetime | None
    paused_since: datetime | None
    paused_seconds: float
    earliest_occurred_at: datetime
    latest_occurred_at: datetime


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _pause_ended(state: SlaState, at: datetime, changes: dict[str, Any]) -> None:
    """Add to `changes` what ending a running pause at `at` changes."""
    if state.paused_since is not None:
        paused = max(0.0, (at - state.paused_since).total_seconds())
        changes["paused_since"] = None
        changes["paused_seconds"] = state.paused_seconds + paused


def evolve_sla(state: SlaState | None, event: RecordedEvent) -> SlaState | None:
    """Apply one event to an incident's SLA facts."""
    kind = event.event_type
    at = event.occurred_at
    if kind == lc.REPORT_SUBMITTED:
        payload = event.payload
        return SlaState(
            incident_id=UUID(payload["incident_id"]),
            category=payload.get("category"),
            department=payload.get("department"),
            status=OPEN,
            submitted_at=at,
            first_response_due_at=_parse_time(payload.get("first_response_due_at")),
            first_response_at=None,
            resolution_due_at=_parse_time(payload.get("resolution_due_at")),
            resolved_at=None,
            closed_at=None,
            paused_since=None,
            paused_seconds=0.0,
            earliest_occurred_at=at,
            latest_occurred_at=at,
        )
    if state is None:
        return None

    # Changes are collected and applied with one replace: replace() on a frozen dataclass
    # is the most expensive step of a rebuild.
    changes: dict[str, Any] = {}
    if at < state.earliest_occurred_at:
        changes["earliest_occurred_at"] = at
    if at > state.latest_occurred_at:
        changes["latest_occurred_at"] = at
    if kind in _FIRST_RESPONSES and state.first_response_at is None:
        changes["first_response_at"] = at

    if kind == lc.INCIDENT_ASSIGNED:
        if event.payload.get("department"):
            changes["department"] = event.payload["department"]
    elif kind == lc.INFORMATION_REQUESTED:
        if state.paused_since is None and state.resolved_at is None:
            changes["status"] = PAUSED
            changes["paused_since"] = at
    elif kind == lc.REPORTER_RESPONDED:
        _pause_ended(state, at, changes)
        changes["status"] = OPEN
    elif kind == lc.INCIDENT_RESOLVED:
        _pause_ended(state, at, changes)
        changes["status"] = RESOLVED
        changes["resolved_at"] = at
    elif kind == lc.INCIDENT_CLOSED:
        _pause_ended(state, at, changes)
        changes["status"] = CLOSED
        changes["resolved_at"] = state.resolved_at or at
        changes["closed_at"] = at
    elif kind == lc.INCIDENT_REOPENED:
        # The clock resumes where it stopped: time spent resolved does not count.
        stopped = state.resolved_at
        extra = max(0.0, (at - stopped).total_seconds()) if stopped else 0.0
        changes["status"] = OPEN
        changes["resolved_at"] = None
        changes["closed_at"] = None
        changes["paused_seconds"] = state.paused_seconds + extra
    elif kind in (lc.INCIDENT_REJECTED, lc.INCIDENT_MARKED_DUPLICATE):
        _pause_ended(state, at, changes)
        changes["status"] = REJECTED if kind == lc.INCIDENT_REJECTED else DUPLICATE
        changes["resolved_at"] = at
        changes["closed_at"] = at
    return replace(state, **changes) if changes else state


def effective_resolution_due(state: SlaState) -> datetime | None:
    """Return the resolution due time pushed back by the time the clock was paused."""
    if state.resolution_due_at is None:
        return None
    return state.resolution_due_at + timedelta(seconds=state.paused_seconds)


def resolution_breached(state: SlaState, now: datetime) -> bool:
    """Return True when the incident missed (or, still open, has passed) its resolution target.

    `now` is the clock value to judge open incidents against. An incident without a target
    is never breached; a paused incident is breached only if it was already late when the
    pause began.
    """
    due = effective_resolution_due(state)
    if due is None:
        return False
    if state.resolved_at is not None:
        return state.resolved_at > due
    if state.paused_since is not None:
        return state.paused_since > due
    return now > due


# The same judgement in SQL, over incident_sla columns and a %(now)s parameter. A property
# test checks that the two agree.
RESOLUTION_BREACHED_SQL = """
    CASE
        WHEN resolution_due_at IS NULL THEN false
        WHEN resolved_at IS NOT NULL
            THEN resolved_at > resolution_due_at + make_interval(secs => paused_seconds)
        WHEN paused_since IS NOT NULL
            THEN paused_since > resolution_due_at + make_interval(secs => paused_seconds)
        ELSE %(now)s > resolution_due_at + make_interval(secs => paused_seconds)
    END
"""


def sla_projection() -> IncidentRowProjection[SlaState]:
    return IncidentRowProjection("sla", "incident_sla", SlaState, evolve_sla)
