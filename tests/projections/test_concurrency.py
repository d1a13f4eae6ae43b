"""The projector under concurrent writers, interleaved commits and a second projector."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.database import Database
from ledger.events import NewEvent, RecordedEvent
from ledger.ids import incident_stream_id
from ledger.lifecycle import INCIDENT_ACKNOWLEDGED, REPORT_SUBMITTED
from ledger.store import Checkpoint, PostgresEventStore, read_after
from projections.runtime import Projector, default_projections

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


def report(incident: uuid.UUID) -> NewEvent:
    return NewEvent(REPORT_SUBMITTED, {"incident_id": str(incident), "category": "Graffiti"}, T0)


def _wait_for(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    # For each writer transaction: when it appends and when it commits, as steps in one
    # global schedule. The reader polls after every step.
    schedule=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), min_size=2, max_size=6)
)
def test_reader_sees_each_event_once_whatever_commit_order(
    fresh_database: Database,
    fresh_store: PostgresEventStore,
    schedule: list[tuple[int, int]],
) -> None:
    tenant = f"h-{uuid.uuid4().hex[:8]}"
    steps: list[tuple[int, int, str]] = []
    for writer, (append_at, commit_after) in enumerate(schedule):
        steps.append((append_at, writer, "append"))
        steps.append((append_at + commit_after + 1, writer, "commit"))
    steps.sort()

    connections = [fresh_database.connect_worker() for _ in schedule]
    seen: list[tuple[int, int]] = []
    checkpoint = Checkpoint()
    appended: list[int] = []
    try:
        with fresh_database.connect_worker(autocommit=True) as reader:
            for _, writer, action in steps:
                conn = connections[writer]
                if action == "append":
                    conn.execute("SELECT 1")  # open the transaction
                    incident = uuid.uuid4()
                    result = fresh_store.append(
                        tenant,
                        incident_stream_id(incident),
                        [report(incident)],
                        expected_version=0,
                        conn=conn,
                    )
                    appended.extend(result.positions)
                else:
                    conn.commit()
                for event in read_after(reader, checkpoint, 1000):
                    if event.tenant_id == tenant:
                        seen.append((event.tx_id, event.position))
                    checkpoint = Checkpoint(event.tx_id, event.position)
            # The horizon is server-wide: a transaction in another database can keep the
            # last commits above it for a while, so go on reading until it passes them.
            deadline = time.monotonic() + 60
            while len(seen) < len(appended) and time.monotonic() < deadline:
                time.sleep(0.05)
                for event in read_after(reader, checkpoint, 1000):
                    if event.tenant_id == tenant:
                        seen.append((event.tx_id, event.position))
                    checkpoint = Checkpoint(event.tx_id, event.position)
    finally:
        for conn in connections:
            conn.close()

    assert sorted(position for _, position in seen) == sorted(appended)
    assert len(seen) == len(set(seen))
    assert seen == sorted(seen)


def test_notification_wakes_projector(
    fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    def projected(count: int) -> bool:
        with fresh_database.connect_worker() as conn:
            row = conn.execute("SELECT count(*) FROM incidents").fetchone()
        return row == (count,)

    # The poll interval is far longer than the waits below: once the workers are idle,
    # only LISTEN/NOTIFY can explain a quick update.
    projector = Projector(fresh_database, poll_seconds=60)
    first, second = uuid.uuid4(), uuid.uuid4()
    fresh_store.append("acme", incident_stream_id(first), [report(first)], expected_version=0)
    projector.start()
    try:
        # The first event is read by each worker's first batch, before it starts waiting.
        assert _wait_for(lambda: projected(1), 30)
        time.sleep(0.5)
        fresh_store.append("acme", incident_stream_id(second), [report(second)], expected_version=0)
        assert _wait_for(lambda: projected(2), 10)
    finally:
        stopping = time.monotonic()
        projector.stop()
        stop_seconds = time.monotonic() - stopping

    # Stopping does not wait out the 60 s poll interval.
    assert stop_seconds < 3
    assert not any(worker.is_alive() for worker in projector.workers)


def test_two_projectors_and_concurrent_writers(
    fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    projectors = [Projector(fresh_database, batch_size=5, poll_seconds=0.1) for _ in range(2)]
    for projector in projectors:
        projector.start()

    def write(writer: int) -> None:
        for _ in range(25):
            incident = uuid.uuid4()
            stream = incident_stream_id(incident)
            fresh_store.append("acme", stream, [report(incident)], expected_version=0)
            fresh_store.append(
                "acme", stream, [NewEvent(INCIDENT_ACKNOWLEDGED, {}, T0)], expected_version=1
            )

    writers = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    try:
        for thread in writers:
            thread.start()
        for thread in writers:
            thread.join()

        events: list[RecordedEvent] = []

        def all_below_horizon() -> bool:
            nonlocal events
            with fresh_database.connect_worker() as conn:
                events = read_after(conn, Checkpoint(), 100_000)
            return len(events) == 200

        # A projector batch that took its transaction id before the last appends keeps the
        # horizon below them until it commits. Only then is the last event readable.
        assert _wait_for(all_below_horizon, 30)
        last = (events[-1].tx_id, events[-1].position)

        def caught_up() -> bool:
            with fresh_database.connect_worker() as conn:
                rows = conn.execute("SELECT tx_id, position FROM projection_checkpoints").fetchall()
            return len(rows) == len(default_projections()) and all(
                (int(tx), pos) == last for tx, pos in rows
            )

        assert _wait_for(caught_up, 60)
    finally:
        for projector in projectors:
            projector.stop()

    assert len(events) == 200
    with fresh_database.connect_worker() as conn:
        for projection in default_projections():
            assert projection.read_all(conn) == projection.fold(events)  # type: ignore[attr-defined]
        owners = conn.execute("SELECT count(*) FROM incidents WHERE status = 'acknowledged'")
        assert owners.fetchone() == (100,)
