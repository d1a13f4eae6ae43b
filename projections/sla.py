"""The SLA read model: policy, due times, pauses, response and resolution times per incident.

Whether an incident is breached depends on the clock, so the fold stores only facts and
due times, and `resolution_breached` (and its SQL twin) judge them against a time passed in.

Which configuration is in force for an event is decided by log order: the tenant's
configuration events come through the same log as the incident events, and the version in
force for an event is the latest configuration event before it in (transaction id,
position) order. The projection keeps every version in `sla_configs` with its position, so
a streaming apply, a fold from scratch and a point-in-time refold all find the same version
for the same event. A configuration event's valid time (`occurred_at`) plays no part: a
back-dated change would otherwise rewrite verdicts already given.
"""

from __future__ import annotations

import bisect
import copy
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, Self, TypeVar
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from ledger import lifecycle as lc
from ledger.events import RecordedEvent
from ledger.parking import tenant_parked_positions
from ledger.sla_policy import (
    SLA_CONFIG_EVENT_TYPES,
    Pause,
    Policy,
    SlaConfig,
    sla_config_from_payloads,
)
from ledger.store import EVENT_COLUMNS, row_to_event
from ledger.tenants import TENANT_CREATED
from ledger.values import replaced
from projections.base import (
    INCIDENT_STREAM_PREFIX,
    Folded,
    IncidentRowProjection,
    StreamKeys,
    copy_config_versions,
    qualified,
)
from projections.versions import RowVersion, VersionTracker, stream_versions

OPEN = "open"
PAUSED = "paused"
RESOLVED = "resolved"
CLOSED = "closed"
REJECTED = "rejected"
DUPLICATE = "duplicate"

# Rejected reports and duplicates are not judged against a target: the work is done (or
# counted) elsewhere.
NOT_JUDGED = (REJECTED, DUPLICATE)

TENANT_STREAM_PREFIX = "tenant-"
# Sources of an incident's category or department.
FROM_REPORT = "report"
FROM_CLASSIFIER = "classifier"
FROM_STAFF = "staff"
FROM_CONFIG = "config"
FROM_ASSIGNMENT = "assignment"
FROM_ROUTING = "routing"

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
_PAUSE_ENDS = frozenset(
    {
        lc.REPORTER_RESPONDED,
        lc.INCIDENT_RESOLVED,
        lc.INCIDENT_CLOSED,
        lc.INCIDENT_REJECTED,
        lc.INCIDENT_MARKED_DUPLICATE,
    }
)


@dataclass(slots=True)
class SlaState:
    """SLA facts of one incident. Times are valid times (when things happened).

    A state is a value: folds build a new one and never change a field in place
    (ledger/values.py explains why the class is not frozen).

    `policy_id` is None when the incident keeps the targets its report carried (an
    imported city's own target) or has none. Due and warning times include the pauses so
    far: `resolution_due_at` is the time the incident is late after, as long as no pause
    is running.
    """

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
    # Elapsed seconds of the finished pauses of the current clock.
    paused_seconds: float
    earliest_occurred_at: datetime
    latest_occurred_at: datetime
    severity: str | None = None
    channel: str | None = None
    area: str | None = None
    category_source: str | None = None
    department_source: str | None = None
    policy_id: str | None = None
    policy_version: int | None = None
    # Counts resolution clocks: a reopen under an on_reopen "restart" policy starts the next.
    clock: int = 1
    clock_started_at: datetime | None = None
    first_response_warning_at: datetime | None = None
    resolution_warning_at: datetime | None = None
    # Finished pauses of the current clock as [start, end] in ISO 8601, UTC.
    pauses: list[list[str]] = field(default_factory=list)
    # Escalations recorded for this incident, as "kind:target:clock" keys.
    escalations: list[str] = field(default_factory=list)
    # Transaction time: the first recorded_at of the incident's events, and the latest of
    # everything the row was folded from (its events, the configuration versions it
    # consulted). As known at T, the row equals the fold's result when known_since <= T.
    earliest_recorded_at: datetime | None = None
    known_since: datetime | None = None


AnySlaState = TypeVar("AnySlaState", bound=SlaState)


@dataclass(slots=True)
class _Version:
    tx_id: int
    position: int
    version: int
    payloads: dict[str, dict[str, Any]]
    # The latest recorded_at of the configuration events folded into this version.
    known_since: datetime


