"""The trends read model: per-incident facts that trend, duration and ranking queries read.

Each row contains the incident's SLA facts, folded by the steps of `evolve_sla`, so
category, department, policy and due times are exactly the SLA model's. Trends add the
area, the anomalies the importers flagged, and the business-time durations to first
response and to resolution. Counts per period are not stored: they are aggregates over
these rows (projections/trends_queries.py), so a reopen, a reclassification or an event
with an old `occurred_at` changes one row and every figure that depends on it at once.

The model keeps its own copy of the tenant's configuration versions (`trend_configs`), so
it never reads a table another projection writes at another checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg import sql

from ledger import lifecycle as lc
from ledger.business_time import business_duration
from ledger.events import RecordedEvent
from projections.sla import (
    ConfigHistory,
    ConfiguredIncidentProjection,
    SlaState,
    apply_sla_changes,
    pinned_policy,
    sla_changes,
    submitted_state,
)

# Payload fields read as the incident's area, first found wins. Reports sent through the
# API carry `area`; Open311 and city exports may carry a neighbourhood or a ward.
AREA_FIELDS = ("area", "neighborhood", "neighbourhood", "ward")
CLOSED_BEFORE_OPENED = "closed_before_opened"
RESPONDED_BEFORE_OPENED = "responded_before_opened"


@dataclass(slots=True)
class TrendState(SlaState):
    """An incident's SLA facts plus its area, anomalies and business-time durations.

    `flagged` is True when the history is impossible whatever the clock: an importer
    flagged it, or it was closed or responded to before it was opened. Queries add the
    records dated after the clock they are given.
    """

    report_area: str | None = None
    anomalies: list[str] = field(default_factory=list)
    flagged: bool = False
    first_response_business_seconds: float | None = None
    resolution_business_seconds: float | None = None


def _area(payload: dict[str, Any]) -> str | None:
    for name in AREA_FIELDS:
        value = payload.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _with_flags(anomalies: list[str], flags: Any) -> list[str]:
    """Return `anomalies` with the string flags of `flags` that it lacks appended.

    The list passed in is never changed: the result is a new list when a flag is added,
    and `anomalies` itself otherwise, so states may share one list.
    """
    for flag in flags or ():
        if isinstance(flag, str) and flag not in anomalies:
            anomalies = [*anomalies, flag]
    return anomalies


def _business_seconds(
    start: datetime,
    end: datetime | None,
    policy_id: str | None,
    policy_version: int | None,
    category: str | None,
    history: ConfigHistory | None,
) -> float | None:
    """Return the business seconds from `start` to `end` under the incident's calendar.

    The calendar is the one of the policy the SLA model pinned the incident to. Without
    one (a default policy, or an imported city target) the SLA model counts calendar
    time, and so does this figure. Impossible spans give None, never a negative number.
    """
    if end is None or end < start:
        return None
    policy = pinned_policy(policy_id, policy_version, category, history)
    if policy is None or policy.calendar is None:
        return (end - start).total_seconds()
    return business_duration(policy.calendar, start, end).total_seconds()


def evolve_trend(
    state: TrendState | None, event: RecordedEvent, history: ConfigHistory | None = None
) -> TrendState | None:
    """Apply one incident event: the SLA fold's changes and the trend facts on top of them.

    The new state is built once from both sets of changes, because building a state of
    this many fields costs more than working out what changed.
    """
    if event.event_type == lc.REPORT_SUBMITTED:
        # A (repeated) submission starts the incident's facts again, as it does in the SLA
        # fold. Nothing is responded to or resolved yet, so there are no durations, and the
        # only flags are the importer's.
        payload = event.payload
        anomalies = _with_flags([], payload.get("anomalies"))
        extra = {"report_area": _area(payload), "anomalies": anomalies, "flagged": bool(anomalies)}
        return submitted_state(event, history, TrendState, extra, state)
    if state is None:
        return None
    changes = sla_changes(state, event, history)
    _add_trend_changes(state, event, history, changes)
    return apply_sla_changes(state, changes, history)


def _add_trend_changes(
    state: TrendState, event: RecordedEvent, history: ConfigHistory | None, changes: dict[str, Any]
) -> None:
    """Add the trend facts that change with `changes`, the SLA changes an event makes to
    `state`, to `changes`: anomalies, the flag and the business-time durations."""
    first_response_at = changes.get("first_response_at", state.first_response_at)
    resolved_at = changes.get("resolved_at", state.resolved_at)
    submitted_at = state.submitted_at

    anomalies = _with_flags(state.anomalies, event.payload.get("anomalies"))
    # A flag stays after a reopen: the record did hold an impossible time.
    if resolved_at is not None and resolved_at < submitted_at:
        anomalies = _with_flags(anomalies, (CLOSED_BEFORE_OPENED,))
    if first_response_at is not None and first_response_at < submitted_at:
        anomalies = _with_flags(anomalies, (RESPONDED_BEFORE_OPENED,))
    if anomalies is not state.anomalies:
        changes["anomalies"] = anomalies
    flagged = bool(anomalies)
    if flagged != state.flagged:
        changes["flagged"] = flagged

    # Business durations are measured again only when their ends or the pinned policy
    # change: a business calendar walk is the costly step of this fold.
    policy_id = changes.get("policy_id", state.policy_id)
    policy_version = changes.get("policy_version", state.policy_version)
    if (
        first_response_at == state.first_response_at
        and resolved_at == state.resolved_at
        and policy_id == state.policy_id
        and policy_version == state.policy_version
    ):
        return
    category = changes.get("category", state.category)
    response = _business_seconds(
        submitted_at, first_response_at, policy_id, policy_version, category, history
    )
    if response != state.first_response_business_seconds:
        changes["first_response_business_seconds"] = response
    resolution = _business_seconds(
        submitted_at, resolved_at, policy_id, policy_version, category, history
    )
    if resolution != state.resolution_business_seconds:
        changes["resolution_business_seconds"] = resolution


TREND_CONFIGS = sql.Identifier("trend_configs")


class TrendsProjection(ConfiguredIncidentProjection[TrendState]):
    """The incident_trends table and the trend_configs table of configuration versions."""

    def __init__(self) -> None:
        super().__init__("trends", "incident_trends", TrendState, evolve_trend, "trend_configs")


def trends_projection() -> TrendsProjection:
    return TrendsProjection()
