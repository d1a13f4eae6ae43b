from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ledger.database import Database
from ledger.demo import seed_demo
from ledger.events import NewEvent, RecordedEvent
from ledger.ids import incident_stream_id
from ledger.lifecycle import REPORT_SUBMITTED
from ledger.store import Checkpoint, PostgresEventStore, read_after
from projections.base import Projection
from projections.runtime import (
    Projector,
    ReadAhead,
    catch_up,
    default_projections,
    load_checkpoint,
    project_batch,
)
from tests.conftest import project_everything

T0 = datetime(2026, 2, 1, 9, 0, tzinfo=UTC)


class RecordingProjection(Projection):
    """Remembers every event it was given, to check exactly-once delivery."""

    name = "recording"
    tables = ()

    def __init__(self) -> None:
        self.seen: list[RecordedEvent] = []

    def apply(self, conn: psycopg.Connection[Any], events: list[RecordedEvent]) -> None:
        self.seen.extend(events)


def submitted(incident_id: uuid.UUID, minutes: int = 0) -> NewEvent:
    return NewEvent(
        REPORT_SUBMITTED,
        {
            "incident_id": str(incident_id),
            "category": "Pothole",
            "description": "hole",
            "resolution_due_at": (T0 + timedelta(days=3)).isoformat(),
        },
        T0 + timedelta(minutes=minutes),
    )


