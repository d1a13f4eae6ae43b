"""Time-driven jobs, run by APScheduler in the one process that holds the scheduler lock.

Several scheduler processes may run, on one machine or many. The active one holds a
session-level advisory lock on a connection of its own and runs the jobs. The others try
to take the lock every few seconds. When the active process dies, its connection closes,
the server releases the lock, and a standby takes over at its next try.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from ledger.database import Database
from ledger.escalations import escalate
from ledger.metrics import SCHEDULER_RUNS
from ledger.seals import seal_all

logger = logging.getLogger(__name__)

# Key of the advisory lock held by the active scheduler. A single bigint key: PostgreSQL
# keeps these apart from the two-key locks that mark projection ownership.
SCHEDULER_LOCK = 0x43505343  # "CPSC"
# How often a standby tries to take the lock, and how often the active scheduler checks
# that its lock connection is still alive, in seconds.
LOCK_RETRY_SECONDS = 2.0
LOCK_CHECK_SECONDS = 2.0

JobFunction = Callable[[threading.Event], None]


@dataclass(frozen=True, slots=True)
class ScheduledJob:
    """A job run every `interval_seconds` while this process is the active scheduler.

    The function receives the scheduler's stop event and should return soon after it is
    set. The first run starts as soon as the process becomes active.
    """

    name: str
    interval_seconds: float
    function: JobFunction


def seal_job(database: Database, interval_seconds: float) -> ScheduledJob:
    """Build the job that seals each tenant's new events."""

    def seal(stop: threading.Event) -> None:
        report = seal_all(database, actor="scheduler", should_stop=stop.is_set)
        if report.sealed or report.failed:
            logger.info(
                "seal run: %d tenants sealed, %d unchanged, %d failed",
                len(report.sealed),
                len(report.unchanged),
                len(report.failed),
            )

    return ScheduledJob("seal", interval_seconds, seal)


def escalation_job(
    database: Database, interval_seconds: float, clock: Callable[[], datetime] | None = None
) -> ScheduledJob:
    """Build the job that appends SLA warning and breach escalations.

    `clock` returns the time to judge against (default: now, UTC); the job passes it to
    the judgement, which never reads the clock itself.
    """

    def run(stop: threading.Event) -> None:
        now = clock() if clock is not None else datetime.now(UTC)
        report = escalate(database, now, should_stop=stop.is_set)
        if report.appended or report.failed:
            logger.info(
                "escalation run: %d appended, %d already stored, %d failed",
                report.appended,
                report.already_stored,
                len(report.failed),
            )

    return ScheduledJob("escalation", interval_seconds, run)


def snapshot_job(database: Database, interval_seconds: float) -> ScheduledJob:
    """Build the job that snapshots each tenant's read models that have new events."""
    from replay.snapshots import snapshot_job_function

    return ScheduledJob("snapshot", interval_seconds, snapshot_job_function(database))


def default_jobs(
    database: Database,
    *,
    seal_interval_seconds: float,
    escalation_interval_seconds: float = 60,
    snapshot_interval_seconds: float = 3600,
) -> list[ScheduledJob]:
    return [
        seal_job(database, seal_interval_seconds),
        escalation_job(database, escalation_interval_seconds),
        snapshot_job(database, snapshot_interval_seconds),
    ]


class Scheduler:
    """Runs `jobs` whenever this process holds the scheduler lock, until stopped."""

    def __init__(
        self,
        database: Database,
        jobs: Sequence[ScheduledJob],
        *,
        lock_retry_seconds: float = LOCK_RETRY_SECONDS,
        lock_check_seconds: float = LOCK_CHECK_SECONDS,
    ) -> None:
        if not jobs:
            raise ValueError("a scheduler needs at least one job")
        names = [job.name for job in jobs]
        if len(set(names)) != len(names):
            raise ValueError(f"scheduled job names must be unique: {names}")
        self.database = database
        self.jobs = list(jobs)
        self.lock_retry_seconds = lock_retry_seconds
        self.lock_check_seconds = lock_check_seconds
        self.stop_event = threading.Event()
        # Set while this process holds the lock and its jobs are scheduled.
        self.active = threading.Event()

    def stop(self) -> None:
        self.stop_event.set()

    def run_forever(self) -> None:
        """Wait for the lock, run the jobs while holding it, and return once stopped."""
        logger.info("scheduler started with jobs %s", ", ".join(job.name for job in self.jobs))
        while not self.stop_event.is_set():
            try:
                self._hold_lock_and_run()
            except psycopg.OperationalError as error:
                logger.warning(
                    "scheduler lost its database connection: %s; retrying in %.1f s",
                    error,
                    self.lock_retry_seconds,
                )
                self.stop_event.wait(self.lock_retry_seconds)
        logger.info("scheduler stopped")

    def _hold_lock_and_run(self) -> None:
        name = f"civicpulse-scheduler-{os.getpid()}"
        with self.database.connect_worker(autocommit=True, application_name=name) as lock_conn:
            waiting_logged = False
            while not self.stop_event.is_set():
                if _try_lock(lock_conn):
                    break
                if not waiting_logged:
                    logger.info("another scheduler is active; this one is on standby")
                    waiting_logged = True
                self.stop_event.wait(self.lock_retry_seconds)
            else:
                return

            logger.info("scheduler is active: it acquired the scheduler lock")
            scheduler = self._start_jobs()
            self.active.set()
            try:
                # The session that holds the lock must stay alive. When the connection
                # breaks, the server has released the lock and a standby may take over, so
                # the jobs stop here. NOTE: a job run already under way finishes first, and a
                # new active scheduler may start before it ends. The seal job's append names
                # the expected version, so such an overlap stores one seal at most.
                while not self.stop_event.wait(self.lock_check_seconds):
                    lock_conn.execute("SELECT 1")
            finally:
                self.active.clear()
                scheduler.shutdown(wait=True)
                logger.info("scheduled jobs stopped")
            lock_conn.execute("SELECT pg_advisory_unlock(%s)", (SCHEDULER_LOCK,))
            logger.info("scheduler released the scheduler lock")

    def _start_jobs(self) -> BackgroundScheduler:
        scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=len(self.jobs))},
            # One run of a job at a time, and one catch-up run after a delay, however late.
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )
        now = datetime.now(UTC)
        for job in self.jobs:
            scheduler.add_job(
                self._run_job,
                IntervalTrigger(seconds=job.interval_seconds, timezone=UTC),
                args=[job],
                id=job.name,
                name=job.name,
                next_run_time=now,
            )
        scheduler.start()
        return scheduler

    def _run_job(self, job: ScheduledJob) -> None:
        if self.stop_event.is_set():
            return
        started = time.monotonic()
        try:
            job.function(self.stop_event)
        except Exception:
            # A failed run must not end the scheduler: the next interval runs the job again.
            # Jobs that work tenant by tenant log their own failures with the tenant id.
            logger.exception(
                "scheduled job %s failed; it runs again in %.0f s", job.name, job.interval_seconds
            )
            SCHEDULER_RUNS.labels(job.name, "failed").inc()
            return
        SCHEDULER_RUNS.labels(job.name, "ok").inc()
        logger.debug("scheduled job %s finished in %.2f s", job.name, time.monotonic() - started)


def _try_lock(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (SCHEDULER_LOCK,)).fetchone()
    return bool(row and row[0])
