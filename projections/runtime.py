"""The streaming projector: one worker thread per projection.

Each worker owns its projection through a session-level advisory lock, so several projector
processes can run and another takes over when the owner dies. A batch is read below the
transaction horizon, applied, and the checkpoint moved, all in one transaction. So every
event has its effect exactly once, even when a projector is killed mid-batch (a test kills
one with SIGKILL and compares the tables with a fresh fold).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from ledger.database import Database
from ledger.events import RecordedEvent
from ledger.metrics import PROJECTION_EVENTS, PROJECTION_FAILURES, PROJECTION_LAG
from ledger.parking import parked_positions, without_parked
from ledger.store import Checkpoint, read_after
from projections.audit import audit_projection
from projections.base import Projection
from projections.grouping import grouping_projection
from projections.incidents import incidents_projection
from projections.sla import sla_projection
from projections.trends import trends_projection

logger = logging.getLogger(__name__)

# First key of the two-key advisory locks that mark projection ownership.
ADVISORY_LOCK_CLASS = 0x4350  # "CP"
# First key of the transaction-level locks that keep a batch and a rebuild's swap apart: each
# batch takes it for its transaction, and so does the swap, so neither runs during the other.
APPLY_LOCK_CLASS = 0x4352  # "CR"
NOTIFY_CHANNEL = "civicpulse_events"
# Maximum time a worker waiting for events takes to notice a stop request, in seconds.
STOP_CHECK_SECONDS = 0.5
# Shortest interval between two measurements of a worker's lag for its metrics.
LAG_MEASURE_SECONDS = 5.0
# While the database stays unreachable, a worker repeats its warning at most this often, in
# seconds, and logs the failed attempts in between at debug level.
RECONNECT_WARNING_SECONDS = 30.0
# Allocations between two young-generation passes of the cyclic garbage collector in a
# process that applies projections (Python's default is 700).
COLLECTOR_THRESHOLD = 100_000


def collect_less_often() -> None:
    """Raise this process's garbage collector threshold to COLLECTOR_THRESHOLD.

    A batch allocates hundreds of thousands of short-lived objects, and reference counting
    frees them, because the folds make almost no reference cycles. With the default
    threshold, the collector's passes took 8 to 15 percent of the CPU of a grouping
    catch-up over 300,000 events. The older generations keep their thresholds.
    """
    young, *older = gc.get_threshold()
    if young < COLLECTOR_THRESHOLD:
        gc.set_threshold(COLLECTOR_THRESHOLD, *older)


def default_projections() -> list[Projection]:
    return [
        incidents_projection(),
        sla_projection(),
        grouping_projection(),
        trends_projection(),
        audit_projection(),
    ]


def replayable_projections() -> list[Projection]:
    """Return the default projections that rebuilds, time travel and snapshots can fold."""
    return [projection for projection in default_projections() if projection.replayable]


def projection_named(name: str, *, replayable: bool = False) -> Projection:
    """Return the default projection called `name`; raise ValueError naming the known ones."""
    for projection in default_projections():
        if projection.name == name:
            if replayable and not projection.replayable:
                usable = ", ".join(item.name for item in replayable_projections())
                raise ValueError(
                    f"projection {name!r} cannot be rebuilt, replayed or snapshotted yet; "
                    f"these can: {usable}"
                )
            return projection
    known = ", ".join(projection.name for projection in default_projections())
    raise ValueError(f"unknown projection {name!r}; known projections: {known}")


def lock_for_apply(conn: psycopg.Connection[Any], name: str) -> None:
    """Wait for, and hold until the transaction ends, the lock that serializes a projection's
    batches with a rebuild's swap."""
    conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (APPLY_LOCK_CLASS, name))


def load_checkpoint(conn: psycopg.Connection[Any], name: str) -> Checkpoint:
    conn.execute(
        "INSERT INTO projection_checkpoints (projection) VALUES (%s) ON CONFLICT DO NOTHING",
        (name,),
    )
    row = conn.execute(
        "SELECT tx_id::text::bigint, position FROM projection_checkpoints WHERE projection = %s",
        (name,),
    ).fetchone()
    assert row is not None
    return Checkpoint(int(row[0]), int(row[1]))


@dataclass(frozen=True, slots=True)
class ProjectionProgress:
    """How far a projection has read the log."""

    name: str
    checkpoint: Checkpoint
    updated_at: datetime | None
    events_behind: int  # committed events of every tenant beyond the checkpoint, up to 10**6

    @property
    def caught_up(self) -> bool:
        return self.events_behind == 0


