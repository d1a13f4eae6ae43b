"""The scheduler: one active process at a time, takeover, stopping, and its seal job."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from ledger.database import Database
from ledger.events import NewEvent
from ledger.ids import incident_stream_id, new_id
from ledger.scheduler import SCHEDULER_LOCK, ScheduledJob, Scheduler
from ledger.settings import Settings
from ledger.store import PostgresEventStore
from ledger.tenants import create_tenant
from ledger.verification import verify
from tests.ledger.seal_helpers import T0, add_incidents, stored_seals

# Short intervals so that the in-process tests take seconds, not minutes.
FAST = {"lock_retry_seconds": 0.2, "lock_check_seconds": 0.2}


def wait_for(condition: Callable[[], bool], timeout: float, message: str) -> float:
    """Wait until `condition()` is true; return the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(message)
        time.sleep(0.05)
    return time.monotonic() - started


def recording_job(name: str, runs: list[str], interval: float = 0.2) -> ScheduledJob:
    def record(stop: threading.Event) -> None:
        runs.append(name)

    return ScheduledJob("record", interval, record)


@pytest.fixture
def running() -> Iterator[Callable[[Scheduler], threading.Thread]]:
    """Start schedulers in threads, and stop them when the test ends."""
    started: list[tuple[Scheduler, threading.Thread]] = []

    def start(scheduler: Scheduler) -> threading.Thread:
        thread = threading.Thread(target=scheduler.run_forever, daemon=True)
        thread.start()
        started.append((scheduler, thread))
        return thread

    yield start
    for scheduler, _ in started:
        scheduler.stop()
    for _, thread in started:
        thread.join(10)


def test_one_scheduler_active_at_a_time(
    database: Database, running: Callable[[Scheduler], threading.Thread]
) -> None:
    runs: list[str] = []
    first = Scheduler(database, [recording_job("first", runs)], **FAST)
    second = Scheduler(database, [recording_job("second", runs)], **FAST)
    first_thread = running(first)
    wait_for(first.active.is_set, 10, "the first scheduler never became active")
    running(second)
    time.sleep(1.0)

    assert not second.active.is_set()
    assert set(runs) == {"first"}
    assert len(runs) >= 3

    first.stop()
    first_thread.join(10)
    takeover = wait_for(second.active.is_set, 10, "the standby never took over")
    wait_for(lambda: "second" in runs, 10, "the standby never ran its job")

    assert not first_thread.is_alive()
    assert takeover < 2
    assert "first" not in runs[runs.index("second") :]


