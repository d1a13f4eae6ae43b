from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg_pool import ConnectionPool

from ledger import lifecycle as lc
from ledger.events import NewEvent, RecordedEvent
from ledger.ids import incident_stream_id
from ledger.store import PostgresEventStore
from projections.incidents import incidents_projection
from projections.sla import (
    RESOLUTION_BREACHED_SQL,
    SLA_PAYLOAD_TYPES,
    SlaState,
    evolve_sla,
    resolution_breached,
    sla_projection,
)
from projections.sla_queries import sla_summary, sla_verdicts

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
DUE = T0 + timedelta(hours=10)


def recorded(event_type: str, hours: float, version: int, **payload: Any) -> RecordedEvent:
    return RecordedEvent(
        position=version,
        tx_id=1,
        tenant_id="acme",
        stream_id="incident-x",
        stream_version=version,
        event_type=event_type,
        schema_version=1,
        payload=payload,
        metadata={},
        occurred_at=T0 + timedelta(hours=hours),
        recorded_at=T0,
        event_id=uuid.uuid4(),
        hash=bytes(32),
    )


def fold(*steps: tuple[str, float]) -> SlaState:
    incident = str(uuid.uuid4())
    state = evolve_sla(
        None,
        recorded(
            lc.REPORT_SUBMITTED, 0, 1, incident_id=incident, resolution_due_at=DUE.isoformat()
        ),
    )
    for version, (event_type, hours) in enumerate(steps, start=2):
        state = evolve_sla(state, recorded(event_type, hours, version))
    assert state is not None
    return state


def test_resolved_late_is_breached() -> None:
    state = fold((lc.INCIDENT_ACKNOWLEDGED, 1), (lc.INCIDENT_RESOLVED, 11))
    assert state.first_response_at == T0 + timedelta(hours=1)
    assert resolution_breached(state, T0 + timedelta(days=30))


def test_pause_moves_due_time() -> None:
    state = fold(
        (lc.INFORMATION_REQUESTED, 2), (lc.REPORTER_RESPONDED, 7), (lc.INCIDENT_RESOLVED, 14)
    )
    assert state.paused_seconds == 5 * 3600
    assert not resolution_breached(state, T0 + timedelta(days=30))


def test_paused_incident_does_not_breach_while_waiting() -> None:
    state = fold((lc.INFORMATION_REQUESTED, 2))
    assert state.status == "paused"
    assert not resolution_breached(state, T0 + timedelta(days=30))


def test_pause_after_breach_stays_breached() -> None:
    state = fold((lc.INFORMATION_REQUESTED, 12))
    assert resolution_breached(state, T0 + timedelta(hours=13))


def test_open_incident_breaches_when_clock_passes_due() -> None:
    state = fold((lc.INCIDENT_ACKNOWLEDGED, 1))
    assert not resolution_breached(state, DUE)
    assert resolution_breached(state, DUE + timedelta(seconds=1))


def test_reopen_resumes_clock_without_resolved_time() -> None:
    state = fold((lc.INCIDENT_RESOLVED, 4), (lc.INCIDENT_REOPENED, 24), (lc.INCIDENT_RESOLVED, 29))
    # 4 h worked, 20 h resolved (not counted), 5 h worked: 9 h against a 10 h target.
    assert state.paused_seconds == 20 * 3600
    assert not resolution_breached(state, T0 + timedelta(days=30))


def test_closed_without_resolve_counts_as_resolution() -> None:
    state = fold((lc.INCIDENT_CLOSED, 3))
    assert state.resolved_at == T0 + timedelta(hours=3)
    assert state.closed_at == state.resolved_at
    assert state.first_response_at == state.resolved_at


def test_no_target_never_breached() -> None:
    state = replace(fold(), resolution_due_at=None)
    assert not resolution_breached(state, T0 + timedelta(days=365))


optional_time = st.none() | st.integers(min_value=-50, max_value=50).map(
    lambda hours: T0 + timedelta(hours=hours)
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    due=optional_time,
    resolved=optional_time,
    paused=optional_time,
    paused_seconds=st.integers(min_value=0, max_value=40 * 3600),
    now_hours=st.integers(min_value=-60, max_value=60),
)
def test_sql_breach_matches_python(
    store: PostgresEventStore,
    due: datetime | None,
    resolved: datetime | None,
    paused: datetime | None,
    paused_seconds: int,
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
        resolution_due_at=due,
        resolved_at=resolved,
        closed_at=None,
        paused_since=None if resolved else paused,
        paused_seconds=float(paused_seconds),
        earliest_occurred_at=T0,
        latest_occurred_at=T0,
    )
    now = T0 + timedelta(hours=now_hours)
    with store.pool.connection() as conn:
        row = conn.execute(
            f"""
            SELECT {RESOLUTION_BREACHED_SQL}
            FROM (SELECT %(due)s::timestamptz AS resolution_due_at,
                         %(resolved)s::timestamptz AS resolved_at,
                         %(paused)s::timestamptz AS paused_since,
                         %(seconds)s::float8 AS paused_seconds) AS incident_sla
            """,
            {
                "due": state.resolution_due_at,
                "resolved": state.resolved_at,
                "paused": state.paused_since,
                "seconds": state.paused_seconds,
                "now": now,
            },
        ).fetchone()
    assert row is not None
    assert row[0] == resolution_breached(state, now)