def test_projector_waits_for_earlier_open_transaction(
    fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    early_id, late_id = uuid.uuid4(), uuid.uuid4()
    recording = RecordingProjection()
    incidents = default_projections()[0]

    early = fresh_database.connect_worker()
    early.execute("SELECT 1")  # open the transaction before taking a position
    fresh_store.append(
        "acme", incident_stream_id(early_id), [submitted(early_id)], expected_version=0, conn=early
    )
    fresh_store.append(
        "acme", incident_stream_id(late_id), [submitted(late_id, 5)], expected_version=0
    )

    with fresh_database.connect_worker() as conn:
        applied_while_open = project_batch(conn, recording, 100)
        project_batch(conn, incidents, 100)
        early.commit()
        early.close()
        applied_after_commit = project_batch(conn, recording, 100)
        project_batch(conn, incidents, 100)
        applied_again = project_batch(conn, recording, 100)
        rows = conn.execute("SELECT incident_id FROM incidents ORDER BY submitted_at").fetchall()

    assert applied_while_open == 0
    assert applied_after_commit == 2
    assert applied_again == 0
    assert [e.stream_id for e in recording.seen] == [
        incident_stream_id(early_id),
        incident_stream_id(late_id),
    ]
    assert [row[0] for row in rows] == [early_id, late_id]


def test_checkpoint_stops_a_second_owner(
    fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    incident = uuid.uuid4()
    fresh_store.append(
        "acme", incident_stream_id(incident), [submitted(incident)], expected_version=0
    )
    recording = RecordingProjection()

    # Two connections both read from the same checkpoint; only the first commit may move it.
    with fresh_database.connect_worker() as first, fresh_database.connect_worker() as second:
        assert project_batch(first, recording, 10) == 1
        assert project_batch(second, recording, 10) == 0
        with first.transaction():
            checkpoint = load_checkpoint(first, "recording")

    assert len(recording.seen) == 1
    assert checkpoint.position == recording.seen[0].position


def test_streaming_equals_fresh_fold(
    fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    seed_demo(fresh_store, "demo", incidents=60, seed=7, end=T0)
    projections = default_projections()

    # Small batches: many checkpoints, incidents split across batches.
    project_everything(fresh_database, batch_size=7)

    with fresh_database.connect_worker() as conn:
        events = read_after(conn, Checkpoint(), 100_000)
        for projection in projections:
            assert projection.read_all(conn) == projection.fold(events)  # type: ignore[attr-defined]


def _wait_for(condition: Any, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(message)


def _projector(database: Database, batch_size: int, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "DATABASE_URL": database.owner_conninfo,
        "CIVICPULSE_PROJECTOR_BATCH_SIZE": str(batch_size),
        "CIVICPULSE_PROJECTOR_POLL_SECONDS": "0.2",
        "CIVICPULSE_LOG_LEVEL": "WARNING",
    }
    with log.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "api.cli", "project"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=output,
        )


@pytest.mark.slow
def test_projector_killed_mid_batch_recovers(
    fresh_database: Database, fresh_store: PostgresEventStore, tmp_path: Path
) -> None:
    seed_demo(fresh_store, "demo", incidents=400, seed=11, end=T0)
    with fresh_database.connect_worker() as conn:
        events = read_after(conn, Checkpoint(), 1_000_000)
    last = (events[-1].tx_id, events[-1].position)

    def checkpoints() -> dict[str, tuple[int, int]]:
        with fresh_database.connect_worker() as conn:
            return {
                row[0]: (int(row[1]), int(row[2]))
                for row in conn.execute(
                    "SELECT projection, tx_id::text::bigint, position FROM projection_checkpoints"
                )
            }

    def in_batch() -> bool:
        with fresh_database.connect_worker() as conn:
            busy = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE "
                "'civicpulse-projector-%%' AND state IN ('active', 'idle in transaction')"
            ).fetchone()
        moved = [value for value in checkpoints().values() if (0, 0) < value < last]
        return bool(busy and busy[0]) and bool(moved)

    log = tmp_path / "projector.log"
    projector = _projector(fresh_database, batch_size=20, log=log)
    try:
        _wait_for(in_batch, 60, "the projector never started a batch")
        projector.send_signal(signal.SIGKILL)
        projector.wait(10)
    finally:
        if projector.poll() is None:
            projector.kill()
    partial = checkpoints()
    assert any(value < last for value in partial.values())

    restarted = _projector(fresh_database, batch_size=500, log=log)
    try:
        _wait_for(
            lambda: (
                len(checkpoints()) == len(default_projections())
                and all(v == last for v in checkpoints().values())
            ),
            120,
            "the restarted projector did not catch up",
        )
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(15) == 0, log.read_text()
    finally:
        if restarted.poll() is None:
            restarted.kill()

    with fresh_database.connect_worker() as conn:
        for projection in default_projections():
            assert projection.read_all(conn) == projection.fold(events)  # type: ignore[attr-defined]


class FailingProjection(RecordingProjection):
    name = "failing"

    def apply(self, conn: psycopg.Connection[Any], events: list[RecordedEvent]) -> None:
        raise KeyError("incident_id")


def test_failed_batch_names_events_and_rolls_back(
    fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    from projections.runtime import BatchFailed

    incident = uuid.uuid4()
    fresh_store.append(
        "acme", incident_stream_id(incident), [submitted(incident)], expected_version=0
    )

    with fresh_database.connect_worker() as conn:
        with pytest.raises(BatchFailed) as raised:
            project_batch(conn, FailingProjection(), 10)
        with conn.transaction():
            checkpoint = load_checkpoint(conn, "failing")

    assert incident_stream_id(incident) in str(raised.value)
    assert "positions" in str(raised.value)
    assert checkpoint == Checkpoint()


class PoisonedProjection(RecordingProjection):
    """Fails on reports in the category "poison", as a fold fails on a malformed event."""

    name = "poisoned"

    def apply(self, conn: psycopg.Connection[Any], events: list[RecordedEvent]) -> None:
        for event in events:
            if event.payload.get("category") == "poison":
                raise ValueError("unreadable category")
        super().apply(conn, events)


def test_failed_batch_names_the_failing_event(
    fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    from projections.runtime import BatchFailed

    incidents = [uuid.uuid4() for _ in range(3)]
    for number, incident in enumerate(incidents):
        event = submitted(incident, number)
        if number == 1:
            event = NewEvent(event.event_type, {**event.payload, "category": "poison"}, T0)
        fresh_store.append("acme", incident_stream_id(incident), [event], expected_version=0)
    projection = PoisonedProjection()

    with fresh_database.connect_worker() as conn:
        with pytest.raises(BatchFailed) as raised:
            project_batch(conn, projection, 10)
        with conn.transaction():
            checkpoint = load_checkpoint(conn, "poisoned")

    failed = raised.value
    assert failed.event is not None
    assert failed.event.stream_id == incident_stream_id(incidents[1])
    assert f"position {failed.event.position}," in str(failed)
    assert str(failed.event.event_id) in str(failed)
    assert isinstance(failed.__cause__, ValueError)
    assert checkpoint == Checkpoint()


def test_failing_worker_stores_last_error(
    fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    from projections.runtime import ProjectionWorker, projection_status

    incident = uuid.uuid4()
    fresh_store.append(
        "acme", incident_stream_id(incident), [submitted(incident)], expected_version=0
    )
    stop = threading.Event()
    worker = ProjectionWorker(
        fresh_database, FailingProjection(), batch_size=10, poll_seconds=0.1, stop=stop
    )
    worker.start()
    try:
        deadline = time.monotonic() + 30
        failing = None
        while time.monotonic() < deadline and failing is None:
            with fresh_database.connect_worker() as conn:
                rows = {item.name: item for item in projection_status(conn)}
            failing = rows.get("failing")
            if failing is None or failing.last_error is None:
                failing = None
                time.sleep(0.1)
    finally:
        stop.set()
        worker.join(10)

    assert failing is not None
    assert failing.last_error is not None
    assert incident_stream_id(incident) in failing.last_error
    assert "incident_id" in failing.last_error
    assert failing.events_behind >= 1
    assert failing.lag_seconds > 0


def test_catch_up_skips_owned_projection(
    fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    from projections.runtime import try_own

    incident = uuid.uuid4()
    fresh_store.append(
        "acme", incident_stream_id(incident), [submitted(incident)], expected_version=0
    )
    incidents, sla = default_projections()[:2]

    with fresh_database.connect_worker(autocommit=True) as owner:
        assert try_own(owner, sla)
        applied, skipped = catch_up(fresh_database, [incidents, sla])

    assert applied == 1
    assert skipped == ["sla"]


def _checkpoint_of(event: RecordedEvent) -> Checkpoint:
    return Checkpoint(event.tx_id, event.position)


def test_read_ahead_dropped_when_checkpoint_moves(
    fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    for minutes in range(6):
        incident = uuid.uuid4()
        fresh_store.append(
            "acme", incident_stream_id(incident), [submitted(incident, minutes)], expected_version=0
        )
    with fresh_database.connect_worker() as conn:
        log = read_after(conn, Checkpoint(), 100)
    recording = RecordingProjection()

    with (
        fresh_database.connect_worker() as conn,
        ReadAhead(fresh_database, recording.name, 2) as read_ahead,
    ):
        # The first batch is full, so the batch after it is read ahead.
        assert project_batch(conn, recording, 2, read_ahead) == 2
        # Another process (a rebuild's swap, say) moves the checkpoint past events 3 and 4.
        conn.execute(
            "UPDATE projection_checkpoints SET tx_id = %s::text::xid8, position = %s "
            "WHERE projection = %s",
            (str(log[3].tx_id), log[3].position, recording.name),
        )
        conn.commit()
        applied = project_batch(conn, recording, 2, read_ahead)
        applied_last = project_batch(conn, recording, 2, read_ahead)

    assert applied == 2
    assert applied_last == 0
    assert [event.position for event in recording.seen] == [
        event.position for event in log[:2] + log[4:]
    ]


def test_read_ahead_applies_each_event_once_in_order(
    fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    """Writers append while a reader with read-ahead projects. Some of them commit
    transactions that took their ids early, so the log order is not the commit order."""
    errors: list[BaseException] = []

    def write(seed: int) -> None:
        try:
            for round_number in range(15):
                incident = uuid.uuid4()
                new = [submitted(incident, round_number)]
                if round_number % 4 == seed % 4:
                    # Take a transaction id, let others commit, then commit late.
                    with fresh_database.connect_worker() as held:
                        held.execute("SELECT pg_current_xact_id()")
                        time.sleep(0.05)
                        fresh_store.append(
                            "acme", incident_stream_id(incident), new, expected_version=0, conn=held
                        )
                        held.commit()
                else:
                    fresh_store.append(
                        "acme", incident_stream_id(incident), new, expected_version=0
                    )
        except BaseException as error:  # reported by the assertion below
            errors.append(error)

    writers = [threading.Thread(target=write, args=(seed,)) for seed in range(4)]
    recording = RecordingProjection()
    with (
        fresh_database.connect_worker() as conn,
        ReadAhead(fresh_database, recording.name, 3) as read_ahead,
    ):
        for writer in writers:
            writer.start()
        while any(writer.is_alive() for writer in writers):
            project_batch(conn, recording, 3, read_ahead)
        # Other databases' transactions on the server can hold the horizon back for a while.
        deadline = time.monotonic() + 30
        while len(recording.seen) < 60 and time.monotonic() < deadline:
            if not project_batch(conn, recording, 3, read_ahead):
                time.sleep(0.05)
        log = read_after(conn, Checkpoint(), 1000)

    assert errors == []
    assert len(log) == 60
    assert [event.event_id for event in recording.seen] == [event.event_id for event in log]


def test_read_ahead_connection_lost_catches_up(
    fresh_database: Database, fresh_store: PostgresEventStore, caplog: pytest.LogCaptureFixture
) -> None:
    seed_demo(fresh_store, "demo", incidents=60, seed=5, end=T0)
    incidents = default_projections()[0]
    projector = Projector(fresh_database, [incidents], batch_size=10, poll_seconds=0.2)

    def read_ahead_backends() -> list[int]:
        with fresh_database.connect_owner() as conn:
            return [
                row[0]
                for row in conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name = 'civicpulse-read-ahead-incidents'"
                )
            ]

    def caught_up_with(events: list[RecordedEvent]) -> bool:
        with fresh_database.connect_worker() as conn, conn.transaction():
            return load_checkpoint(conn, "incidents") == _checkpoint_of(events[-1])

    projector.start()
    try:
        _wait_for(read_ahead_backends, 30, "the worker never read ahead")
        with fresh_database.connect_owner() as conn:
            for pid in read_ahead_backends():
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        # More events than a batch: the worker reads ahead again, on the lost connection.
        seed_demo(fresh_store, "demo-2", incidents=60, seed=6, end=T0)
        with fresh_database.connect_worker() as conn:
            events = read_after(conn, Checkpoint(), 1_000_000)
        _wait_for(
            lambda: caught_up_with(events),
            60,
            "the worker did not catch up after losing its read-ahead connection",
        )
    finally:
        projector.stop()

    assert "projection worker incidents lost its database connection" in caplog.text
    with fresh_database.connect_worker() as conn:
        assert incidents.read_all(conn) == incidents.fold(events)  # type: ignore[attr-defined]


def test_collector_threshold_raised_never_lowered(fresh_database: Database) -> None:
    import gc

    from projections.runtime import COLLECTOR_THRESHOLD

    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        catch_up(fresh_database, [RecordingProjection()])
        raised = gc.get_threshold()
        gc.set_threshold(COLLECTOR_THRESHOLD * 2, 5, 5)
        catch_up(fresh_database, [RecordingProjection()])
        left_alone = gc.get_threshold()
    finally:
        gc.set_threshold(*saved)

    assert raised == (COLLECTOR_THRESHOLD, 10, 10)
    assert left_alone == (COLLECTOR_THRESHOLD * 2, 5, 5)


def test_status_names_each_projection_owner(
    fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    from projections.runtime import projection_status

    seed_demo(fresh_store, "demo", incidents=5, seed=3, end=T0)
    incidents, sla = default_projections()[:2]
    catch_up(fresh_database, [sla])
    projector = Projector(fresh_database, [incidents], batch_size=100, poll_seconds=0.2)

    def owners() -> dict[str, str | None]:
        with fresh_database.connect_worker() as conn:
            return {item.name: item.owner for item in projection_status(conn)}

    projector.start()
    try:
        _wait_for(lambda: owners().get("incidents") is not None, 30, "no owner shown")
        while_running = owners()
    finally:
        projector.stop()
    _wait_for(lambda: owners().get("incidents") is None, 30, "the owner stayed after stop")

    assert while_running["incidents"] is not None
    assert while_running["incidents"].startswith("civicpulse-projector-incidents, pid ")
    assert while_running["sla"] is None