def test_failing_job_is_logged_and_runs_again(
    database: Database,
    running: Callable[[Scheduler], threading.Thread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    attempts: list[float] = []

    def fail(stop: threading.Event) -> None:
        attempts.append(time.monotonic())
        raise RuntimeError("disk full")

    scheduler = Scheduler(database, [ScheduledJob("flaky", 0.2, fail)], **FAST)
    with caplog.at_level(logging.ERROR, logger="ledger.scheduler"):
        running(scheduler)
        wait_for(lambda: len(attempts) >= 3, 10, "the failing job did not run again")

    failures = [r for r in caplog.records if "scheduled job flaky failed" in r.getMessage()]
    assert len(failures) >= 2
    assert failures[0].exc_info is not None
    assert "disk full" in str(failures[0].exc_info[1])
    assert scheduler.active.is_set()


@pytest.mark.parametrize(
    ("jobs", "message"),
    [
        ([], "at least one job"),
        (
            [
                ScheduledJob("seal", 1, lambda stop: None),
                ScheduledJob("seal", 2, lambda stop: None),
            ],
            "must be unique",
        ),
    ],
)
def test_scheduler_rejects_bad_jobs(
    database: Database, jobs: list[ScheduledJob], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Scheduler(database, jobs)


@pytest.mark.parametrize("value", ["0", "-5", "86401", "1.5", "five minutes"])
def test_seal_interval_setting_rejects(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CIVICPULSE_SEAL_INTERVAL_SECONDS", value)

    with pytest.raises(ValidationError, match="seal_interval_seconds"):
        Settings()


def test_seal_interval_setting_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIVICPULSE_SEAL_INTERVAL_SECONDS", raising=False)
    default = Settings().seal_interval_seconds
    monkeypatch.setenv("CIVICPULSE_SEAL_INTERVAL_SECONDS", "60")

    assert default == 300
    assert Settings().seal_interval_seconds == 60


# Scheduler processes -------------------------------------------------------------------


def start_scheduler_process(database: Database, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "DATABASE_URL": database.owner_conninfo,
        "CIVICPULSE_SEAL_INTERVAL_SECONDS": "1",
        "CIVICPULSE_LOG_LEVEL": "INFO",
    }
    with log.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "api.cli", "schedule"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=output,
        )


def lock_holder(database: Database) -> int | None:
    """Return the process id of the scheduler that holds the lock, from its
    connection's application name."""
    with database.connect_owner() as conn:
        row = conn.execute(
            """
            SELECT a.application_name FROM pg_locks AS l JOIN pg_stat_activity AS a USING (pid)
            WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 0
              AND l.objid::bigint = %s AND l.objsubid = 1
              AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
            """,
            (SCHEDULER_LOCK,),
        ).fetchone()
    if row is None:
        return None
    return int(row[0].rsplit("-", 1)[1])


def sealing_processes(database: Database, tenant_id: str) -> list[int]:
    """Return the process id that wrote each of the tenant's seals, in seal order."""
    return [
        int(seal.metadata["process"].rsplit(":", 1)[1])
        for seal in stored_seals(database, tenant_id)
    ]


def sealed_past(database: Database, position: int) -> Callable[[], bool]:
    """Return a check that tenant acme's seals cover the event at `position`."""

    def covered() -> bool:
        seals = stored_seals(database, "acme")
        return bool(seals) and seals[-1].payload["through"]["position"] >= position

    return covered


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_scheduler_process_seals_and_stops_on_sigterm(
    fresh_database: Database,
    fresh_store: PostgresEventStore,
    processes: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    create_tenant(fresh_store, "acme", name="Acme", time_zone="UTC", occurred_at=T0)
    add_incidents(fresh_store, "acme", 3)
    log = tmp_path / "scheduler.log"
    scheduler = start_scheduler_process(fresh_database, log)
    processes.append(scheduler)

    wait_for(lambda: lock_holder(fresh_database) == scheduler.pid, 60, log.read_text())
    wait_for(lambda: bool(stored_seals(fresh_database, "acme")), 60, log.read_text())
    scheduler.send_signal(signal.SIGTERM)
    code = scheduler.wait(10)

    assert code == 0, log.read_text()
    assert lock_holder(fresh_database) is None
    assert set(sealing_processes(fresh_database, "acme")) == {scheduler.pid}
    assert "scheduler released the scheduler lock" in log.read_text()


@pytest.mark.slow
def test_standby_scheduler_takes_over_after_kill(
    fresh_database: Database,
    fresh_store: PostgresEventStore,
    processes: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    create_tenant(fresh_store, "acme", name="Acme", time_zone="UTC", occurred_at=T0)
    add_incidents(fresh_store, "acme", 2)
    log = tmp_path / "schedulers.log"
    processes.extend(start_scheduler_process(fresh_database, log) for _ in range(2))
    by_pid = {process.pid: process for process in processes}

    wait_for(lambda: lock_holder(fresh_database) in by_pid, 60, log.read_text())
    active = by_pid[lock_holder(fresh_database) or 0]
    standby = next(process for process in processes if process is not active)

    # Several seal runs while both processes are up: all from the active one.
    for _ in range(3):
        position = append_note(fresh_store)
        wait_for(sealed_past(fresh_database, position), 60, log.read_text())
    assert set(sealing_processes(fresh_database, "acme")) == {active.pid}
    assert lock_holder(fresh_database) == active.pid

    active.send_signal(signal.SIGKILL)
    active.wait(10)
    killed_at = time.monotonic()
    takeover = wait_for(
        lambda: lock_holder(fresh_database) == standby.pid, 10, "the standby did not take over"
    )
    position = append_note(fresh_store)
    wait_for(sealed_past(fresh_database, position), 60, log.read_text())

    writers = sealing_processes(fresh_database, "acme")
    switch = writers.index(standby.pid)
    assert takeover < 10
    assert time.monotonic() - killed_at < 70
    assert set(writers[:switch]) == {active.pid}
    assert set(writers[switch:]) == {standby.pid}
    result = verify(fresh_database)
    assert result.ok, result.mismatches  # seals link up, so no range was sealed twice

    standby.send_signal(signal.SIGTERM)
    assert standby.wait(10) == 0, log.read_text()


def append_note(store: PostgresEventStore) -> int:
    """Append one event to a new stream of tenant acme; return its position."""
    result = store.append(
        "acme", incident_stream_id(new_id()), [NewEvent("Noted", {}, T0)], expected_version=0
    )
    return result.positions[0]