# A history step: (event type, hours after the previous step; negative for back-dated facts)
# Group merges and splits are left out: their payloads name another incident, which these
# histories do not build, and the SLA fold ignores them.
STEP_TYPES = sorted(
    lc.INCIDENT_EVENT_TYPES - {lc.REPORT_SUBMITTED, lc.REPORTS_MERGED, lc.REPORT_SPLIT_FROM_GROUP}
)
histories = st.lists(
    st.lists(
        st.tuples(st.sampled_from(STEP_TYPES), st.integers(min_value=-5, max_value=30)),
        max_size=6,
    ),
    min_size=1,
    max_size=6,
)


def _append_histories(
    store: PostgresEventStore, tenant: str, history: list[list[tuple[str, int]]], due_hours: int
) -> list[uuid.UUID]:
    incidents = []
    for number, steps in enumerate(history):
        incident = uuid.uuid4()
        incidents.append(incident)
        at = T0 + timedelta(hours=3 * number)
        events = [
            NewEvent(
                lc.REPORT_SUBMITTED,
                {
                    "incident_id": str(incident),
                    "category": f"c{number % 2}",
                    "department": f"d{number % 3}",
                    "resolution_due_at": (at + timedelta(hours=due_hours)).isoformat(),
                },
                at,
            )
        ]
        for event_type, hours in steps:
            at += timedelta(hours=hours)
            payload: dict[str, Any] = {}
            if event_type == lc.INCIDENT_MARKED_DUPLICATE:
                payload["duplicate_of"] = str(uuid.uuid4())
            events.append(NewEvent(event_type, payload, at))
        store.append(tenant, incident_stream_id(incident), events, expected_version=0)
    return incidents


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    history=histories,
    cuts=st.lists(st.integers(min_value=1, max_value=8), max_size=6),
    due_hours=st.integers(min_value=1, max_value=40),
)
def test_batched_streaming_equals_fold(
    store: PostgresEventStore,
    worker_pool: ConnectionPool[Any],
    history: list[list[tuple[str, int]]],
    cuts: list[int],
    due_hours: int,
) -> None:
    tenant = f"p-{uuid.uuid4().hex[:10]}"
    incidents = _append_histories(store, tenant, history, due_hours)
    with worker_pool.connection() as conn:
        events = [
            event
            for incident in incidents
            for event in store.read_stream(tenant, incident_stream_id(incident))
        ]
        events.sort(key=lambda event: event.position)

        for projection in (incidents_projection(), sla_projection()):
            with conn.transaction(force_rollback=True):
                start = 0
                for size in [*cuts, len(events)]:
                    projection.apply(conn, events[start : start + size])
                    start += size
                stored = {
                    key: value
                    for key, value in projection.read_all(conn).items()
                    if key[0] == tenant
                }
            assert stored == projection.fold(events)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    history=histories,
    as_of_hours=st.integers(min_value=-5, max_value=80),
    due_hours=st.integers(min_value=1, max_value=40),
)
def test_as_of_equals_fold_of_events_valid_then(
    store: PostgresEventStore,
    worker_pool: ConnectionPool[Any],
    history: list[list[tuple[str, int]]],
    as_of_hours: int,
    due_hours: int,
) -> None:
    tenant = f"p-{uuid.uuid4().hex[:10]}"
    incidents = _append_histories(store, tenant, history, due_hours)
    as_of = T0 + timedelta(hours=as_of_hours)
    projection = sla_projection()

    # What the world looked like at as_of: a fold of exactly the events valid by then.
    expected: dict[uuid.UUID, bool] = {}
    counts: dict[str | None, int] = {}
    for incident in incidents:
        state = None
        for event in store.read_stream(tenant, incident_stream_id(incident)):
            if event.occurred_at <= as_of:
                state = evolve_sla(state, event)
        if state is not None and state.status not in ("rejected", "duplicate"):
            expected[state.incident_id] = resolution_breached(state, as_of)
            counts[state.category] = counts.get(state.category, 0) + 1

    with worker_pool.connection() as conn, conn.transaction(force_rollback=True):
        events = [
            event
            for incident in incidents
            for event in store.read_stream(tenant, incident_stream_id(incident))
        ]
        projection.apply(conn, sorted(events, key=lambda event: event.position))
        verdicts = sla_verdicts(conn, tenant, as_of)
        summary = sla_summary(conn, tenant, as_of)

    assert verdicts == expected
    assert {key: value.total for key, value in summary["category"].items()} == counts
    assert sum(value.breached for value in summary["department"].values()) == sum(expected.values())


class _Unread(dict[str, Any]):
    """A payload that fails the test when anything reads it."""

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(
            "the SLA fold read the payload or metadata of an event type "
            "missing from SLA_PAYLOAD_TYPES"
        )

    get = __getitem__ = __contains__ = __iter__ = __len__ = keys = items = values = _fail


def test_sla_fold_ignores_unlisted_payloads() -> None:
    """A streaming batch gives the events outside SLA_PAYLOAD_TYPES empty payloads, so the
    fold must never look at them."""
    unread = sorted(lc.INCIDENT_EVENT_TYPES - SLA_PAYLOAD_TYPES)
    assert lc.INCIDENT_CLOSED in unread
    for event_type in unread:
        for before in (
            fold(),
            fold((lc.INFORMATION_REQUESTED, 1)),
            fold((lc.INCIDENT_RESOLVED, 2)),
            fold((lc.INCIDENT_CLOSED, 3)),
        ):
            event = replace(recorded(event_type, 5, 9), payload=_Unread(), metadata=_Unread())
            evolve_sla(before, event)