class ConfigHistory:
    """The SLA configuration versions of one tenant, in log order."""

    def __init__(
        self,
        tenant_id: str,
        versions: Iterable[_Version] = (),
        proposed: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.tenant_id = tenant_id
        # Payloads by event type that replace the recorded ones in every version folded
        # here, for a what-if replay. Versions passed in are taken as they are.
        self.proposed = proposed or {}
        self._versions = sorted(versions, key=lambda item: (item.tx_id, item.position))
        self._keys = [(item.tx_id, item.position) for item in self._versions]
        self._parsed: dict[int, SlaConfig | None] = {}

    def add(self, event: RecordedEvent) -> _Version:
        """Fold a configuration event into a new version; events must come in log order."""
        last = self._versions[-1] if self._versions else None
        version = _Version(
            event.tx_id,
            event.position,
            event.stream_version,
            {**(last.payloads if last else {}), event.event_type: event.payload, **self.proposed},
            max(last.known_since, event.recorded_at) if last else event.recorded_at,
        )
        self._versions.append(version)
        self._keys.append((event.tx_id, event.position))
        return version

    def in_force(self, event: RecordedEvent) -> SlaConfig | None:
        """Return the version written before `event` in log order, if any."""
        index = bisect.bisect_left(self._keys, (event.tx_id, event.position))
        return self._config(self._versions[index - 1]) if index else None

    def places(self) -> list[tuple[int, int]]:
        """Return the log places (tx_id, position) of the configuration events, one per
        version."""
        return list(self._keys)

    def known_since(self, event: RecordedEvent) -> datetime | None:
        """Return when the ledger knew every event of the version in force for `event`."""
        index = bisect.bisect_left(self._keys, (event.tx_id, event.position))
        return self._versions[index - 1].known_since if index else None

    def known_by(self, moment: datetime) -> ConfigHistory:
        """Return the versions whose events were all recorded by `moment`, a prefix."""
        return ConfigHistory(
            self.tenant_id,
            [item for item in self._versions if item.known_since <= moment],
            self.proposed,
        )

    def at_version(self, version: int) -> SlaConfig | None:
        for item in self._versions:
            if item.version == version:
                return self._config(item)
        return None

    def _config(self, item: _Version) -> SlaConfig | None:
        if item.version not in self._parsed:
            self._parsed[item.version] = (
                sla_config_from_payloads(item.version, item.payloads)
                if TENANT_CREATED in item.payloads
                else None
            )
        return self._parsed[item.version]


SLA_CONFIGS = sql.Identifier("sla_configs")


def load_histories(
    conn: psycopg.Connection[Any],
    tenants: Iterable[str],
    table: sql.Composable = SLA_CONFIGS,
) -> dict[str, ConfigHistory]:
    """Read the stored configuration versions of `tenants` from `table`."""
    rows: dict[str, list[_Version]] = defaultdict(list)
    for tenant_id, version, tx_id, position, payloads, known_since in conn.execute(
        sql.SQL(
            "SELECT tenant_id, version, tx_id, position, payloads, known_since FROM {} "
            "WHERE tenant_id = ANY(%s)"
        ).format(table),
        (list(tenants),),
    ):
        rows[tenant_id].append(_Version(tx_id, position, version, payloads, known_since))
    return {tenant_id: ConfigHistory(tenant_id, versions) for tenant_id, versions in rows.items()}


def is_config_event(event: RecordedEvent) -> bool:
    return event.event_type in SLA_CONFIG_EVENT_TYPES and event.stream_id.startswith(
        TENANT_STREAM_PREFIX
    )


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


def _pauses(state: SlaState) -> list[Pause]:
    return [
        (datetime.fromisoformat(start), datetime.fromisoformat(end)) for start, end in state.pauses
    ]


def _pinned_policy(state: SlaState, history: ConfigHistory | None) -> Policy | None:
    """Return the policy an incident is judged by, from the version it was pinned to."""
    return pinned_policy(state.policy_id, state.policy_version, state.category, history)


def pinned_policy(
    policy_id: str | None,
    policy_version: int | None,
    category: str | None,
    history: ConfigHistory | None,
) -> Policy | None:
    """Return the policy `policy_id` of configuration version `policy_version`, for an
    incident of `category`, or None when the incident is not pinned to a policy.

    Raises KeyError when `history` lacks that version.
    """
    if policy_id is None or policy_version is None or history is None:
        return None
    config = history.at_version(policy_version)
    if config is None:
        raise KeyError(f"tenant configuration version {policy_version} is not folded")
    return config.policy_by_id(policy_id, category)


def _due_times(state: SlaState, policy: Policy | None) -> dict[str, Any]:
    """Return the due and warning times of `state` under `policy` (None: keep them)."""
    if policy is None:
        return {}
    start = state.clock_started_at or state.submitted_at
    pauses = _pauses(state)
    changes: dict[str, Any] = {
        "first_response_due_at": None,
        "first_response_warning_at": None,
        "resolution_due_at": None,
        "resolution_warning_at": None,
    }
    # The first response is due from submission and is never paused: a request for
    # information is itself a first response.
    if policy.first_response is not None:
        changes["first_response_due_at"] = policy.due_at(
            policy.first_response, state.submitted_at, []
        )
        changes["first_response_warning_at"] = policy.warning_at(
            policy.first_response, state.submitted_at, []
        )
    if policy.resolution is not None:
        changes["resolution_due_at"] = policy.due_at(policy.resolution, start, pauses)
        changes["resolution_warning_at"] = policy.warning_at(policy.resolution, start, pauses)
    return changes


def submitted_state(
    event: RecordedEvent,
    history: ConfigHistory | None,
    state_type: type[AnySlaState],
    extra: dict[str, Any],
    previous: SlaState | None = None,
) -> AnySlaState:
    """Return the state a submission starts: SLA facts, and `extra` for the fields that
    `state_type`, SlaState or a subclass, adds. A repeated submission starts the facts
    again from `previous`, the incident's state, but keeps its transaction times."""
    payload = event.payload
    at = event.occurred_at
    earliest, latest = at, at
    earliest_recorded = known_since = event.recorded_at
    if previous is not None:
        earliest = min(previous.earliest_occurred_at, at)
        latest = max(previous.latest_occurred_at, at)
        if previous.earliest_recorded_at is not None:
            earliest_recorded = min(previous.earliest_recorded_at, earliest_recorded)
        if previous.known_since is not None:
            known_since = max(previous.known_since, known_since)
    category = payload.get("category")
    area = payload.get("area")
    channel = payload.get("source_channel") or event.metadata.get("channel")

    state = state_type(
        incident_id=UUID(payload["incident_id"]),
        category=category,
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
        earliest_occurred_at=earliest,
        latest_occurred_at=latest,
        severity=payload.get("severity"),
        channel=channel,
        area=area,
        category_source=FROM_REPORT if category else None,
        department_source=FROM_REPORT if payload.get("department") else None,
        clock_started_at=at,
        earliest_recorded_at=earliest_recorded,
        known_since=known_since,
        **extra,
    )
    config = history.in_force(event) if history is not None else None
    if config is None:
        return state

    changes: dict[str, Any] = {}
    _consulted(state, event, history, changes)
    if state.department is None:
        department = config.department_for(category, area)
        if department is not None:
            changes.update(department=department, department_source=FROM_CONFIG)
    # An imported report (one with a `source`) or one carrying its own due times keeps
    # them: a city's target is the city's record and is not replaced by a policy.
    own_target = (
        "source" in payload or "resolution_due_at" in payload or "first_response_due_at" in payload
    )
    if not own_target:
        policy = config.policy_for(category, state.severity, channel)
        changes.update(policy_id=policy.id, policy_version=config.version)
        state = replaced(state, changes)
        return replaced(state, _due_times(state, policy))
    return replaced(state, changes) if changes else state


def _classified(
    state: SlaState, event: RecordedEvent, history: ConfigHistory | None, changes: dict[str, Any]
) -> None:
    """Add to `changes` what a classification or a correction changes.

    Follows the incidents read model: a staff correction wins over any classifier result
    after it, and a category sent with the report is never replaced by a classifier.
    """
    payload = event.payload
    category, severity = state.category, state.severity
    if event.event_type == lc.CLASSIFICATION_CORRECTED:
        category = payload.get("category") or category
        severity = payload.get("severity") or severity
        changes["category_source"] = FROM_STAFF
    elif state.category_source != FROM_STAFF:
        severity = payload.get("severity") or severity
        if state.category_source != FROM_REPORT and payload.get("category"):
            category = payload["category"]
            changes["category_source"] = FROM_CLASSIFIER
    if (category, severity) == (state.category, state.severity):
        return
    changes.update(category=category, severity=severity)
    config = history.in_force(event) if history is not None else None
    if config is None:
        return
    _consulted(state, event, history, changes)
    if state.department_source in (None, FROM_CONFIG, FROM_ROUTING):
        department = config.department_for(category, state.area)
        changes.update(department=department, department_source=FROM_CONFIG if department else None)
    pinned = _pinned_policy(state, history)
    # A resolved incident keeps the verdict it was judged by. A classification that arrives
    # later (a classifier catching up on old reports, a correction for the record) changes
    # its category, not its policy or due times.
    if pinned is not None and pinned.on_category_change == "reassess" and state.resolved_at is None:
        # Picked again from the configuration in force now; the clock still starts at
        # submission (or at the last restart). When the rules pick the policy that judges
        # the incident already, it keeps the version it was pinned to: reassessment moves
        # an incident to the policy that fits it, and never applies later edits of a policy.
        policy = config.policy_for(category, severity, state.channel)
        if policy.id != state.policy_id:
            changes.update(
                policy_id=policy.id,
                policy_version=config.version,
                _recompute=True,
                _decided_by=event.occurred_at,
            )


def _consulted(
    state: SlaState, event: RecordedEvent, history: ConfigHistory | None, changes: dict[str, Any]
) -> None:
    """Add to `changes` that the fold of `event` read the configuration version in force."""
    version_known = history.known_since(event) if history is not None else None
    known = changes.get("known_since", state.known_since)
    if version_known is not None and (known is None or version_known > known):
        changes["known_since"] = version_known


def evolve_sla(
    state: SlaState | None, event: RecordedEvent, history: ConfigHistory | None = None
) -> SlaState | None:
    """Apply one incident event to an incident's SLA facts.

    `history` contains the tenant's configuration versions; the version in force for
    `event` comes from its position in the log.
    """
    if event.event_type == lc.REPORT_SUBMITTED:
        return submitted_state(event, history, SlaState, {}, state)
    if state is None:
        return None
    return apply_sla_changes(state, sla_changes(state, event, history), history)


def sla_changes(
    state: SlaState, event: RecordedEvent, history: ConfigHistory | None
) -> dict[str, Any]:
    """Return the field changes an incident event other than a submission makes to `state`.

    The key "_recompute" marks changes after which `apply_sla_changes` computes the due
    times again. With it, "_decided_by" names a time: targets met or missed by then keep
    their old times.
    """
    kind = event.event_type
    at = event.occurred_at
    # Changes are collected and applied with one replace: replace() on a frozen dataclass
    # is the most expensive step of a rebuild.
    changes: dict[str, Any] = {}
    recorded = event.recorded_at
    if state.known_since is None or recorded > state.known_since:
        changes["known_since"] = recorded
    if state.earliest_recorded_at is None or recorded < state.earliest_recorded_at:
        changes["earliest_recorded_at"] = recorded
    if at < state.earliest_occurred_at:
        changes["earliest_occurred_at"] = at
    if at > state.latest_occurred_at:
        changes["latest_occurred_at"] = at
    if kind in _FIRST_RESPONSES and state.first_response_at is None:
        changes["first_response_at"] = at

    pause: Pause | None = None
    if kind in _PAUSE_ENDS and state.paused_since is not None:
        pause = (state.paused_since, at)
        changes["paused_since"] = None

    if kind == lc.INCIDENT_ASSIGNED:
        if event.payload.get("department"):
            changes.update(
                department=event.payload["department"], department_source=FROM_ASSIGNMENT
            )
    elif kind == lc.INCIDENT_ROUTED:
        if state.department_source != FROM_ASSIGNMENT and event.payload.get("department"):
            changes.update(department=event.payload["department"], department_source=FROM_ROUTING)
    elif kind == lc.INFORMATION_REQUESTED:
        if state.paused_since is None and state.resolved_at is None:
            changes["status"] = PAUSED
            changes["paused_since"] = at
    elif kind == lc.REPORTER_RESPONDED:
        changes["status"] = OPEN
    elif kind == lc.INCIDENT_RESOLVED:
        changes["status"] = RESOLVED
        changes["resolved_at"] = at
    elif kind == lc.INCIDENT_CLOSED:
        changes["status"] = CLOSED
        changes["resolved_at"] = state.resolved_at or at
        changes["closed_at"] = at
    elif kind == lc.INCIDENT_REOPENED:
        changes.update(status=OPEN, resolved_at=None, closed_at=None)
        policy = _pinned_policy(state, history)
        if policy is not None and policy.on_reopen == "restart":
            # A new clock from the reopen: pauses and escalations of the old one are done.
            changes.update(
                clock=state.clock + 1,
                clock_started_at=at,
                pauses=[],
                paused_seconds=0.0,
                paused_since=None,
                _recompute=True,
            )
        elif state.resolved_at is not None:
            # The clock resumes where it stopped: time spent resolved does not count.
            pause = (state.resolved_at, at)
    elif kind in (lc.INCIDENT_REJECTED, lc.INCIDENT_MARKED_DUPLICATE):
        changes["status"] = REJECTED if kind == lc.INCIDENT_REJECTED else DUPLICATE
        changes["resolved_at"] = at
        changes["closed_at"] = at
    elif kind in (lc.REPORT_CLASSIFIED, lc.CLASSIFICATION_CORRECTED):
        _classified(state, event, history, changes)
    elif kind in (lc.SLA_WARNING_REACHED, lc.SLA_BREACHED):
        key = escalation_key(
            kind, event.payload.get("target", "resolution"), event.payload.get("clock", 1)
        )
        if key not in state.escalations:
            changes["escalations"] = [*state.escalations, key]

    if pause is not None and pause[1] > pause[0]:
        _add_pause(state, pause, changes)
    return changes


def apply_sla_changes(
    state: AnySlaState, changes: dict[str, Any], history: ConfigHistory | None
) -> AnySlaState:
    """Return `state` with `changes` from `sla_changes`, due times computed again when they
    ask for it. `changes` may also set the fields of a subclass of SlaState."""
    recompute = changes.pop("_recompute", False)
    decided_by: datetime | None = changes.pop("_decided_by", None)
    if not changes:
        return state
    before = state
    state = replaced(state, changes)
    if recompute:
        due_times = _due_times(state, _pinned_policy(state, history))
        if decided_by is not None:
            due_times = _keeping_decided_targets(before, due_times, decided_by)
        state = replaced(state, due_times)
    return state


def _keeping_decided_targets(
    before: SlaState, due_times: dict[str, Any], at: datetime
) -> dict[str, Any]:
    """Return `due_times` of a new policy without the times an outcome was decided by at `at`.

    A first response already given, and a due or warning time already passed, keep their
    old values: the deadline was met or missed under the policy of its day, and the
    escalation events recorded for it stay true.
    """
    kept = dict(due_times)
    first_response = ("first_response_due_at", "first_response_warning_at")
    for name in first_response:
        moment = getattr(before, name)
        if before.first_response_at is not None or (moment is not None and at > moment):
            kept[name] = moment
    for name in ("resolution_due_at", "resolution_warning_at"):
        if _passed(getattr(before, name), before, at):
            kept[name] = getattr(before, name)
    return kept


def _add_pause(state: SlaState, pause: Pause, changes: dict[str, Any]) -> None:
    length = pause[1] - pause[0]
    changes["paused_seconds"] = state.paused_seconds + length.total_seconds()
    if state.policy_id is None:
        # The report's own target is in calendar time: the pause moves it by its length.
        if state.resolution_due_at is not None:
            changes["resolution_due_at"] = state.resolution_due_at + length
        return
    changes["pauses"] = [*state.pauses, [_iso(pause[0]), _iso(pause[1])]]
    changes["_recompute"] = True


def escalation_key(kind: str, target: str, clock: int) -> str:
    return f"{kind}:{target}:{clock}"


def resolution_breached(state: SlaState, now: datetime) -> bool:
    """Return True when the incident missed (or, still open, has passed) its resolution target.

    `now` is the clock value to judge open incidents against. An incident without a target
    is never breached; a paused incident is breached only if it was already late when the
    pause began.
    """
    return _passed(state.resolution_due_at, state, now)


def resolution_warning_reached(state: SlaState, now: datetime) -> bool:
    """Return True when the incident reached its resolution warning time, judged as a breach."""
    return _passed(state.resolution_warning_at, state, now)


def _passed(moment: datetime | None, state: SlaState, now: datetime) -> bool:
    if moment is None:
        return False
    if state.resolved_at is not None:
        return state.resolved_at > moment
    if state.paused_since is not None:
        return state.paused_since > moment
    return now > moment


def _passed_sql(column: str) -> str:
    return f"""
    CASE
        WHEN {column} IS NULL THEN false
        WHEN resolved_at IS NOT NULL THEN resolved_at > {column}
        WHEN paused_since IS NOT NULL THEN paused_since > {column}
        ELSE %(now)s > {column}
    END
"""


# The same judgements in SQL, over incident_sla columns and a %(now)s parameter. A property
# test checks that they agree with the Python ones.
RESOLUTION_BREACHED_SQL = _passed_sql("resolution_due_at")
RESOLUTION_WARNING_SQL = _passed_sql("resolution_warning_at")


class _HasIncidentId(Protocol):
    @property
    def incident_id(self) -> UUID: ...


IncidentState = TypeVar("IncidentState", bound=_HasIncidentId)


class _WithoutHistory(Generic[IncidentState]):
    """A fold of one event with no configuration history. A class, not a lambda, because
    rebuild workers receive their projection pickled."""

    def __init__(
        self,
        fold_event: Callable[
            [IncidentState | None, RecordedEvent, ConfigHistory | None], IncidentState | None
        ],
    ) -> None:
        self.fold_event = fold_event

    def __call__(self, state: IncidentState | None, event: RecordedEvent) -> IncidentState | None:
        return self.fold_event(state, event, None)


class ConfiguredIncidentProjection(IncidentRowProjection[IncidentState]):
    """An incident row table folded with each tenant's configuration history, whose versions
    the model keeps in a table of its own.

    With `proposed` (payloads by configuration event type), `fold` judges every incident as
    if those payloads had replaced the recorded ones from the tenant's creation on: a
    what-if replay. Such a projection only folds in memory, and writing it raises.
    """

    def __init__(
        self,
        name: str,
        table: str,
        state_type: type[IncidentState],
        fold_event: Callable[
            [IncidentState | None, RecordedEvent, ConfigHistory | None], IncidentState | None
        ],
        configs_table: str,
        proposed: dict[str, dict[str, Any]] | None = None,
        versions_table: str | None = None,
    ) -> None:
        super().__init__(name, table, state_type, _WithoutHistory(fold_event))
        self.fold_event = fold_event
        self.configs_table = configs_table
        # Rows as they were before each incident's last event (projections/versions.py),
        # or None for a model that keeps only its live rows.
        self.versions_table = versions_table
        self.tables = self._all_tables()
        self.proposed = proposed

    def _all_tables(self) -> tuple[str, ...]:
        if self.versions_table is None:
            return (self.table, self.configs_table)
        return (self.table, self.configs_table, self.versions_table)

    def retarget(self, schema: str, tables: dict[str, str]) -> Self:
        clone = copy.copy(self)
        clone.schema = schema
        clone.table = tables[self.table]
        clone.configs_table = tables[self.configs_table]
        if self.versions_table is not None:
            clone.versions_table = tables[self.versions_table]
        clone.tables = clone._all_tables()
        return clone

    def write_log_rows(self, conn: psycopg.Connection[Any], events: list[RecordedEvent]) -> None:
        self._reject_proposed()
        copy_config_versions(
            conn, qualified(self.schema, self.configs_table), self.fold_configs(events)
        )

    def fold(
        self, events: Iterable[RecordedEvent], initial: Folded | None = None
    ) -> dict[tuple[str, UUID], IncidentState]:
        """Fold events onto `initial`; the events must include the tenant's configuration
        stream from its start, which is how replay reads them."""
        return self._fold(events, initial, {}, None)

    def _fold(
        self,
        events: Iterable[RecordedEvent],
        initial: Folded | None,
        histories: dict[str, ConfigHistory],
        tracker: VersionTracker | None,
    ) -> dict[tuple[str, UUID], IncidentState]:
        states: dict[tuple[str, Any], IncidentState | None] = dict(initial or {})
        keys = StreamKeys(self)
        for event in events:
            if is_config_event(event):
                history = histories.get(event.tenant_id)
                if history is None:
                    history = histories[event.tenant_id] = ConfigHistory(
                        event.tenant_id, proposed=self.proposed
                    )
                history.add(event)
            elif event.event_type in lc.INCIDENT_EVENT_TYPES:
                key = keys.of(event)
                before = states.get(key)
                after = states[key] = self.fold_event(before, event, histories.get(event.tenant_id))
                if tracker is not None:
                    tracker.step(
                        (event.tenant_id, event.stream_id),
                        event.tenant_id,
                        before,
                        after,
                        event.occurred_at,
                    )
        return keys.result(states)

    def write_folded(self, conn: psycopg.Connection[Any], events: list[RecordedEvent]) -> int:
        if self.versions_table is None:
            return super().write_folded(conn, events)
        self._reject_proposed()
        histories: dict[str, ConfigHistory] = {}
        tracker = VersionTracker()
        states = self._fold(events, None, histories, tracker)
        self.write_states(conn, states)
        versions = tracker.closed()
        if tracker.recompute:
            streams: dict[tuple[str, str], list[RecordedEvent]] = defaultdict(list)
            for event in events:
                key = (event.tenant_id, event.stream_id)
                if key in tracker.recompute and event.event_type in lc.INCIDENT_EVENT_TYPES:
                    streams[key].append(event)
            versions += self._stream_versions(streams, histories)
        self._copy_versions(conn, versions)
        return len(states)

    def _stream_versions(
        self,
        streams: dict[tuple[str, str], list[RecordedEvent]],
        histories: dict[str, ConfigHistory],
    ) -> list[RowVersion]:
        """Compute the versions of whole streams, each with its tenant's history."""
        versions: list[RowVersion] = []
        for (tenant_id, _), stream_events in streams.items():
            history = histories.get(tenant_id)

            def fold(state: Any, event: RecordedEvent, history: Any = history) -> Any:
                return self.fold_event(state, event, history)

            versions += stream_versions(tenant_id, stream_events, fold)
        return versions

    def _copy_versions(self, conn: psycopg.Connection[Any], versions: list[RowVersion]) -> None:
        """Write `versions` into the versions table: with COPY into a rebuild's shadow table,
        through a temporary table into the live one, which has row-level security."""
        if not versions or self.versions_table is None:
            return
        target = qualified(self.schema, self.versions_table)
        columns = ["tenant_id", *self.columns, "valid_from", "valid_to"]
        rows = [
            (version.tenant_id, version.state, (version.valid_from, version.valid_to))
            for version in versions
        ]
        if self.schema is not None:
            self.copy_rows(conn, target, columns, rows)
        else:
            self.insert_staged(conn, target, f"{self.versions_table}_batch", columns, rows)

    def _replace_versions(
        self,
        conn: psycopg.Connection[Any],
        tracker: VersionTracker,
        histories: dict[str, ConfigHistory],
        through: RecordedEvent,
    ) -> None:
        """Write the versions a streaming batch closed, and compute again from the log, up
        to `through`, those of the incidents it listed to recompute."""
        versions = tracker.closed()
        by_tenant: dict[str, list[str]] = defaultdict(list)
        for tenant_id, stream_id in tracker.recompute:
            by_tenant[tenant_id].append(stream_id)
        target = qualified(self.schema, self.versions_table or "")
        for tenant_id, stream_ids in by_tenant.items():
            incident_ids = [stream.removeprefix(INCIDENT_STREAM_PREFIX) for stream in stream_ids]
            conn.execute(
                sql.SQL(
                    "DELETE FROM {} WHERE tenant_id = %s AND incident_id = ANY(%s::uuid[])"
                ).format(target),
                (tenant_id, incident_ids),
            )
            streams = self._read_streams(conn, tenant_id, stream_ids, through)
            versions += self._stream_versions(streams, histories)
        self._copy_versions(conn, versions)

    def _read_streams(
        self,
        conn: psycopg.Connection[Any],
        tenant_id: str,
        stream_ids: list[str],
        through: RecordedEvent,
    ) -> dict[tuple[str, str], list[RecordedEvent]]:
        """Read the incident events of `stream_ids` up to `through` in log order, less the
        ones parked for this projection, by (tenant, stream id)."""
        parked = tenant_parked_positions(conn, self.name, tenant_id)
        streams: dict[tuple[str, str], list[RecordedEvent]] = defaultdict(list)
        with conn.cursor() as cur:
            cur.execute(
                f"""
                SELECT {EVENT_COLUMNS} FROM events
                WHERE tenant_id = %s AND stream_id = ANY(%s)
                  AND (tx_id, position) <= (%s::text::xid8, %s)
                ORDER BY tx_id, position
                """,
                (tenant_id, stream_ids, str(through.tx_id), through.position),
            )
            for row in cur:
                event = row_to_event(row)
                if event.position not in parked and event.event_type in lc.INCIDENT_EVENT_TYPES:
                    streams[(tenant_id, event.stream_id)].append(event)
        return streams

    def fold_configs(self, events: Iterable[RecordedEvent]) -> dict[tuple[str, int], Any]:
        """Fold the rows the configuration versions table should hold for `events`."""
        histories: dict[str, ConfigHistory] = {}
        rows: dict[tuple[str, int], Any] = {}
        for event in events:
            if is_config_event(event):
                item = histories.setdefault(event.tenant_id, ConfigHistory(event.tenant_id)).add(
                    event
                )
                rows[(event.tenant_id, item.version)] = (
                    item.tx_id,
                    item.position,
                    item.payloads,
                    item.known_since,
                )
        return rows

    def apply(self, conn: psycopg.Connection[Any], events: list[RecordedEvent]) -> None:
        self._reject_proposed()
        relevant = [
            event
            for event in events
            if event.event_type in lc.INCIDENT_EVENT_TYPES or is_config_event(event)
        ]
        if not relevant:
            return
        configs = qualified(self.schema, self.configs_table)
        histories = load_histories(conn, {event.tenant_id for event in relevant}, configs)
        incident_keys = {
            (event.tenant_id, event.stream_id) for event in relevant if not is_config_event(event)
        }
        states: dict[tuple[str, str], IncidentState | None] = dict(self.load(conn, incident_keys))
        new_versions: list[tuple[str, _Version]] = []
        tracker = VersionTracker() if self.versions_table is not None else None
        for event in relevant:
            history = histories.get(event.tenant_id)
            if is_config_event(event):
                if history is None:
                    history = histories[event.tenant_id] = ConfigHistory(event.tenant_id)
                new_versions.append((event.tenant_id, history.add(event)))
                continue
            key = (event.tenant_id, event.stream_id)
            before = states.get(key)
            after = states[key] = self.fold_event(before, event, history)
            if tracker is not None:
                tracker.step(key, event.tenant_id, before, after, event.occurred_at)
        if new_versions:
            with conn.cursor() as cur:
                cur.executemany(
                    # A version is a function of its event, so a row already stored (by a
                    # rebuild that kept this table) is the same row.
                    sql.SQL(
                        "INSERT INTO {} "
                        "(tenant_id, version, tx_id, position, payloads, known_since) "
                        "VALUES (%s, %s, %s, %s, %s, %s) "
                        "ON CONFLICT (tenant_id, version) DO NOTHING"
                    ).format(configs),
                    [
                        (
                            tenant_id,
                            item.version,
                            item.tx_id,
                            item.position,
                            Jsonb(item.payloads),
                            item.known_since,
                        )
                        for tenant_id, item in new_versions
                    ],
                )
        if states:
            self.write(conn, states)
        if tracker is not None:
            self._replace_versions(conn, tracker, histories, relevant[-1])

    def write_states(self, conn: psycopg.Connection[Any], states: Folded) -> None:
        self._reject_proposed()
        super().write_states(conn, states)

    def write(
        self, conn: psycopg.Connection[Any], states: dict[tuple[str, str], IncidentState | None]
    ) -> None:
        self._reject_proposed()
        super().write(conn, states)

    def _reject_proposed(self) -> None:
        # A what-if projection's rows are not the tenant's record: they must never reach
        # the live tables, nor shadow tables that a rebuild would swap in.
        if self.proposed is not None:
            raise RuntimeError(
                f"a what-if {self.name} projection folds in memory only and never writes"
            )

    def read_versions(
        self, conn: psycopg.Connection[Any], tenant_id: str | None = None
    ) -> list[RowVersion]:
        """Read the versions table back (one tenant's rows with `tenant_id`) in key order,
        for comparisons with a fresh fold. A model without versions returns none."""
        if self.versions_table is None:
            return []
        query = sql.SQL(
            "SELECT tenant_id, {}, valid_from, valid_to FROM {} WHERE %(tenant)s::text IS NULL "
            "OR tenant_id = %(tenant)s ORDER BY tenant_id, incident_id, valid_from"
        ).format(self._column_list, qualified(self.schema, self.versions_table))
        return [
            RowVersion(row[0], self.state_type(*row[1:-2]), row[-2], row[-1])
            for row in conn.execute(query, {"tenant": tenant_id})
        ]

    def read_configs(self, conn: psycopg.Connection[Any]) -> dict[tuple[str, int], Any]:
        return {
            (tenant_id, version): (tx_id, position, payloads, known_since)
            for tenant_id, version, tx_id, position, payloads, known_since in conn.execute(
                sql.SQL(
                    "SELECT tenant_id, version, tx_id, position, payloads, known_since FROM {}"
                ).format(sql.Identifier(self.configs_table))
            )
        }


# The events whose payload or metadata the SLA fold reads. The others reach a streaming
# batch with empty ones (Projection.payload_types): about half of an imported city's
# events are closures, whose JSON the fold never looks at.
SLA_PAYLOAD_TYPES = (
    frozenset(
        {
            lc.REPORT_SUBMITTED,
            lc.REPORT_CLASSIFIED,
            lc.CLASSIFICATION_CORRECTED,
            lc.INCIDENT_ASSIGNED,
            lc.INCIDENT_ROUTED,
            lc.SLA_WARNING_REACHED,
            lc.SLA_BREACHED,
        }
    )
    | SLA_CONFIG_EVENT_TYPES
)


class SlaProjection(ConfiguredIncidentProjection[SlaState]):
    """The incident_sla table, and the sla_configs table of configuration versions it uses."""

    payload_types = SLA_PAYLOAD_TYPES

    def __init__(self, proposed: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__(
            "sla",
            "incident_sla",
            SlaState,
            evolve_sla,
            "sla_configs",
            proposed,
            versions_table="incident_sla_versions",
        )


def sla_projection() -> SlaProjection:
    return SlaProjection()


def first_response_breached(state: SlaState, now: datetime) -> bool:
    """Return True when the first response came, or is still missing, after its due time."""
    due = state.first_response_due_at
    if due is None:
        return False
    return (state.first_response_at or now) > due
