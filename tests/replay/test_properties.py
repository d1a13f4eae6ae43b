"""Property tests: streaming, rebuilds and replays of random histories give the same tables.

Histories have several incident streams, tenant configuration changes (categories and
duplicate grouping settings) in the middle, occurred_at out of order, and transactions that
commit out of position order. Reports are about 33 m apart, so the grouping model forms
groups, and staff merges and splits change them. recorded_at comes from the database, so
each history is appended in steps and read back.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from psycopg_pool import ConnectionPool

from ledger import lifecycle as lc
from ledger.database import Database
from ledger.events import NewEvent, RecordedEvent
from ledger.grouping import configure_grouping
from ledger.ids import incident_stream_id
from ledger.store import Checkpoint, PostgresEventStore, read_after
from ledger.tenants import configure_categories, create_tenant
from projections.runtime import project_batch, replayable_projections
from projections.sla import sla_projection
from projections.sla_queries import (
    sla_states_at,
    sla_summary,
    sla_summary_known_at,
    sla_verdicts,
    summarize_states,
    verdicts_of_states,
)
from replay.rebuild import rebuild
from replay.snapshots import take_snapshot
from replay.time_travel import replay
from tests.conftest import create_database, drop_database
from tests.ledger.audit_scenario import wait_for_horizon

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
FOLLOW_UPS = [
    lc.INCIDENT_ACKNOWLEDGED,
    lc.INCIDENT_ASSIGNED,
    lc.WORK_STARTED,
    lc.INFORMATION_REQUESTED,
    lc.REPORTER_RESPONDED,
    lc.INCIDENT_RESOLVED,
    lc.INCIDENT_REOPENED,
    lc.INCIDENT_CLOSED,
    lc.INCIDENT_REJECTED,
    lc.CLASSIFICATION_CORRECTED,
    lc.REPORTS_MERGED,
    lc.REPORT_SPLIT_FROM_GROUP,
]
# Report n is 0.0003 degrees of latitude (about 33 m) north of report n - 1.
LATITUDE, LONGITUDE = 42.3474, -71.0944


@dataclass(frozen=True)
class Step:
    """Appends in one transaction; `overtaken` steps take their transaction id first and
    commit after the next step, so their events come later in position order."""

    appends: list[tuple[int, str, int]]  # (stream number, event type, minutes after T0)
    overtaken: bool
    configure: bool


steps = st.lists(
    st.builds(
        Step,
        appends=st.lists(
            st.tuples(
                st.integers(0, 3),
                st.sampled_from(FOLLOW_UPS),
                st.integers(-600, 6000),
            ),
            min_size=1,
            max_size=4,
        ),
        overtaken=st.booleans(),
        configure=st.booleans(),
    ),
    min_size=2,
    max_size=6,
)


@pytest.fixture(scope="module")
def database(server_conninfo: str) -> Iterator[Database]:
    name, database = create_database(server_conninfo)
    yield database
    drop_database(server_conninfo, name)


@pytest.fixture(scope="module")
def store(database: Database) -> Iterator[PostgresEventStore]:
    pool: ConnectionPool[Any] = ConnectionPool(database.app_conninfo, min_size=1, max_size=4)
    with pool:
        yield PostgresEventStore(pool)


def _event(kind: str, incidents: list[uuid.UUID], stream: int, minutes: int) -> NewEvent:
    at = T0 + timedelta(minutes=minutes)
    payload: dict[str, Any] = {}
    if kind == lc.REPORT_SUBMITTED:
        payload = {
            "incident_id": str(incidents[stream]),
            "category": "Pothole",
            "description": "deep pothole in the road",
            "latitude": LATITUDE + 0.0003 * stream,
            "longitude": LONGITUDE,
            "resolution_due_at": (T0 + timedelta(hours=30)).isoformat(),
        }
    elif kind == lc.REPORTS_MERGED:
        # Another report of the history, possibly one not submitted yet: every fold skips
        # such a merge.
        other = incidents[(stream + 1 + minutes % 3) % len(incidents)]
        payload = {"with_incident": str(other)}
    elif kind == lc.INCIDENT_ASSIGNED:
        payload = {"assignee": "crew", "department": f"D{minutes % 3}"}
    elif kind == lc.CLASSIFICATION_CORRECTED:
        payload = {"category": f"C{minutes % 4}"}
    elif kind == lc.INCIDENT_REJECTED:
        payload = {"reason": "not ours", "redirect_to": "state"}
    return NewEvent(kind, payload, at)


def _append_history(
    database: Database, store: PostgresEventStore, tenant: str, history: list[Step]
) -> None:
    incidents = [uuid.uuid4() for _ in range(4)]
    submitted: set[int] = set()

    def append(conn: psycopg.Connection[Any], number: int, step: Step) -> None:
        for stream, kind, minutes in step.appends:
            event_kind = kind if stream in submitted else lc.REPORT_SUBMITTED
            submitted.add(stream)
            store.append(
                tenant,
                incident_stream_id(incidents[stream]),
                [_event(event_kind, incidents, stream, minutes)],
                expected_version=None,
                conn=conn,
            )
        if step.configure:
            configure_categories(
                store,
                tenant,
                {"categories": [{"name": f"Pothole {number}", "keywords": ["hole"]}]},
                occurred_at=T0 + timedelta(minutes=60 * number),
            )
            # Within 40 m only neighbouring reports match, and within 150 m all of them do.
            configure_grouping(
                store,
                tenant,
                {"distance_m": 40 if number % 2 else 150},
                occurred_at=T0 + timedelta(minutes=60 * number),
            )
        conn.commit()
        conn.close()

    # An overtaken step takes its transaction id, waits for the next step to commit, and
    # only then appends: its events get later positions but an earlier transaction id.
    pending: tuple[psycopg.Connection[Any], int, Step] | None = None
    for number, step in enumerate(history):
        conn = database.connect()
        if step.overtaken and pending is None:
            conn.execute("SELECT pg_current_xact_id()")
            pending = (conn, number, step)
            continue
        append(conn, number, step)
        if pending is not None:
            append(*pending)
            pending = None
    if pending is not None:
        append(*pending)


def _stream(database: Database, batch_sizes: list[int]) -> None:
    """Bring every projection up to date in batches of the given sizes, in turn.

    Waits first until the transaction horizon has passed the last event: a transaction in
    another database of the server can keep it back, and streaming reads only below it.
    """
    with database.connect_worker() as conn:
        row = conn.execute("SELECT max(tx_id)::text::bigint FROM events").fetchone()
        conn.commit()
    if row is not None and row[0] is not None:
        wait_for_horizon(database, row[0])
    with database.connect_worker() as conn:
        for projection in replayable_projections():
            turn = 0
            while project_batch(conn, projection, batch_sizes[turn % len(batch_sizes)]):
                turn += 1


def _tables(database: Database) -> dict[str, Any]:
    with database.connect_worker() as conn, conn.transaction():
        found: dict[str, Any] = {
            projection.name: projection.read_all(conn)  # type: ignore[attr-defined]
            for projection in replayable_projections()
        }
        found["sla versions"] = {
            (version.tenant_id, version.state.incident_id, version.valid_from): version
            for version in sla_projection().read_versions(conn)
        }
        return found


def _tenant_rows(tables: dict[str, Any], tenant: str) -> dict[str, Any]:
    return {
        name: {key: state for key, state in rows.items() if key[0] == tenant}
        for name, rows in tables.items()
    }


@pytest.mark.slow
@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    history=steps,
    batch_sizes=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    cut=st.floats(0.0, 1.0),
)
def test_streaming_rebuild_and_replay_agree(
    database: Database,
    store: PostgresEventStore,
    history: list[Step],
    batch_sizes: list[int],
    cut: float,
) -> None:
    tenant = f"p-{uuid.uuid4().hex[:10]}"
    create_tenant(store, tenant, name="P", time_zone="UTC", occurred_at=T0)
    split = max(1, int(len(history) * cut))
    _append_history(database, store, tenant, history[:split])

    # A snapshot in the middle of the history: later replays start from it.
    _stream(database, batch_sizes)
    with database.connect_worker() as conn:
        for projection in replayable_projections():
            take_snapshot(conn, projection, tenant)
    _append_history(database, store, tenant, history[split:])
    # The SLA model has not applied the second part yet.
    _check_known_summaries(database, tenant)

    _stream(database, batch_sizes)
    _check_known_summaries(database, tenant)
    # A second snapshot, after the whole history: a replay as of a valid time chooses
    # between the two by the time of each one's last event.
    with database.connect_worker() as conn:
        for projection in replayable_projections():
            take_snapshot(conn, projection, tenant)
    streamed = _tables(database)
    _check_valid_time_rows(database, tenant)
    for projection in replayable_projections():
        rebuild(database, projection, workers=1)
    rebuilt_once = _tables(database)
    for projection in replayable_projections():
        rebuild(database, projection, workers=2, min_partition_events=1)
    rebuilt_twice = _tables(database)
    mine_grouping = _tenant_rows(streamed, tenant)["grouping"]
    grouped = [row for key, row in mine_grouping.items() if key[1][0] == "report"]
    groups = {row[-1] for row in grouped}
    event("grouping: some group has several reports" if len(groups) < len(grouped) else "none")
    assert rebuilt_once == streamed
    assert rebuilt_twice == streamed

    with database.connect_worker() as conn:
        events = [e for e in read_after(conn, Checkpoint(), 1_000_000) if e.tenant_id == tenant]
    mine = _tenant_rows(streamed, tenant)
    moments_valid = sorted({e.occurred_at for e in events})
    moments_known = sorted({e.recorded_at for e in events})
    probes_valid = [moments_valid[0] - timedelta(seconds=1), *moments_valid[::2], None]
    probes_known = [moments_known[0] - timedelta(microseconds=1), *moments_known[::2], None]

    with database.connect() as conn:
        for projection in replayable_projections():
            now = replay(conn, projection, tenant)
            assert now.states == mine[projection.name]
            for as_of in probes_valid:
                for known_at in probes_known[:: max(1, len(probes_known) // 3)]:
                    kept = _valid(events, as_of, known_at)
                    expected = projection.fold(kept)
                    fast = replay(conn, projection, tenant, as_of=as_of, known_at=known_at)
                    slow = replay(
                        conn,
                        projection,
                        tenant,
                        as_of=as_of,
                        known_at=known_at,
                        use_snapshots=False,
                    )
                    assert fast.states == expected, (as_of, known_at, fast.snapshot_id)
                    if as_of is not None and projection.stream_keyed:
                        event(
                            "as_of with a stream-keyed model: from a snapshot"
                            if fast.snapshot_id is not None
                            else "as_of with a stream-keyed model: from nothing"
                        )
                    assert slow.states == expected, (as_of, known_at)
                    assert slow.snapshot_id is None


def _check_valid_time_rows(database: Database, tenant: str) -> None:
    """Check the SLA rows, verdicts and summary as of past valid times, read from the live
    rows and their versions, against a fold of the events that happened by then."""
    with database.connect_worker() as conn, conn.transaction():
        events = [e for e in read_after(conn, Checkpoint(), 1_000_000) if e.tenant_id == tenant]
    valid = sorted({e.occurred_at for e in events})
    probes = {valid[0] - timedelta(seconds=1), valid[-1] + timedelta(seconds=1)}
    for moment in valid:
        probes |= {moment - timedelta(microseconds=1), moment, moment + timedelta(seconds=30)}
    projection = sla_projection()
    with database.connect() as conn:
        for as_of in sorted(probes):
            folded = projection.fold(_valid(events, as_of, None))
            expected = {incident_id: state for (_, incident_id), state in folded.items()}
            assert sla_states_at(conn, tenant, as_of) == expected, as_of
            assert sla_verdicts(conn, tenant, as_of) == verdicts_of_states(expected.values(), as_of)
            assert sla_summary(conn, tenant, as_of) == summarize_states(expected.values(), as_of)


def _check_known_summaries(database: Database, tenant: str) -> None:
    """Check the SLA summary as known at past times against a fold of the events recorded
    by then, with and without a valid time, while the model lags or is up to date."""
    with database.connect_worker() as conn:
        row = conn.execute("SELECT max(tx_id)::text::bigint FROM events").fetchone()
        conn.commit()
    assert row is not None and row[0] is not None
    wait_for_horizon(database, row[0])
    with database.connect_worker() as conn, conn.transaction():
        events = [e for e in read_after(conn, Checkpoint(), 1_000_000) if e.tenant_id == tenant]
    recorded = sorted({e.recorded_at for e in events})
    valid = sorted({e.occurred_at for e in events})
    projection = sla_projection()
    with database.connect() as conn:
        for known_at in [recorded[0] - timedelta(microseconds=1), *recorded]:
            for as_of in [None, valid[len(valid) // 2], valid[-1]]:
                answer = sla_summary_known_at(conn, tenant, known_at, as_of)
                event(
                    "known_at summary: from the read model"
                    if answer is not None
                    else "known_at summary: left to a fold"
                )
                if answer is None:
                    continue
                states = projection.fold(_valid(events, as_of, known_at)).values()
                assert answer == summarize_states(states, as_of or known_at), (known_at, as_of)


def _valid(
    events: list[RecordedEvent], as_of: datetime | None, known_at: datetime | None
) -> list[RecordedEvent]:
    """Return exactly the events valid at `as_of` and recorded by `known_at`, in log order."""
    return [
        event
        for event in events
        if (as_of is None or event.occurred_at <= as_of)
        and (known_at is None or event.recorded_at <= known_at)
    ]
