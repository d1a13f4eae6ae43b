"""The incident lifecycle: event types, the state fold, and command decisions.

The fold is lenient: events are facts, and an imported history may skip steps (a city
export goes straight from open to closed). Commands are strict: `decide` rejects any
command that does not fit the current state.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from ledger.errors import CommandInvalid, CommandRejected
from ledger.events import JsonObject, RecordedEvent
from ledger.values import replaced

REPORT_SUBMITTED = "ReportSubmitted"
INCIDENT_ACKNOWLEDGED = "IncidentAcknowledged"
INCIDENT_ASSIGNED = "IncidentAssigned"
WORK_STARTED = "WorkStarted"
INFORMATION_REQUESTED = "InformationRequested"
REPORTER_RESPONDED = "ReporterResponded"
INCIDENT_RESOLVED = "IncidentResolved"
INCIDENT_REOPENED = "IncidentReopened"
INCIDENT_CLOSED = "IncidentClosed"
INCIDENT_REJECTED = "IncidentRejected"
INCIDENT_MARKED_DUPLICATE = "IncidentMarkedDuplicate"
REPORT_CLASSIFIED = "ReportClassified"
CLASSIFICATION_FAILED = "ClassificationFailed"
CLASSIFICATION_CORRECTED = "ClassificationCorrected"
# Staff decisions on duplicate groups, recorded in the stream of the incident acted on.
REPORTS_MERGED = "ReportsMerged"
REPORT_SPLIT_FROM_GROUP = "ReportSplitFromGroup"
# The department routing rules chose for a classified report; the status does not change.
INCIDENT_ROUTED = "IncidentRouted"
# Escalations the scheduler appends when an SLA clock passes its warning or due time.
SLA_WARNING_REACHED = "SlaWarningReached"
SLA_BREACHED = "SlaBreached"

# Events that end the automatic classification of a report: the worker pool skips reports
# with one of them.
CLASSIFICATION_OUTCOMES = frozenset({REPORT_CLASSIFIED, CLASSIFICATION_FAILED})

INCIDENT_EVENT_TYPES = frozenset(
    {
        REPORT_SUBMITTED,
        INCIDENT_ACKNOWLEDGED,
        INCIDENT_ASSIGNED,
        WORK_STARTED,
        INFORMATION_REQUESTED,
        REPORTER_RESPONDED,
        INCIDENT_RESOLVED,
        INCIDENT_REOPENED,
        INCIDENT_CLOSED,
        INCIDENT_REJECTED,
        INCIDENT_MARKED_DUPLICATE,
        REPORT_CLASSIFIED,
        CLASSIFICATION_FAILED,
        CLASSIFICATION_CORRECTED,
        REPORTS_MERGED,
        REPORT_SPLIT_FROM_GROUP,
        INCIDENT_ROUTED,
        SLA_WARNING_REACHED,
        SLA_BREACHED,
    }
)

SUBMITTED = "submitted"
ACKNOWLEDGED = "acknowledged"
ASSIGNED = "assigned"
IN_PROGRESS = "in_progress"
WAITING_ON_REPORTER = "waiting_on_reporter"
RESOLVED = "resolved"
REOPENED = "reopened"
CLOSED = "closed"
REJECTED = "rejected"
DUPLICATE = "duplicate"

OPEN_STATUSES = frozenset({SUBMITTED, ACKNOWLEDGED, ASSIGNED, IN_PROGRESS, REOPENED})
WORKABLE = OPEN_STATUSES | {WAITING_ON_REPORTER}
ANY_STATUS = WORKABLE | {RESOLVED, CLOSED, REJECTED, DUPLICATE}

# Command name -> (event type, statuses the command is allowed in).
COMMANDS: dict[str, tuple[str, frozenset[str]]] = {
    "acknowledge": (INCIDENT_ACKNOWLEDGED, frozenset({SUBMITTED, REOPENED})),
    "assign": (INCIDENT_ASSIGNED, OPEN_STATUSES),
    "start-work": (WORK_STARTED, frozenset({SUBMITTED, ACKNOWLEDGED, ASSIGNED, REOPENED})),
    "request-information": (INFORMATION_REQUESTED, OPEN_STATUSES),
    "reporter-responded": (REPORTER_RESPONDED, frozenset({WAITING_ON_REPORTER})),
    "resolve": (INCIDENT_RESOLVED, WORKABLE),
    "reopen": (INCIDENT_REOPENED, frozenset({RESOLVED, CLOSED})),
    "close": (INCIDENT_CLOSED, frozenset({RESOLVED})),
    "reject": (INCIDENT_REJECTED, WORKABLE),
    "mark-duplicate": (INCIDENT_MARKED_DUPLICATE, WORKABLE),
    # Staff may correct a classification whatever the status, closed incidents included, so
    # that the figures over past incidents are right.
    "reclassify": (CLASSIFICATION_CORRECTED, ANY_STATUS),
    # Groups contain closed reports too, so staff may regroup whatever the status.
    "merge-group": (REPORTS_MERGED, ANY_STATUS),
    "split-group": (REPORT_SPLIT_FROM_GROUP, ANY_STATUS),
}

SEVERITIES = ("low", "medium", "high", "critical")

# The source of an incident's category: the report itself, a classifier, or staff.
CATEGORY_FROM_REPORT = "report"
CATEGORY_FROM_CLASSIFIER = "classifier"
CATEGORY_FROM_STAFF = "staff"


@dataclass(slots=True)
class IncidentState:
    """The current state of one incident, folded from its stream.

    A state is a value: folds build a new one and never change a field in place
    (ledger/values.py explains why the class is not frozen).
    """

    incident_id: UUID
    version: int
    status: str
    category: str | None
    submitted_at: datetime
    updated_at: datetime
    resume_status: str | None = None
    title: str | None = None
    description: str | None = None
    reason: str | None = None
    queue: str | None = None
    source_channel: str | None = None
    source_id: str | None = None
    address: str | None = None
    latitude: float | None = None
    longitude: float | None = None
    assignee: str | None = None
    department: str | None = None
    duplicate_of: UUID | None = None
    rejection_reason: str | None = None
    redirect_to: str | None = None
    closure_reason: str | None = None
    resolved_at: datetime | None = None
    closed_at: datetime | None = None
    submitted_by: str | None = None  # id of the API key that submitted the report
    # The report's `contact` object: the reporter id and the encrypted name, e-mail and
    # phone. Reading them takes the reporter's key from the vault (ledger.personal).
    reporter_id: UUID | None = None
    contact: JsonObject | None = None
    # Classification. A category sent with the report is kept: a classifier fills in only a
    # missing one, and a staff correction overrides both, the latest correction winning.
    # `classifier` is "llm" or "rules" after a ReportClassified event, "failed" after a
    # ClassificationFailed event and "staff" after a correction.
    severity: str | None = None
    category_source: str | None = None
    classifier: str | None = None


def evolve(state: IncidentState | None, event: RecordedEvent) -> IncidentState | None:
    """Apply one event to an incident's state.

    Events before the ReportSubmitted event (possible when a valid-time filter drops the
    submission) leave the incident absent.
    """
    kind = event.event_type
    payload = event.payload
    at = event.occurred_at
    if kind == REPORT_SUBMITTED:
        contact = payload.get("contact")
        return IncidentState(
            incident_id=UUID(payload["incident_id"]),
            version=event.stream_version,
            status=SUBMITTED,
            category=payload.get("category"),
            department=payload.get("department"),
            submitted_at=at,
            updated_at=at,
            title=payload.get("title"),
            description=payload.get("description"),
            reason=payload.get("reason"),
            queue=payload.get("queue"),
            source_channel=payload.get("source_channel"),
            source_id=payload.get("source_id"),
            address=payload.get("address"),
            latitude=payload.get("latitude"),
            longitude=payload.get("longitude"),
            submitted_by=event.metadata.get("actor_id"),
            reporter_id=UUID(contact["reporter_id"]) if contact else None,
            contact=contact,
            category_source=CATEGORY_FROM_REPORT if payload.get("category") else None,
        )
    if state is None:
        return None
    # One new state per event: building the state is the most expensive step of a rebuild.
    changes: dict[str, Any] = {"version": event.stream_version}
    if at > state.updated_at:
        changes["updated_at"] = at
    if kind == INCIDENT_ACKNOWLEDGED:
        changes["status"] = ACKNOWLEDGED
    elif kind == INCIDENT_ASSIGNED:
        changes["status"] = ASSIGNED
        changes["assignee"] = payload.get("assignee")
        changes["department"] = payload.get("department") or state.department
    elif kind == INCIDENT_ROUTED:
        changes["department"] = payload.get("department") or state.department
    elif kind == WORK_STARTED:
        changes["status"] = IN_PROGRESS
    elif kind == INFORMATION_REQUESTED:
        changes["status"] = WAITING_ON_REPORTER
        changes["resume_status"] = state.status
    elif kind == REPORTER_RESPONDED:
        changes["status"] = state.resume_status or ACKNOWLEDGED
        changes["resume_status"] = None
    elif kind == INCIDENT_RESOLVED:
        changes.update(status=RESOLVED, resolved_at=at, resume_status=None)
    elif kind == INCIDENT_REOPENED:
        changes.update(status=REOPENED, resolved_at=None, closed_at=None)
    elif kind == INCIDENT_CLOSED:
        changes.update(
            status=CLOSED,
            closed_at=at,
            resolved_at=state.resolved_at or at,
            closure_reason=payload.get("reason"),
            resume_status=None,
        )
    elif kind == INCIDENT_REJECTED:
        changes.update(
            status=REJECTED,
            closed_at=at,
            rejection_reason=payload.get("reason"),
            redirect_to=payload.get("redirect_to"),
            resume_status=None,
        )
    elif kind == INCIDENT_MARKED_DUPLICATE:
        changes.update(
            status=DUPLICATE,
            closed_at=at,
            duplicate_of=UUID(payload["duplicate_of"]),
            resume_status=None,
        )
    elif kind in (REPORT_CLASSIFIED, CLASSIFICATION_FAILED, CLASSIFICATION_CORRECTED):
        changes.update(_classification_changes(state, kind, payload))
    return replaced(state, changes)


def _classification_changes(state: IncidentState, kind: str, payload: JsonObject) -> dict[str, Any]:
    """Return the state changes of a classification event.

    A classifier's result never replaces a staff correction, and never replaces a category
    that came with the report; its severity fills in only when staff have not set one.
    """
    if kind == CLASSIFICATION_CORRECTED:
        changes: dict[str, Any] = {"classifier": "staff"}
        if payload.get("category"):
            changes.update(category=payload["category"], category_source=CATEGORY_FROM_STAFF)
        if payload.get("severity"):
            changes["severity"] = payload["severity"]
        return changes
    if state.classifier == "staff":
        return {}
    if kind == CLASSIFICATION_FAILED:
        return {"classifier": "failed"}
    provenance = payload.get("provenance")
    changes = {
        "classifier": provenance.get("classifier") if isinstance(provenance, dict) else None,
        "severity": payload.get("severity"),
    }
    if state.category_source != CATEGORY_FROM_REPORT and payload.get("category"):
        changes.update(category=payload["category"], category_source=CATEGORY_FROM_CLASSIFIER)
    return changes


def fold_incident(events: list[RecordedEvent]) -> IncidentState | None:
    state: IncidentState | None = None
    for event in events:
        state = evolve(state, event)
    return state


def _text(args: dict[str, Any], name: str, *, required: bool, limit: int = 2000) -> str | None:
    value = args.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise CommandInvalid(f"missing {name}: this command needs a non-empty {name}")
        return None
    if not isinstance(value, str):
        raise CommandInvalid(f"invalid {name} {value!r}: expected text")
    if len(value) > limit:
        raise CommandInvalid(f"{name} is {len(value)} characters long; the limit is {limit}")
    return value.strip()


def decide(state: IncidentState, command: str, args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Return the event type and payload that `command` appends, or raise.

    Raises CommandRejected when the command does not fit the state and CommandInvalid when
    an argument is missing or malformed.
    """
    if command not in COMMANDS:
        raise CommandInvalid(
            f"unknown command {command!r}; known commands: {', '.join(sorted(COMMANDS))}"
        )
    event_type, allowed = COMMANDS[command]
    if state.status not in allowed:
        permitted = [name for name, (_, states) in COMMANDS.items() if state.status in states]
        raise CommandRejected(command, state.status, permitted)

    payload: dict[str, Any] = {}
    if command == "assign":
        payload["assignee"] = _text(args, "assignee", required=True, limit=200)
        department = _text(args, "department", required=False, limit=200)
        if department:
            payload["department"] = department
    elif command == "request-information":
        payload["question"] = _text(args, "question", required=True)
    elif command == "reporter-responded":
        payload["response"] = _text(args, "response", required=True)
    elif command == "resolve":
        note = _text(args, "note", required=False)
        if note:
            payload["note"] = note
    elif command in ("reopen", "close"):
        reason = _text(args, "reason", required=command == "reopen")
        if reason:
            payload["reason"] = reason
    elif command == "reject":
        payload["reason"] = _text(args, "reason", required=True)
        payload["redirect_to"] = _text(args, "redirect_to", required=True, limit=500)
    elif command == "mark-duplicate":
        raw = args.get("duplicate_of")
        try:
            original = UUID(str(raw))
        except ValueError as error:
            raise CommandInvalid(
                f"invalid duplicate_of {raw!r}: expected the id of another incident"
            ) from error
        if original == state.incident_id:
            raise CommandInvalid("an incident cannot be a duplicate of itself")
        payload["duplicate_of"] = str(original)
    elif command == "merge-group":
        raw = args.get("with_incident")
        try:
            other = UUID(str(raw))
        except ValueError as error:
            raise CommandInvalid(
                f"invalid with_incident {raw!r}: expected the id of another incident"
            ) from error
        if other == state.incident_id:
            raise CommandInvalid("an incident cannot be merged with itself: name another one")
        payload["with_incident"] = str(other)
    elif command == "reclassify":
        category = _text(args, "category", required=False, limit=200)
        severity = args.get("severity")
        if severity is not None and severity not in SEVERITIES:
            raise CommandInvalid(
                f"invalid severity {severity!r}: use one of {', '.join(SEVERITIES)}"
            )
        if category is None and severity is None:
            raise CommandInvalid("missing category and severity: reclassify needs one of them")
        if category is not None:
            payload["category"] = category
        if severity is not None:
            payload["severity"] = severity
    return event_type, payload