def projection_progress(conn: psycopg.Connection[Any]) -> dict[str, ProjectionProgress]:
    """Return each projection's checkpoint and how many committed events lie beyond it.

    Counts events of every tenant, whichever role `conn` has: the database function that
    counts them returns numbers only.
    """
    rows = conn.execute(
        "SELECT projection, tx_id, position, updated_at, events_behind FROM projection_lag()"
    ).fetchall()
    return {
        name: ProjectionProgress(name, Checkpoint(int(tx_id), position), updated_at, int(behind))
        for name, tx_id, position, updated_at, behind in rows
    }


@dataclass(frozen=True, slots=True)
class ProjectionStatus:
    """A projection's progress, lag and last error, for status pages."""

    name: str
    checkpoint: Checkpoint
    updated_at: datetime | None
    events_behind: int  # up to 10**6, as in ProjectionProgress
    # Seconds since the oldest event not applied yet was recorded; 0 when caught up.
    lag_seconds: float
    last_error: str | None
    last_error_at: datetime | None
    # The session that owns the projection, as "application name, pid N" (the server's
    # process id), or None when no projector of this database owns it.
    owner: str | None = None


def projection_owners(conn: psycopg.Connection[Any], names: list[str]) -> dict[str, str]:
    """Return the session that holds the ownership lock of each of `names` that is owned.

    The lock's second key is hashtext(name), which pg_locks shows as an unsigned objid.
    """
    rows = conn.execute(
        """
        SELECT p.name, a.application_name, a.pid
        FROM unnest(%s::text[]) AS p(name)
        JOIN pg_locks l
          ON l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objsubid = 2
         AND l.objid::bigint = hashtext(p.name)::bigint & 4294967295
         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
        JOIN pg_stat_activity a ON a.pid = l.pid
        """,
        (names, ADVISORY_LOCK_CLASS),
    ).fetchall()
    return {name: f"{application or 'a session'}, pid {pid}" for name, application, pid in rows}


def projection_status(conn: psycopg.Connection[Any]) -> list[ProjectionStatus]:
    """Return the status of each projection that has a checkpoint, by name, with the session
    that owns it."""
    rows = conn.execute(
        """
        SELECT projection, tx_id::text::bigint, position, updated_at, events_behind,
               COALESCE(extract(epoch FROM now() - oldest_pending_recorded_at), 0),
               last_error, last_error_at
        FROM projection_status()
        """
    ).fetchall()
    owners = projection_owners(conn, [row[0] for row in rows])
    return [
        ProjectionStatus(
            name,
            Checkpoint(int(tx_id), position),
            updated_at,
            int(behind),
            max(0.0, float(lag)),
            last_error,
            last_error_at,
            owners.get(name),
        )
        for name, tx_id, position, updated_at, behind, lag, last_error, last_error_at in rows
    ]


def record_error(conn: psycopg.Connection[Any], name: str, message: str) -> None:
    """Store a projection's last error beside its checkpoint (autocommit connection)."""
    # An upsert: a projection that failed its first batch has no checkpoint row yet.
    conn.execute(
        """
        INSERT INTO projection_checkpoints (projection, last_error, last_error_at)
        VALUES (%s, %s, now())
        ON CONFLICT (projection)
        DO UPDATE SET last_error = EXCLUDED.last_error, last_error_at = EXCLUDED.last_error_at
        """,
        (name, message[:2000]),
    )


class CheckpointMoved(Exception):
    """Another process advanced the checkpoint during this batch."""


class BatchFailed(Exception):
    """A projection failed to apply a batch; the batch was rolled back.

    `event` is the event that fails when the batch is applied one event at a time, or None
    when every event applies alone and only the batch as a whole fails.
    """

    def __init__(
        self,
        projection: str,
        first: RecordedEvent,
        last: RecordedEvent,
        event: RecordedEvent | None = None,
    ) -> None:
        self.projection = projection
        self.event = event
        if event is None:
            where = (
                f"events at positions {first.position}..{last.position} (first event "
                f"{first.event_id}, stream {first.stream_id})"
            )
        else:
            where = (
                f"event {event.event_id} ({event.event_type}) at position {event.position}, "
                f"tenant {event.tenant_id}, stream {event.stream_id}, in the batch at positions "
                f"{first.position}..{last.position}"
            )
        super().__init__(f"projection {projection} failed to apply {where}")


# The errors a malformed event or a bug in a fold raise. Connection errors are not among
# them: they pass through unchanged, to be retried on a new connection.
APPLY_ERRORS = (
    psycopg.errors.DataError,
    psycopg.errors.IntegrityError,
    KeyError,
    ValueError,
    TypeError,
)


