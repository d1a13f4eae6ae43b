"""The trends read model: per-incident facts that trend, duration and ranking queries read.

Each row contains the incident's SLA facts, folded by `evolve_sla`, so category,
department, policy and due times are exactly the SLA model's. Trends add the area, the
anomalies the importers flagged, and the business-time durations to first response and to
resolution. Counts per period are not stored: they are aggregates over these rows
(projections/trends_queries.py), so a reopen, a reclassification or an event with an old
`occurred_at` changes one row and every figure that depends on it at once.

The model keeps its own copy of the tenant's configuration versions (`trend_configs`), so
it never reads a table another projection writes at another checkpoint.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
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
    _pinned_policy,
    evolve_sla,
)

# Payload fields read as the incident's area, first found wins. Reports sent through the
# API carry `area`; Open311 and city exports may carry a neighbourhood or a ward.
AREA_FIELDS = ("area", "neighborhood", "neighbourhood", "ward")
CLOSED_BEFORE_OPENED = "closed_before_opened"
RESPONDED_BEFORE_OPENED = "responded_before_opened"


@dataclass(frozen=True, slots=True)
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


_SLA_FIELDS = tuple(item.name for item in dataclasses.fields(SlaState))
# The constructor by position: the SLA fields, then the trend fields, as declared.
_new_state = typing.cast(Callable[..., TrendState], TrendState)


def _area(payload: dict[str, Any]) -> str | None:
    for name in AREA_FIELDS:
        value = payload.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _business_seconds(
    start: datetime, end: datetime | None, state: SlaState, history: ConfigHistory | None
) -> float | None:
    """Return the business seconds from `start` to `end` under the incident's calendar.

    The calendar is the one of the policy the SLA model pinned the incident to. Without
    one (a default policy, or an imported city target) the SLA model counts calendar
    time, and so does this figure. Impossible spans give None, never a negative number.
    """
    if end is None or end < start:
        return None
    policy = _pinned_policy(state, history)
    if policy is None or policy.calendar is None:
        return (end - start).total_seconds()
    return business_duration(policy.calendar, start, end).total_seconds()


def evolve_trend(
    state: TrendState | None, event: RecordedEvent, history: ConfigHistory | None = None
) -> TrendState | None:
    """Apply one incident event: the SLA fold first, then the trend facts on top."""
    sla = evolve_sla(state, event, history)
    if sla is None:
        return None
    # A (repeated) submission starts the incident's facts again, as it does in the SLA fold.
    previous = None if event.event_type == lc.REPORT_SUBMITTED else state

    area = previous.report_area if previous is not None else None
    anomalies = list(previous.anomalies) if previous is not None else []
    if event.event_type == lc.REPORT_SUBMITTED:
        area = _area(event.payload)
        anomalies = []
    for flag in event.payload.get("anomalies") or ():
        if isinstance(flag, str) and flag not in anomalies:
            anomalies.append(flag)
    # A flag stays after a reopen: the record did hold an impossible time.
    closed_early = sla.resolved_at is not None and sla.resolved_at < sla.submitted_at
    if closed_early and CLOSED_BEFORE_OPENED not in anomalies:
        anomalies.append(CLOSED_BEFORE_OPENED)
    responded_early = sla.first_response_at is not None and sla.first_response_at < sla.submitted_at
    if responded_early and RESPONDED_BEFORE_OPENED not in anomalies:
        anomalies.append(RESPONDED_BEFORE_OPENED)

    # Business durations are measured again only when their ends or the pinned policy
    # change: a business calendar walk is the costly step of this fold.
    if (
        previous is not None
        and previous.first_response_at == sla.first_response_at
        and previous.resolved_at == sla.resolved_at
        and previous.policy_id == sla.policy_id
        and previous.policy_version == sla.policy_version
        and previous.submitted_at == sla.submitted_at
    ):
        response = previous.first_response_business_seconds
        resolution = previous.resolution_business_seconds
    else:
        response = _business_seconds(sla.submitted_at, sla.first_response_at, sla, history)
        resolution = _business_seconds(sla.submitted_at, sla.resolved_at, sla, history)

    extras = (area, anomalies, bool(anomalies), response, resolution)
    if previous is not None and sla is previous and extras == _extras(previous):
        return previous
    values = [getattr(sla, name) for name in _SLA_FIELDS]
    return _new_state(*values, *extras)


def _extras(state: TrendState) -> tuple[Any, ...]:
    return (
        state.report_area,
        state.anomalies,
        state.flagged,
        state.first_response_business_seconds,
        state.resolution_business_seconds,
    )


TREND_CONFIGS = sql.Identifier("trend_configs")


class TrendsProjection(ConfiguredIncidentProjection[TrendState]):
    """The incident_trends table and the trend_configs table of configuration versions."""

    def __init__(self) -> None:
        super().__init__("trends", "incident_trends", TrendState, evolve_trend, "trend_configs")


def trends_projection() -> TrendsProjection:
    return TrendsProjection()
