"""The trends read model: streaming equals a fold, figures never go negative, and the
queries count reopens, reclassifications, flagged records and rankings as documented."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg_pool import ConnectionPool

from ledger import lifecycle as lc
from ledger.config_sections import apply_config
from ledger.errors import InvalidRequest
from ledger.events import NewEvent
from ledger.ids import incident_stream_id
from ledger.store import PostgresEventStore
from ledger.tenants import create_tenant
from projections.trends import TrendState, trends_projection
from projections.trends_queries import (
    PERIODS,
    TrendRow,
    duration_percentiles,
    rankings,
    trend_counts,
)
from tests.projections.test_sla_streaming import CONFIGS, T0, _log, _run, actions

ZONE = "America/New_York"
NOW = T0 + timedelta(days=30)


def _projected(
    conn: psycopg.Connection[Any], pool: ConnectionPool[Any], tenant: str, cuts: list[int]
) -> None:
    events = _log(pool, tenant)
    projection = trends_projection()
    start = 0
    for size in [*cuts, len(events)]:
        projection.apply(conn, events[start : start + size])
        start += size


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
    tenant = f"tr-{uuid.uuid4().hex[:10]}"
    _run(store, tenant, plan)
    events = _log(worker_pool, tenant)
    projection = trends_projection()

    with worker_pool.connection() as conn, conn.transaction(force_rollback=True):
        _projected(conn, worker_pool, tenant, cuts)
        stored = {
            key: value for key, value in projection.read_all(conn).items() if key[0] == tenant
        }
        configs = {
            key: value for key, value in projection.read_configs(conn).items() if key[0] == tenant
        }

    assert stored == projection.fold(events)
    assert configs == projection.fold_configs(events)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    plan=actions,
    period=st.sampled_from(PERIODS),
    by=st.sampled_from([None, "category", "department", "area"]),
    now_hours=st.integers(min_value=-100, max_value=400),
)
def test_no_figure_is_ever_negative(
    store: PostgresEventStore,
    worker_pool: ConnectionPool[Any],
    plan: list[Any],
    period: str,
    by: str | None,
    now_hours: int,
) -> None:
    # Histories step back in time too (-5 hours), so some close before they open; the
    # clock may lie before some of the events.
    tenant = f"tn-{uuid.uuid4().hex[:10]}"
    _run(store, tenant, plan)
    now = T0 + timedelta(hours=now_hours)
    window = {"since": date(2026, 2, 1), "until": date(2026, 4, 30), "time_zone": ZONE}
    with worker_pool.connection() as conn, conn.transaction(force_rollback=True):
        _projected(conn, worker_pool, tenant, [])
        counts = trend_counts(conn, tenant, period=period, by=by, now=now, **window)
        durations = [
            row
            for measure in ("first_response", "resolution")
            for row in duration_percentiles(
                conn, tenant, measure=measure, period=period, by=by, now=now, **window
            )
        ]
        total = conn.execute(
            "SELECT count(*) FROM incident_trends WHERE tenant_id = %s", (tenant,)
        ).fetchone()
        shortest = conn.execute(
            "SELECT min(first_response_business_seconds), min(resolution_business_seconds) "
            "FROM incident_trends WHERE tenant_id = %s",
            (tenant,),
        ).fetchone()

    assert all(row.backlog >= 0 and row.opened >= 0 and row.closed >= 0 for row in counts)
    assert all(row.flagged <= row.opened for row in counts)
    assert total is not None and sum(row.opened for row in counts) == total[0]
    assert shortest is not None
    assert all(seconds is None or seconds >= 0 for seconds in shortest)
    for row in durations:
        assert row.count > 0
        assert min(row.business_median, row.business_p90) >= 0
        assert min(row.calendar_median, row.calendar_p90) >= 0
        assert row.business_median <= row.business_p90
        assert row.calendar_median <= row.calendar_p90


# Example histories: a tenant in New York, incidents opened on known days.


@pytest.fixture
def city(store: PostgresEventStore) -> str:
    tenant = f"tc-{uuid.uuid4().hex[:10]}"
    create_tenant(store, tenant, name="C", time_zone=ZONE, occurred_at=T0 - timedelta(days=10))
    apply_config(store, tenant, CONFIGS[2], occurred_at=T0 - timedelta(days=9))
    return tenant


def _incident(
    store: PostgresEventStore,
    tenant: str,
    opened: datetime,
    steps: list[tuple[str, datetime, dict[str, Any]]],
    **report: Any,
) -> uuid.UUID:
    incident = uuid.uuid4()
    events = [NewEvent(lc.REPORT_SUBMITTED, {"incident_id": str(incident), **report}, opened)]
    events += [NewEvent(kind, payload, at) for kind, at, payload in steps]
    store.append(tenant, incident_stream_id(incident), events, expected_version=0)
    return incident


def _append(
    store: PostgresEventStore, tenant: str, incident: uuid.UUID, kind: str, at: datetime, **p: Any
) -> None:
    stream = incident_stream_id(incident)
    version = len(store.read_stream(tenant, stream))
    store.append(tenant, stream, [NewEvent(kind, p, at)], expected_version=version)


def _counts(
    pool: ConnectionPool[Any], tenant: str, by: str | None = None, period: str = "day"
) -> dict[tuple[date, str | None], tuple[int, int, int, int]]:
    with pool.connection() as conn, conn.transaction(force_rollback=True):
        _projected(conn, pool, tenant, [])
        rows = trend_counts(
            conn,
            tenant,
            period=period,
            by=by,
            since=date(2026, 3, 1),
            until=date(2026, 3, 10),
            now=NOW,
            time_zone=ZONE,
        )
    return {
        (row.period, row.key): (row.opened, row.closed, row.backlog, row.flagged) for row in rows
    }


def test_reopen_and_reclassification_move_the_counts(
    store: PostgresEventStore, worker_pool: ConnectionPool[Any], city: str
) -> None:
    # 2026-03-05 14:00 UTC is 09:00 in New York.
    incident = _incident(
        store,
        city,
        T0,
        [(lc.INCIDENT_RESOLVED, T0 + timedelta(hours=2), {})],
        category="Pothole",
    )
    day = date(2026, 3, 5)
    assert _counts(worker_pool, city, "category")[(day, "Pothole")] == (1, 1, 0, 0)

    _append(store, city, incident, lc.INCIDENT_REOPENED, T0 + timedelta(days=1))
    _append(
        store,
        city,
        incident,
        lc.CLASSIFICATION_CORRECTED,
        T0 + timedelta(days=1, hours=1),
        category="Graffiti",
    )
    counts = _counts(worker_pool, city, "category")
    # The incident moved to Graffiti and is open again: in the backlog from the 5th on.
    assert (day, "Pothole") not in counts
    assert counts[(day, "Graffiti")] == (1, 0, 1, 0)
    assert counts[(date(2026, 3, 10), "Graffiti")] == (0, 0, 1, 0)

    _append(store, city, incident, lc.INCIDENT_CLOSED, T0 + timedelta(days=2))
    counts = _counts(worker_pool, city, "category")
    assert counts[(day, "Graffiti")] == (1, 0, 1, 0)
    assert counts[(date(2026, 3, 7), "Graffiti")] == (0, 1, 0, 0)
    assert (date(2026, 3, 8), "Graffiti") not in counts


def test_periods_follow_the_tenant_time_zone(
    store: PostgresEventStore, worker_pool: ConnectionPool[Any], city: str
) -> None:
    # 03:00 UTC on 2 March is 22:00 on 1 March in New York; 1 March 2026 is a Sunday.
    _incident(store, city, datetime(2026, 3, 2, 3, tzinfo=UTC), [], area="north")
    assert _counts(worker_pool, city, "area")[(date(2026, 3, 1), "north")] == (1, 0, 1, 0)
    weeks = _counts(worker_pool, city, "area", period="week")
    assert weeks[(date(2026, 2, 23), "north")] == (1, 0, 1, 0)
    months = _counts(worker_pool, city, None, period="month")
    assert months[(date(2026, 3, 1), None)] == (1, 0, 1, 0)


def test_impossible_records_are_flagged(
    store: PostgresEventStore, worker_pool: ConnectionPool[Any], city: str
) -> None:
    _incident(store, city, T0, [(lc.INCIDENT_CLOSED, T0 - timedelta(hours=3), {})])
    _incident(
        store,
        city,
        T0,
        [(lc.INCIDENT_CLOSED, T0 + timedelta(hours=4), {"anomalies": ["odd_status"]})],
    )
    _incident(store, city, T0, [(lc.INCIDENT_CLOSED, T0 + timedelta(hours=6), {})])
    future = _incident(store, city, NOW + timedelta(days=1), [])
    counts = _counts(worker_pool, city)
    assert counts[(date(2026, 3, 5), None)] == (3, 3, 0, 2)

    with worker_pool.connection() as conn, conn.transaction(force_rollback=True):
        _projected(conn, worker_pool, city, [])
        rows = duration_percentiles(
            conn,
            city,
            measure="resolution",
            period="month",
            by=None,
            since=date(2026, 3, 1),
            until=date(2026, 4, 30),
            now=NOW,
            time_zone=ZONE,
        )
        later = trend_counts(
            conn,
            city,
            period="month",
            by=None,
            since=date(2026, 4, 1),
            until=date(2026, 4, 30),
            now=NOW,
            time_zone=ZONE,
        )
    assert [(row.count, row.calendar_median) for row in rows] == [(1, 6 * 3600.0)]
    # Dated after the clock: counted in its month, and flagged.
    assert future and later == [TrendRow(date(2026, 4, 1), None, 1, 0, 1, 1)]


def _resolved_after(
    store: PostgresEventStore, tenant: str, department: str, hours: float, count: int
) -> None:
    for _ in range(count):
        _incident(
            store,
            tenant,
            T0,
            [(lc.INCIDENT_RESOLVED, T0 + timedelta(hours=hours), {})],
            department=department,
            resolution_due_at=(T0 + timedelta(hours=10)).isoformat(),
        )


def test_rankings_need_the_minimum_cases_and_break_ties(
    store: PostgresEventStore, worker_pool: ConnectionPool[Any], city: str
) -> None:
    _resolved_after(store, city, "Lone", 1, 1)  # one fast fix
    _resolved_after(store, city, "Beta", 1, 3)
    _resolved_after(store, city, "Alpha", 1, 3)
    _resolved_after(store, city, "Gamma", 1, 2)
    _resolved_after(store, city, "Gamma", 20, 1)
    # Still open and already late at NOW: a decided case; a report due later is not.
    _resolved_after(store, city, "Delta", 1, 3)
    _incident(
        store,
        city,
        T0,
        [],
        department="Delta",
        resolution_due_at=(T0 + timedelta(hours=1)).isoformat(),
    )
    _incident(
        store,
        city,
        T0,
        [],
        department="Delta",
        resolution_due_at=(NOW + timedelta(days=3)).isoformat(),
    )

    with worker_pool.connection() as conn, conn.transaction(force_rollback=True):
        _projected(conn, worker_pool, city, [])
        table = rankings(conn, city, by="department", min_cases=3, now=NOW, time_zone=ZONE)
        with pytest.raises(InvalidRequest, match="min_cases 0"):
            rankings(conn, city, by="department", min_cases=0, now=NOW, time_zone=ZONE)
        with pytest.raises(InvalidRequest, match="'category'"):
            rankings(conn, city, by="category", now=NOW, time_zone=ZONE)

    assert [(row.rank, row.key, row.cases, row.on_time) for row in table] == [
        (1, "Alpha", 3, 3),
        (2, "Beta", 3, 3),
        (3, "Delta", 4, 3),
        (4, "Gamma", 3, 2),
    ]


def test_business_durations_use_the_policy_calendar(
    store: PostgresEventStore, worker_pool: ConnectionPool[Any], city: str
) -> None:
    apply_config(store, city, CONFIGS[0], occurred_at=T0 - timedelta(days=1))
    # Thursday 5 March 09:00 New York; the office opens Monday 08-12 and 13-17, Wednesday
    # 09-24 and Saturday 00-06; 9 March is a holiday. Resolved on Monday 16 March 10:00:
    # two Saturdays of 6 hours, one Wednesday of 15 and 2 hours on the 16th.
    resolved = datetime(2026, 3, 16, 14, tzinfo=UTC)
    _incident(
        store, city, T0, [(lc.INCIDENT_RESOLVED, resolved, {})], severity="low", category="Pothole"
    )
    with worker_pool.connection() as conn, conn.transaction(force_rollback=True):
        _projected(conn, worker_pool, city, [])
        rows = duration_percentiles(
            conn,
            city,
            measure="resolution",
            period="month",
            by="category",
            since=date(2026, 3, 1),
            until=date(2026, 3, 31),
            now=NOW,
            time_zone=ZONE,
        )
    assert len(rows) == 1
    assert rows[0].calendar_median == (resolved - T0).total_seconds()
    assert rows[0].business_median == pytest.approx((6 + 15 + 6 + 2) * 3600.0)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"period": "year"}, "invalid period 'year'"),
        ({"by": "colour"}, "invalid by 'colour'"),
        ({"since": date(2026, 5, 1)}, "since 2026-05-01 is after until"),
        ({"since": date(2000, 1, 1)}, "more than 1000 days"),
    ],
)
def test_bad_parameters_name_the_value(
    worker_pool: ConnectionPool[Any], arguments: dict[str, Any], message: str
) -> None:
    query: dict[str, Any] = {
        "period": "day",
        "by": None,
        "since": date(2026, 3, 1),
        "until": date(2026, 3, 31),
        "now": NOW,
        "time_zone": ZONE,
    } | arguments
    with worker_pool.connection() as conn, pytest.raises(InvalidRequest, match=message):
        trend_counts(conn, "nobody", **query)


def _written_state(incident: uuid.UUID, category: Any) -> TrendState:
    return TrendState(
        incident_id=incident,
        category=category,
        department=None,
        status="resolved",
        submitted_at=T0,
        first_response_due_at=None,
        first_response_at=T0 + timedelta(hours=2),
        resolution_due_at=T0 + timedelta(hours=10),
        resolved_at=T0 + timedelta(hours=2),
        closed_at=None,
        paused_since=None,
        paused_seconds=0.0,
        earliest_occurred_at=T0,
        latest_occurred_at=T0 + timedelta(hours=2),
        pauses=[[T0.isoformat(), (T0 + timedelta(hours=1)).isoformat()]],
        earliest_recorded_at=T0,
        known_since=T0 + timedelta(hours=2),
        anomalies=["odd_status"],
        flagged=True,
        first_response_business_seconds=7200.0,
    )


def test_write_copies_binary_or_falls_back(
    worker_pool: ConnectionPool[Any], caplog: pytest.LogCaptureFixture
) -> None:
    projection = trends_projection()
    tenant = f"tw-{uuid.uuid4().hex[:10]}"
    plain = _written_state(uuid.uuid4(), "Pothole")
    # An int where the text column expects a str: a binary COPY rejects it, and the
    # batch is copied as text, which stores it as the server reads "7".
    odd = _written_state(uuid.uuid4(), 7)
    with (
        caplog.at_level(logging.WARNING, logger="projections.base"),
        worker_pool.connection() as conn,
        conn.transaction(force_rollback=True),
    ):
        projection.write(conn, {(tenant, f"incident-{plain.incident_id}"): plain})
        binary_warnings = len(caplog.records)
        projection.write(conn, {(tenant, f"incident-{odd.incident_id}"): odd})
        stored = {key[1]: state for key, state in projection.read_all(conn).items()}

    assert binary_warnings == 0
    assert stored[plain.incident_id] == plain
    assert stored[odd.incident_id].category == "7"
    assert stored[odd.incident_id].pauses == odd.pauses
    assert "copying them as text" in caplog.text
