"""Streaming the SLA projection in batches equals a fold from nothing, configuration included."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg_pool import ConnectionPool

from ledger import lifecycle as lc
from ledger.config_sections import apply_config
from ledger.events import NewEvent, RecordedEvent
from ledger.ids import incident_stream_id
from ledger.store import EVENT_COLUMNS, PostgresEventStore, row_to_event
from ledger.tenants import create_tenant
from projections.sla import (
    RESOLUTION_WARNING_SQL,
    SlaState,
    resolution_warning_reached,
    sla_projection,
)

T0 = datetime(2026, 3, 5, 14, tzinfo=UTC)  # before the clocks change in New York

CALENDAR = {
    "name": "office",
    "time_zone": "America/New_York",
    "weekly_hours": {
        "monday": ["08:00-12:00", "13:00-17:00"],
        "wednesday": ["09:00-24:00"],
        "saturday": ["00:00-06:00"],
    },
    "holidays": ["2026-03-09"],
}
CONFIGS: list[dict[str, Any]] = [
    {
        "calendars": [CALENDAR],
        "sla_policies": [
            {
                "id": "fast",
                "match": {"severities": ["high", "critical"]},
                "calendar": "office",
                "resolution": "3 business hours",
                "first_response": "1 calendar hours",
                "on_reopen": "restart",
            },
            {
                "id": "slow",
                "calendar": "office",
                "resolution": "2 business days",
                "on_category_change": "keep",
            },
        ],
    },
    {
        "calendars": [CALENDAR],
        "sla_policies": [
            {"id": "flat", "resolution": "30 calendar hours", "warning_percent": 50},
        ],
    },
    {
        "categories": [{"name": "Pothole", "department": "Streets"}, {"name": "Graffiti"}],
        "routing": [{"categories": ["Graffiti"], "areas": ["north"], "department": "Parks"}],
    },
]
# Group merges and splits are left out: their payloads name another incident, which these
# histories do not build, and the SLA fold ignores them.
STEP_TYPES = sorted(
    lc.INCIDENT_EVENT_TYPES - {lc.REPORT_SUBMITTED, lc.REPORTS_MERGED, lc.REPORT_SPLIT_FROM_GROUP}
)
steps = st.lists(
    st.tuples(st.sampled_from(STEP_TYPES), st.integers(min_value=-5, max_value=30)), max_size=6
)
# An action is either a configuration change (an index into CONFIGS) or an incident history.
actions = st.lists(
    st.one_of(st.integers(0, len(CONFIGS) - 1), st.tuples(st.booleans(), steps)),
    min_size=1,
    max_size=8,
)


def _payload(event_type: str, rng: int) -> dict[str, Any]:
    if event_type == lc.INCIDENT_MARKED_DUPLICATE:
        return {"duplicate_of": str(uuid.uuid4())}
    if event_type in (lc.REPORT_CLASSIFIED, lc.CLASSIFICATION_CORRECTED):
        return {
            "category": ["Pothole", "Graffiti"][rng % 2],
            "severity": ["low", "high", "critical"][rng % 3],
        }
    if event_type in (lc.SLA_WARNING_REACHED, lc.SLA_BREACHED):
        return {"target": "resolution", "clock": 1 + rng % 2}
    if event_type == lc.INCIDENT_ASSIGNED and rng % 2:
        return {"department": "Crew"}
    return {}


def _run(store: PostgresEventStore, tenant: str, plan: list[Any]) -> None:
    create_tenant(store, tenant, name="P", time_zone="America/New_York", occurred_at=T0)
    at = T0
    for number, action in enumerate(plan):
        at += timedelta(hours=5)
        if isinstance(action, int):
            apply_config(store, tenant, CONFIGS[action], occurred_at=at)
            continue
        north, history = action
        incident = uuid.uuid4()
        report: dict[str, Any] = {"incident_id": str(incident)}
        if north:
            report["area"] = "north"
        events = [NewEvent(lc.REPORT_SUBMITTED, report, at)]
        moment = at
        for index, (event_type, hours) in enumerate(history):
            moment += timedelta(hours=hours)
            events.append(NewEvent(event_type, _payload(event_type, number + index), moment))
        store.append(tenant, incident_stream_id(incident), events, expected_version=0)


def _log(pool: ConnectionPool[Any], tenant: str) -> list[RecordedEvent]:
    with pool.connection() as conn:
        rows = conn.execute(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE tenant_id = %s ORDER BY tx_id, position",
            (tenant,),
        ).fetchall()
    return [row_to_event(row) for row in rows]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(plan=actions, cuts=st.lists(st.integers(min_value=1, max_value=6), max_size=8))
def test_streaming_with_config_changes_equals_fold(
    store: PostgresEventStore,
    worker_pool: ConnectionPool[Any],
    plan: list[Any],
    cuts: list[int],
) -> None:
    tenant = f"s-{uuid.uuid4().hex[:10]}"
    _run(store, tenant, plan)
    events = _log(worker_pool, tenant)
    projection = sla_projection()

    with worker_pool.connection() as conn, conn.transaction(force_rollback=True):
        start = 0
        for size in [*cuts, len(events)]:
            projection.apply(conn, events[start : start + size])
            start += size
        stored = {
            key: value for key, value in projection.read_all(conn).items() if key[0] == tenant
        }
        configs = {
            key: value for key, value in projection.read_configs(conn).items() if key[0] == tenant
        }

    assert stored == projection.fold(events)
    assert configs == projection.fold_configs(events)


optional_time = st.none() | st.integers(min_value=-50, max_value=50).map(
    lambda hours: T0 + timedelta(hours=hours)
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    warning=optional_time,
    resolved=optional_time,
    paused=optional_time,
    now_hours=st.integers(min_value=-60, max_value=60),
)
def test_sql_warning_matches_python(
    store: PostgresEventStore,
    warning: datetime | None,
    resolved: datetime | None,
    paused: datetime | None,
    now_hours: int,
) -> None:
    state = SlaState(
        incident_id=uuid.uuid4(),
        category=None,
        department=None,
        status="open",
        submitted_at=T0,
        first_response_due_at=None,
        first_response_at=None,
        resolution_due_at=None,
        resolved_at=resolved,
        closed_at=None,
        paused_since=None if resolved else paused,
        paused_seconds=0.0,
        earliest_occurred_at=T0,
        latest_occurred_at=T0,
        resolution_warning_at=warning,
    )
    now = T0 + timedelta(hours=now_hours)
    with store.pool.connection() as conn:
        row = conn.execute(
            f"""
            SELECT {RESOLUTION_WARNING_SQL}
            FROM (SELECT %(warning)s::timestamptz AS resolution_warning_at,
                         %(resolved)s::timestamptz AS resolved_at,
                         %(paused)s::timestamptz AS paused_since) AS incident_sla
            """,
            {
                "warning": state.resolution_warning_at,
                "resolved": state.resolved_at,
                "paused": state.paused_since,
                "now": now,
            },
        ).fetchone()
    assert row is not None
    assert row[0] == resolution_warning_reached(state, now)
