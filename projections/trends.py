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

import copy
import dataclasses
import typing
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from ledger import lifecycle as lc
from ledger.business_time import business_duration
from ledger.events import RecordedEvent
from projections.base import (
    INCIDENT_STREAM_PREFIX,
    Folded,
    IncidentRowProjection,
    copy_config_versions,
    qualified,
)
from projections.sla import (
    ConfigHistory,
    SlaState,
    _pinned_policy,
    _Version,
    evolve_sla,
    is_config_event,
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


def load_trend_histories(
    conn: psycopg.Connection[Any],
    tenants: Iterable[str],
    table: sql.Composable = TREND_CONFIGS,
) -> dict[str, ConfigHistory]:
    """Read the configuration versions of `tenants` this model stored in `table`."""
    rows: dict[str, list[_Version]] = defaultdict(list)
    for tenant_id, version, tx_id, position, payloads in conn.execute(
        sql.SQL(
            "SELECT tenant_id, version, tx_id, position, payloads FROM {} WHERE tenant_id = ANY(%s)"
        ).format(table),
        (list(tenants),),
    ):
        rows[tenant_id].append(_Version(tx_id, position, version, payloads))
    return {tenant_id: ConfigHistory(tenant_id, versions) for tenant_id, versions in rows.items()}


class TrendsProjection(IncidentRowProjection[TrendState]):
    """The incident_trends table and the trend_configs table of configuration versions."""

    def __init__(self) -> None:
        super().__init__("trends", "incident_trends", TrendState, evolve_trend)
        self.configs_table = "trend_configs"
        self.tables = ("incident_trends", self.configs_table)

    def retarget(self, schema: str, tables: dict[str, str]) -> TrendsProjection:
        clone = copy.copy(self)
        clone.schema = schema
        clone.table = tables[self.table]
        clone.configs_table = tables[self.configs_table]
        clone.tables = (clone.table, clone.configs_table)
        return clone

    def write_log_rows(self, conn: psycopg.Connection[Any], events: list[RecordedEvent]) -> None:
        copy_config_versions(
            conn, qualified(self.schema, self.configs_table), self.fold_configs(events)
        )

    def fold(
        self, events: Iterable[RecordedEvent], initial: Folded | None = None
    ) -> dict[tuple[str, UUID], TrendState]:
        """Fold events onto `initial`; the events must include the tenant's configuration
        stream from its start, which is how replay reads them."""
        histories: dict[str, ConfigHistory] = {}
        states: dict[tuple[str, str], TrendState | None] = {
            (tenant_id, INCIDENT_STREAM_PREFIX + str(incident_id)): state
            for (tenant_id, incident_id), state in (initial or {}).items()
        }
        for event in events:
            if is_config_event(event):
                histories.setdefault(event.tenant_id, ConfigHistory(event.tenant_id)).add(event)
            elif event.event_type in lc.INCIDENT_EVENT_TYPES:
                key = (event.tenant_id, event.stream_id)
                states[key] = evolve_trend(states.get(key), event, histories.get(event.tenant_id))
        return {
            (tenant_id, state.incident_id): state
            for (tenant_id, _), state in states.items()
            if state is not None
        }

    def fold_configs(self, events: Iterable[RecordedEvent]) -> dict[tuple[str, int], Any]:
        """Fold the rows the trend_configs table should hold for `events`."""
        histories: dict[str, ConfigHistory] = {}
        rows: dict[tuple[str, int], Any] = {}
        for event in events:
            if is_config_event(event):
                history = histories.setdefault(event.tenant_id, ConfigHistory(event.tenant_id))
                item = history.add(event)
                rows[(event.tenant_id, item.version)] = (item.tx_id, item.position, item.payloads)
        return rows

    def apply(self, conn: psycopg.Connection[Any], events: list[RecordedEvent]) -> None:
        relevant = [
            event
            for event in events
            if event.event_type in lc.INCIDENT_EVENT_TYPES or is_config_event(event)
        ]
        if not relevant:
            return
        configs = qualified(self.schema, self.configs_table)
        histories = load_trend_histories(conn, {event.tenant_id for event in relevant}, configs)
        incident_keys = {
            (event.tenant_id, event.stream_id) for event in relevant if not is_config_event(event)
        }
        states: dict[tuple[str, str], TrendState | None] = dict(self.load(conn, incident_keys))
        new_versions: list[tuple[str, _Version]] = []
        for event in relevant:
            history = histories.get(event.tenant_id)
            if is_config_event(event):
                if history is None:
                    history = histories[event.tenant_id] = ConfigHistory(event.tenant_id)
                new_versions.append((event.tenant_id, history.add(event)))
                continue
            key = (event.tenant_id, event.stream_id)
            states[key] = evolve_trend(states.get(key), event, history)
        if new_versions:
            with conn.cursor() as cur:
                cur.executemany(
                    sql.SQL(
                        "INSERT INTO {} (tenant_id, version, tx_id, position, payloads) "
                        "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (tenant_id, version) DO NOTHING"
                    ).format(configs),
                    [
                        (tenant_id, item.version, item.tx_id, item.position, Jsonb(item.payloads))
                        for tenant_id, item in new_versions
                    ],
                )
        if states:
            self.write(conn, states)

    def read_configs(self, conn: psycopg.Connection[Any]) -> dict[tuple[str, int], Any]:
        return {
            (tenant_id, version): (tx_id, position, payloads)
            for tenant_id, version, tx_id, position, payloads in conn.execute(
                "SELECT tenant_id, version, tx_id, position, payloads FROM trend_configs"
            )
        }


def trends_projection() -> TrendsProjection:
    return TrendsProjection()