def failing_event(
    conn: psycopg.Connection[Any], projection: Projection, events: list[RecordedEvent]
) -> tuple[RecordedEvent, BaseException] | None:
    """Return the first of `events` that fails to apply alone, with its error, or None.

    The events are applied one at a time in a transaction that is then rolled back.
    """
    with conn.transaction(force_rollback=True):
        lock_for_apply(conn, projection.name)
        for event in events:
            try:
                with conn.transaction():
                    projection.apply(conn, [event])
            except APPLY_ERRORS as error:
                return event, error
    return None


class ReadAhead:
    """Reads the batch after the one being applied, on a connection and thread of its own.

    While a projection works through a backlog, its worker spends about a third of each
    batch waiting on the server: for the log read, and for the read-model writes. Reading
    the next batch meanwhile lets the two overlap. The read is the one `project_batch` would
    make: events are never changed, and no event can appear below the horizon a read used,
    so a batch read earlier after the same checkpoint is a prefix of what a read now would
    return. `project_batch` uses it only when the checkpoint it loads is the one the batch
    was read after, and reads for itself otherwise.
    """

    def __init__(
        self,
        database: Database,
        name: str,
        batch_size: int,
        payload_types: Collection[str] | None = None,
    ) -> None:
        """Read batches of `batch_size` events for the reader `name` (a projection's name),
        with the payloads of `payload_types` only, as `read_after` takes them."""
        self.database = database
        self.name = name
        self.batch_size = batch_size
        self.payload_types = payload_types
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"read-ahead-{name}")
        self._conn: psycopg.Connection[Any] | None = None
        self._pending: tuple[Checkpoint, Future[list[RecordedEvent]]] | None = None

    def request(self, after: Checkpoint) -> None:
        """Start reading the batch after `after`, dropping a read started earlier."""
        self._drop()
        self._pending = (after, self._executor.submit(self._read, after))

    def next_batch(self, conn: psycopg.Connection[Any], after: Checkpoint) -> list[RecordedEvent]:
        """Return the batch after `after`: the one read ahead when it was read after that
        checkpoint, or else one read now on `conn`. A full batch starts the read of the next,
        because more events are likely waiting."""
        events = self.take(after)
        if events is None:
            events = read_after(conn, after, self.batch_size, self.payload_types)
        if len(events) == self.batch_size:
            self.request(Checkpoint(events[-1].tx_id, events[-1].position))
        return events

    def take(self, after: Checkpoint) -> list[RecordedEvent] | None:
        """Return the batch read after `after`, or None when there is none to use: no read
        was started after that checkpoint, or the read found no events (a read now may).

        Raises what the read raised, such as a lost connection.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        started_after, future = pending
        if started_after != after:
            future.cancel()
            return None
        return future.result() or None

    def close(self) -> None:
        self._drop()
        self._executor.submit(self._close_connection).result()
        self._executor.shutdown()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _drop(self) -> None:
        if self._pending is not None:
            self._pending[1].cancel()
            self._pending = None

    def _read(self, after: Checkpoint) -> list[RecordedEvent]:
        # Runs on the executor's one thread, the only user of this connection.
        if self._conn is None or self._conn.closed:
            self._conn = self.database.connect_worker(
                autocommit=True, application_name=f"civicpulse-read-ahead-{self.name}"
            )
        try:
            return read_after(self._conn, after, self.batch_size, self.payload_types)
        except psycopg.OperationalError:
            self._close_connection()
            raise

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def read_ahead_for(database: Database, projection: Projection, batch_size: int) -> ReadAhead:
    return ReadAhead(database, projection.name, batch_size, projection.payload_types)


def project_batch(
    conn: psycopg.Connection[Any],
    projection: Projection,
    batch_size: int,
    read_ahead: ReadAhead | None = None,
) -> int:
    """Apply the next batch of events to `projection`; return how many were applied.

    Runs in one transaction on `conn`. The checkpoint update names the checkpoint the batch
    started from, so two processes that both believe they own the projection cannot apply
    the same events twice: the second commit fails and rolls back. With `read_ahead`, the
    batch comes from it when it was read after this checkpoint, and a full batch starts the
    read of the next one.
    """
    failure: BaseException | None = None
    with conn.transaction():
        # The batch writes only derived rows and the checkpoint, in this one transaction. A
        # crash can lose the last batches committed this way, never half of one, and the
        # projector then applies them again from the checkpoint that was kept. So the
        # commit need not wait for the WAL flush.
        conn.execute("SET LOCAL synchronous_commit = off")
        lock_for_apply(conn, projection.name)
        start = load_checkpoint(conn, projection.name)
        if read_ahead is not None:
            read = read_ahead.next_batch(conn, start)
        else:
            read = read_after(conn, start, batch_size, projection.payload_types)
        if not read:
            return 0
        # The checkpoint moves past the parked events too.
        last = read[-1]
        events = read
        if projection.parkable:
            parked = parked_positions(conn, projection.name, read[0].position, last.position)
            events = without_parked(read, parked)
        try:
            if events:
                projection.apply(conn, events)
        except APPLY_ERRORS as error:
            failure = error
            raise psycopg.Rollback() from error
        moved = conn.execute(
            """
            UPDATE projection_checkpoints
            SET tx_id = %s::text::xid8, position = %s, updated_at = now()
            WHERE projection = %s AND tx_id = %s::text::xid8 AND position = %s
            """,
            (str(last.tx_id), last.position, projection.name, str(start.tx_id), start.position),
        )
        if moved.rowcount != 1:
            raise CheckpointMoved(projection.name)
        return len(read)
    # The batch was rolled back. Name the event that fails, so that an operator can find it.
    assert failure is not None
    found = failing_event(conn, projection, events)
    if found is None:
        raise BatchFailed(projection.name, read[0], read[-1]) from failure
    event, error = found
    raise BatchFailed(projection.name, read[0], read[-1], event) from error


def try_own(conn: psycopg.Connection[Any], projection: Projection) -> bool:
    """Take the session-level advisory lock that marks ownership of `projection`."""
    row = conn.execute(
        "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (ADVISORY_LOCK_CLASS, projection.name)
    ).fetchone()
    return bool(row and row[0])


def catch_up(
    database: Database, projections: Sequence[Projection], batch_size: int = 2000
) -> tuple[int, list[str]]:
    """Project every event below the horizon, in this thread.

    Projections owned by a running projector are skipped: their owner applies the events.
    Returns the number of events applied and the names of the skipped projections.
    """
    collect_less_often()
    total = 0
    skipped = []
    with database.connect_worker(autocommit=True) as lock_conn, database.connect_worker() as conn:
        for projection in projections:
            if not try_own(lock_conn, projection):
                logger.info(
                    "projection %s is owned by a running projector; skipped", projection.name
                )
                skipped.append(projection.name)
                continue
            with read_ahead_for(database, projection, batch_size) as read_ahead:
                while applied := project_batch(conn, projection, batch_size, read_ahead):
                    total += applied
    return total, skipped


class ProjectionWorker(threading.Thread):
    """Keeps one projection up to date until stopped."""

    def __init__(
        self,
        database: Database,
        projection: Projection,
        *,
        batch_size: int,
        poll_seconds: float,
        stop: threading.Event,
    ) -> None:
        super().__init__(name=f"projection-{projection.name}", daemon=True)
        self.database = database
        self.projection = projection
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        self.stop_event = stop
        self.applied = 0
        self._lag_measured_at = -LAG_MEASURE_SECONDS
        # Set while the database is unreachable: when the connection was lost, how many
        # reconnect attempts have failed since, and when the last warning was logged.
        self._lost_at: float | None = None
        self._failed_reconnects = 0
        self._warned_at = 0.0

    def run(self) -> None:
        logger.info("projection worker %s started", self.projection.name)
        while not self.stop_event.is_set():
            try:
                self._own_and_project()
            except psycopg.OperationalError as error:
                self._log_connection_error(error)
                self.stop_event.wait(self.poll_seconds)
            except BatchFailed as error:
                PROJECTION_FAILURES.labels(self.projection.name).inc()
                # A poison event stops this projection only. Its batch was rolled back and is
                # retried after each poll interval, until a fix is deployed.
                logger.error("%s: %s; retrying in %.1fs", error, error.__cause__, self.poll_seconds)
                self._record_error(f"{error}: {error.__cause__}")
                self.stop_event.wait(self.poll_seconds)
        logger.info(
            "projection worker %s stopped after %d events", self.projection.name, self.applied
        )

    def _record_error(self, message: str) -> None:
        try:
            with self.database.connect_worker(autocommit=True) as conn:
                record_error(conn, self.projection.name, message)
        except psycopg.Error as error:
            logger.warning(
                "projection worker %s could not store its last error: %s",
                self.projection.name,
                error,
            )

    def _log_connection_error(self, error: psycopg.OperationalError) -> None:
        now = time.monotonic()
        name = self.projection.name
        if self._lost_at is None:
            self._lost_at = self._warned_at = now
            self._failed_reconnects = 0
            logger.warning(
                "projection worker %s lost its database connection: %s; reconnecting every %.1fs",
                name,
                error,
                self.poll_seconds,
            )
            return
        self._failed_reconnects += 1
        if now - self._warned_at >= RECONNECT_WARNING_SECONDS:
            self._warned_at = now
            logger.warning(
                "projection worker %s still cannot reach the database after %d attempts in "
                "%.0fs: %s",
                name,
                self._failed_reconnects,
                now - self._lost_at,
                error,
            )
        else:
            logger.debug("projection worker %s reconnect attempt failed: %s", name, error)

    def _log_reconnected(self) -> None:
        if self._lost_at is None:
            return
        logger.info(
            "projection worker %s reconnected %.1fs after losing its connection "
            "(%d failed attempts)",
            self.projection.name,
            time.monotonic() - self._lost_at,
            self._failed_reconnects,
        )
        self._lost_at = None

    def _own_and_project(self) -> None:
        name = f"civicpulse-projector-{self.projection.name}"
        with self.database.connect_worker(autocommit=True, application_name=name) as lock_conn:
            self._log_reconnected()
            # Wait for ownership: the lock is held by this connection's session and released
            # by the server when the owning process dies.
            while not self.stop_event.is_set():
                if try_own(lock_conn, self.projection):
                    break
                self.stop_event.wait(self.poll_seconds)
            else:
                return
            logger.info("projection worker %s owns its projection", self.projection.name)
            with (
                self.database.connect_worker(application_name=name) as work_conn,
                self.database.connect_worker(autocommit=True, application_name=name) as listen_conn,
            ):
                listen_conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                with read_ahead_for(self.database, self.projection, self.batch_size) as read_ahead:
                    self._loop(work_conn, listen_conn, read_ahead)

    def _loop(
        self,
        work_conn: psycopg.Connection[Any],
        listen_conn: psycopg.Connection[Any],
        read_ahead: ReadAhead,
    ) -> None:
        while not self.stop_event.is_set():
            try:
                applied = project_batch(work_conn, self.projection, self.batch_size, read_ahead)
            except CheckpointMoved:
                logger.warning(
                    "projection %s checkpoint moved under this worker; re-reading",
                    self.projection.name,
                )
                continue
            self.applied += applied
            self._measure_lag(work_conn)
            if applied:
                PROJECTION_EVENTS.labels(self.projection.name).inc(applied)
                logger.debug("projection %s applied %d events", self.projection.name, applied)
                continue
            # Caught up: sleep until a notification or the poll interval. Notifications only
            # shorten the wait; polling finds events whose notification was missed. The wait
            # runs in short slices so that a stop request is seen within one of them.
            self._wait_for_notification(listen_conn)

    def _measure_lag(self, conn: psycopg.Connection[Any]) -> None:
        """Update the lag gauge, at most once per LAG_MEASURE_SECONDS: counting costs a query."""
        now = time.monotonic()
        if now - self._lag_measured_at < LAG_MEASURE_SECONDS:
            return
        self._lag_measured_at = now
        with conn.transaction():
            progress = projection_progress(conn).get(self.projection.name)
        if progress is not None:
            PROJECTION_LAG.labels(self.projection.name).set(progress.events_behind)

    def _wait_for_notification(self, listen_conn: psycopg.Connection[Any]) -> None:
        deadline = time.monotonic() + self.poll_seconds
        while not self.stop_event.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            for _ in listen_conn.notifies(timeout=min(remaining, STOP_CHECK_SECONDS), stop_after=1):
                return


class Projector:
    """Runs a worker thread per projection until `stop` is called."""

    def __init__(
        self,
        database: Database,
        projections: Sequence[Projection] | None = None,
        *,
        batch_size: int = 2000,
        poll_seconds: float = 1.0,
    ) -> None:
        self.stop_event = threading.Event()
        self.workers = [
            ProjectionWorker(
                database,
                projection,
                batch_size=batch_size,
                poll_seconds=poll_seconds,
                stop=self.stop_event,
            )
            for projection in (projections if projections is not None else default_projections())
        ]

    def start(self) -> None:
        collect_less_often()
        for worker in self.workers:
            worker.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        for worker in self.workers:
            worker.join(timeout)

    def run_forever(self) -> None:
        self.start()
        try:
            while not self.stop_event.wait(1.0):
                pass
        finally:
            self.stop()
