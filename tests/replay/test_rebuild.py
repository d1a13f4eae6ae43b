from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from ledger.config_sections import apply_config
from ledger.database import Database
from ledger.demo import seed_demo
from ledger.events import NewEvent, RecordedEvent
from ledger.ids import incident_stream_id
from ledger.lifecycle import (
    INCIDENT_ACKNOWLEDGED,
    REPORT_SPLIT_FROM_GROUP,
    REPORT_SUBMITTED,
    IncidentState,
    evolve,
)
from ledger.store import Checkpoint, PostgresEventStore, read_after
from projections.base import IncidentRowProjection
from projections.runtime import (
    APPLY_LOCK_CLASS,
    default_projections,
    load_checkpoint,
    projection_named,
)
from projections.sla import sla_projection
from replay.rebuild import (
    REBUILD_LOCK_CLASS,
    SHADOW_SCHEMA,
    RebuildFailed,
    RebuildReport,
    rebuild,
    rebuild_many,
)
from tests.conftest import project_everything

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


def tables(database: Database) -> dict[str, Any]:
    """Every default projection's rows and checkpoint, and the SLA model's row versions."""
    with database.connect_worker() as conn, conn.transaction():
        found: dict[str, Any] = {
            projection.name: (
                projection.read_all(conn),  # type: ignore[attr-defined]
                load_checkpoint(conn, projection.name),
            )
            for projection in default_projections()
        }
        found["sla versions"] = sla_projection().read_versions(conn)
        return found


def folded(database: Database, name: str) -> tuple[Any, Checkpoint]:
    """The table a fresh fold of every committed event gives, and the last event's place."""
    with database.connect_worker() as conn:
        events = read_after(conn, Checkpoint(), 10_000_000)
    last = Checkpoint(events[-1].tx_id, events[-1].position)
    return projection_named(name).fold(events), last


def shadow_tables(database: Database) -> list[str]:
    with database.connect_worker() as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s", (SHADOW_SCHEMA,)
        ).fetchall()
    return [row[0] for row in rows]


def report(incident_id: uuid.UUID, minutes: int) -> NewEvent:
    return NewEvent(
        REPORT_SUBMITTED,
        {
            "incident_id": str(incident_id),
            "category": "Pothole",
            "description": "hole",
            # Reports a few meters apart, so the grouping model joins them.
            "latitude": 42.3474 + (minutes % 7) * 0.00002,
            "longitude": -71.0944,
            "resolution_due_at": (T0 + timedelta(days=2)).isoformat(),
        },
        T0 + timedelta(minutes=minutes),
    )


@pytest.mark.parametrize("workers", [1, 3])
def test_rebuild_equals_fold(
    fresh_database: Database, fresh_store: PostgresEventStore, workers: int
) -> None:
    seed_demo(fresh_store, "demo", incidents=80, seed=3, end=T0)
    seed_demo(fresh_store, "other", incidents=30, seed=4, end=T0)
    project_everything(fresh_database)
    before = tables(fresh_database)

    result = rebuild(
        fresh_database, projection_named("sla"), workers=workers, min_partition_events=10
    )

    after = tables(fresh_database)
    expected, last = folded(fresh_database, "sla")
    assert after["sla"][0] == expected
    assert after["sla"][1] == last
    assert result.checkpoint == last
    # The rows of both tables: one per incident, one per configuration version.
    with fresh_database.connect_worker() as conn:
        versions = projection_named("sla").read_configs(conn)  # type: ignore[attr-defined]
    assert len(versions) >= 2
    # The demo's incidents change after their report, so the SLA rows have versions, and a
    # rebuild writes the ones streaming wrote.
    assert len(after["sla versions"]) >= len(expected)
    assert after["sla versions"] == before["sla versions"]
    assert result.rows == len(expected) + len(versions) + len(after["sla versions"])
    assert after["incidents"] == before["incidents"]
    assert result.partitions == 2 * workers  # two tenants, each split by stream hash
    assert shadow_tables(fresh_database) == []


def test_rebuild_grouping_equals_fold(
    fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    seed_demo(fresh_store, "demo", incidents=60, seed=3, end=T0)
    seed_demo(fresh_store, "other", incidents=20, seed=4, end=T0)
    # Five reports a few meters apart: one group, which a staff split then divides.
    incidents = [uuid.uuid4() for _ in range(5)]
    for minutes, incident in enumerate(incidents):
        fresh_store.append(
            "demo", incident_stream_id(incident), [report(incident, minutes)], expected_version=0
        )
    fresh_store.append(
        "demo",
        incident_stream_id(incidents[0]),
        [NewEvent(REPORT_SPLIT_FROM_GROUP, {}, T0 + timedelta(hours=1))],
        expected_version=1,
    )
    project_everything(fresh_database)
    before = tables(fresh_database)
    with fresh_database.connect_owner() as conn:
        # A stray row no event explains: only a rebuild of its tenant removes it.
        conn.execute(
            "INSERT INTO grouping_reports (tenant_id, incident_id, submitted_at, text, group_id) "
            "VALUES ('demo', %s, now(), 'stray', %s)",
            (incidents[0].hex[:-4] + "0000", incidents[0]),
        )

    one_tenant = rebuild(fresh_database, projection_named("grouping"), tenant_id="other")
    stray_kept = tables(fresh_database)["grouping"][0]
    everything = rebuild(fresh_database, projection_named("grouping"), workers=2)

    after = tables(fresh_database)
    expected, last = folded(fresh_database, "grouping")
    groups = {
        row[-1]
        for key, row in expected.items()
        if key[0] == "demo" and key[1][0] == "report" and key[1][1] in incidents
    }
    assert len(groups) == 2  # the split report alone, the four others together
    assert one_tenant.partitions == 1
    assert len(stray_kept) == len(expected) + 1
    assert after["grouping"][0] == expected
    assert after["grouping"][1] == last
    assert everything.partitions == 2  # one per tenant: groups span streams
    assert everything.rows == len(expected)
    for name in ("incidents", "sla", "trends"):
        assert after[name] == before[name]
    assert shadow_tables(fresh_database) == []


@pytest.mark.parametrize("name", ["sla", "trends"])
def test_rebuild_keeps_configuration_versions(
    fresh_database: Database, fresh_store: PostgresEventStore, name: str
) -> None:
    seed_demo(fresh_store, "demo", incidents=40, seed=10, end=T0)
    apply_config(
        fresh_store,
        "demo",
        {"sla_policies": [{"id": "fast", "resolution": "4 calendar hours"}]},
        occurred_at=T0,
    )
    project_everything(fresh_database)
    projection: Any = projection_named(name)
    with fresh_database.connect_worker() as conn:
        streamed = projection.read_configs(conn)

    # Two buckets per tenant, each of which reads the configuration streams.
    result = rebuild(fresh_database, projection, workers=2, min_partition_events=10)
    with fresh_database.connect_worker() as conn:
        rebuilt = projection.read_configs(conn)
        events = read_after(conn, Checkpoint(), 10_000_000)

    # Streaming after the swap reads the versions the rebuild stored.
    incident = uuid.uuid4()
    submitted = {"incident_id": str(incident), "category": "Pothole", "description": "hole"}
    fresh_store.append(
        "demo",
        incident_stream_id(incident),
        [NewEvent(REPORT_SUBMITTED, submitted, T0 + timedelta(hours=1))],
        expected_version=0,
    )
    project_everything(fresh_database)
    expected, _ = folded(fresh_database, name)

    assert result.partitions == 2
    assert len(streamed) >= 2
    assert rebuilt == streamed
    assert rebuilt == projection.fold_configs(events)
    assert tables(fresh_database)[name][0] == expected
    if name == "sla":
        assert expected[("demo", incident)].policy_id == "fast"


def test_rebuild_one_tenant(fresh_database: Database, fresh_store: PostgresEventStore) -> None:
    seed_demo(fresh_store, "demo", incidents=40, seed=5, end=T0)
    seed_demo(fresh_store, "other", incidents=20, seed=6, end=T0)
    project_everything(fresh_database)
    with fresh_database.connect_owner() as conn:
        # A stray row no event explains: only a rebuild of its tenant removes it.
        for tenant in ("demo", "other"):
            conn.execute(
                "INSERT INTO incidents (tenant_id, incident_id, version, status) "
                "VALUES (%s, %s, 1, 'stray')",
                (tenant, uuid.uuid4()),
            )
    appended_later = uuid.uuid4()
    fresh_store.append(
        "other",
        incident_stream_id(appended_later),
        [report(appended_later, 1)],
        expected_version=0,
    )

    rebuild(fresh_database, projection_named("incidents"), tenant_id="demo", workers=2)

    rows, checkpoint = tables(fresh_database)["incidents"]
    expected, last = folded(fresh_database, "incidents")
    stray = {key for key, state in rows.items() if state.status == "stray"}
    assert [key[0] for key in stray] == ["other"]
    # The live model moved to the swap's position for every tenant, as streaming would.
    assert checkpoint == last
    assert {key: state for key, state in rows.items() if key not in stray} == expected


def test_rebuild_rewrites_only_differing_rows(
    fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    seed_demo(fresh_store, "demo", incidents=40, seed=7, end=T0)
    project_everything(fresh_database)
    with fresh_database.connect_owner() as conn:
        ids = [
            row[0]
            for row in conn.execute(
                "SELECT incident_id FROM incidents WHERE tenant_id = 'demo' ORDER BY 1"
            ).fetchall()
        ]
        changed, missing, untouched = ids[0], ids[1], ids[2:]
        conn.execute("UPDATE incidents SET status = 'tampered' WHERE incident_id = %s", (changed,))
        conn.execute("DELETE FROM incidents WHERE incident_id = %s", (missing,))
        conn.execute(
            "INSERT INTO incidents (tenant_id, incident_id, version, status) "
            "VALUES ('demo', %s, 1, 'stray')",
            (uuid.uuid4(),),
        )
        # Where each untouched row is stored: a rewritten row moves.
        places = "SELECT incident_id, ctid::text FROM incidents WHERE incident_id = ANY(%s)"
        untouched_before = dict(conn.execute(places, (untouched,)).fetchall())

    result = rebuild(fresh_database, projection_named("incidents"), workers=2)

    rows, checkpoint = tables(fresh_database)["incidents"]
    expected, last = folded(fresh_database, "incidents")
    with fresh_database.connect_owner() as conn:
        untouched_after = dict(conn.execute(places, (untouched,)).fetchall())
    assert rows == expected
    assert checkpoint == last
    assert result.rows == len(expected)
    assert len(untouched_before) == len(untouched)
    assert untouched_after == untouched_before


def incident_ids(name: str, rows: dict[Any, Any]) -> set[uuid.UUID]:
    """Return the incidents with a row in the `name` model's rows."""
    if name == "grouping":
        return {key[1][1] for key in rows if key[1][0] == "report"}
    return {key[1] for key in rows}


@pytest.mark.parametrize("name", ["incidents", "grouping"])
def test_rebuild_keeps_events_appended_during_it(
    fresh_database: Database, fresh_store: PostgresEventStore, name: str
) -> None:
    seed_demo(fresh_store, "demo", incidents=300, seed=8, end=T0)
    project_everything(fresh_database)
    stop = threading.Event()
    appended: list[uuid.UUID] = []
    failures: list[BaseException] = []

    def append_continuously() -> None:
        try:
            while not stop.is_set():
                incident = uuid.uuid4()
                fresh_store.append(
                    "demo",
                    incident_stream_id(incident),
                    [report(incident, len(appended))],
                    expected_version=0,
                )
                fresh_store.append(
                    "demo",
                    incident_stream_id(incident),
                    [NewEvent(INCIDENT_ACKNOWLEDGED, {}, T0 + timedelta(hours=1))],
                    expected_version=1,
                )
                appended.append(incident)
        except BaseException as error:  # reported by the assert below
            failures.append(error)

    writer = threading.Thread(target=append_continuously)
    writer.start()
    try:
        while len(appended) < 5:
            time.sleep(0.01)
        result = rebuild(
            fresh_database, projection_named(name), workers=2, min_partition_events=100
        )
        during = len(appended)
    finally:
        stop.set()
        writer.join(30)
    assert failures == []

    # At the swap, the model held exactly the events up to its checkpoint.
    with fresh_database.connect_worker() as conn:
        events = read_after(conn, Checkpoint(), 10_000_000)
        rows = projection_named(name).read_all(conn)  # type: ignore[attr-defined]
    upto = [
        e
        for e in events
        if (e.tx_id, e.position) <= (result.checkpoint.tx_id, result.checkpoint.position)
    ]
    in_model = incident_ids(name, rows)
    assert result.events_caught_up > 0
    assert sum(1 for incident in appended[:during] if incident in in_model) >= 5
    # Streaming continues from the swap's checkpoint, and every event counts once.
    project_everything(fresh_database)
    expected, _ = folded(fresh_database, name)
    assert tables(fresh_database)[name][0] == expected
    assert set(appended) <= incident_ids(name, expected)
    assert len(upto) >= result.events_folded


def _boom(state: IncidentState | None, event: RecordedEvent) -> IncidentState | None:
    if event.payload.get("category") == "Explodes":
        raise ValueError(f"cannot fold event {event.event_id}")
    return evolve(state, event)


def test_failed_rebuild_changes_nothing(
    fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    seed_demo(fresh_store, "demo", incidents=40, seed=9, end=T0)
    poison = uuid.uuid4()
    event = report(poison, 5)
    event.payload["category"] = "Explodes"
    fresh_store.append("other", incident_stream_id(poison), [event], expected_version=0)
    project_everything(fresh_database)
    before = tables(fresh_database)
    broken = IncidentRowProjection("incidents", "incidents", IncidentState, _boom)

    with pytest.raises(RebuildFailed, match="tenant other"):
        rebuild(fresh_database, broken, workers=2)

    assert tables(fresh_database) == before
    assert shadow_tables(fresh_database) == []


def test_rebuild_many_equals_fold(
    fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    seed_demo(fresh_store, "demo", incidents=60, seed=11, end=T0)
    seed_demo(fresh_store, "other", incidents=20, seed=12, end=T0)
    project_everything(fresh_database)
    before = tables(fresh_database)
    names = ["sla", "grouping", "incidents"]
    swapped: list[RebuildReport] = []

    reports = rebuild_many(
        fresh_database,
        [projection_named(name) for name in names],
        workers=2,
        swapped=swapped.append,
        min_partition_events=10,
    )

    after = tables(fresh_database)
    assert [report.projection for report in reports] == names
    assert sorted(report.projection for report in swapped) == sorted(names)
    for report in reports:
        expected, last = folded(fresh_database, report.projection)
        assert after[report.projection][0] == expected, report.projection
        assert after[report.projection][1] == last, report.projection
        assert report.checkpoint == last
        assert report.worker_cpu_seconds > 0
    # Two tenants: grouping folds each whole, the stream-keyed models split each in two.
    assert [report.partitions for report in reports] == [4, 2, 4]
    assert after["trends"] == before["trends"]
    assert shadow_tables(fresh_database) == []


def test_rebuild_many_failure_keeps_unswapped(
    fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    seed_demo(fresh_store, "demo", incidents=40, seed=13, end=T0)
    poison = uuid.uuid4()
    event = report(poison, 5)
    event.payload["category"] = "Explodes"
    fresh_store.append("other", incident_stream_id(poison), [event], expected_version=0)
    project_everything(fresh_database)
    before = tables(fresh_database)
    broken = IncidentRowProjection("incidents", "incidents", IncidentState, _boom)
    swapped: list[RebuildReport] = []

    with pytest.raises(RebuildFailed, match="projection incidents failed .* tenant other"):
        rebuild_many(
            fresh_database, [broken, projection_named("sla")], workers=2, swapped=swapped.append
        )

    after = tables(fresh_database)
    assert after["incidents"] == before["incidents"]
    # sla may have been swapped in before the failure; then its rows are a complete rebuild.
    expected, last = folded(fresh_database, "sla")
    if swapped:
        assert [report.projection for report in swapped] == ["sla"]
        assert after["sla"] == (expected, last)
    else:
        assert after["sla"] == before["sla"]
    assert after["grouping"] == before["grouping"]
    assert shadow_tables(fresh_database) == []


def test_rebuild_many_locked_projection(
    fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    seed_demo(fresh_store, "demo", incidents=10, seed=14, end=T0)
    project_everything(fresh_database)
    before = tables(fresh_database)
    lock = "SELECT pg_try_advisory_lock(%s, hashtext(%s))"

    with fresh_database.connect_worker(autocommit=True) as other:
        assert other.execute(lock, (REBUILD_LOCK_CLASS, "sla")).fetchone() == (True,)
        with pytest.raises(RebuildFailed, match="another rebuild of projection sla is running"):
            rebuild_many(fresh_database, [projection_named("incidents"), projection_named("sla")])
        # The lock on incidents, taken before sla's failed, was released.
        assert other.execute(lock, (REBUILD_LOCK_CLASS, "incidents")).fetchone() == (True,)

    assert tables(fresh_database) == before


@pytest.mark.parametrize(
    ("names", "message"),
    [([], "no projection to rebuild"), (["sla", "sla"], "projection sla is named twice")],
)
def test_rebuild_many_rejects_names(database: Database, names: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rebuild_many(database, [projection_named(name) for name in names])


def _waiting_for_lock(conn: psycopg.Connection[Any]) -> bool:
    """Return True when a session of this database waits for an advisory lock."""
    row = conn.execute(
        "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
        "WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = current_database()"
    ).fetchone()
    return bool(row and row[0])


def _rebuild_workers(database: Database) -> list[tuple[int, str]]:
    with database.connect_worker() as conn:
        rows = conn.execute(
            "SELECT application_name, state FROM pg_stat_activity "
            "WHERE application_name LIKE 'civicpulse-rebuild-%%-%%'"
        ).fetchall()
    return [(int(name.rsplit("-", 1)[1]), state) for name, state in rows]


@pytest.mark.slow
def test_killed_worker_changes_nothing(
    fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    for number in range(24):
        seed_demo(fresh_store, f"city-{number}", incidents=60, seed=number, end=T0)
    project_everything(fresh_database)
    before = tables(fresh_database)
    killed: list[int] = []
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            rebuild(fresh_database, projection_named("sla"), workers=2)
            outcome.append(None)
        except BaseException as error:  # checked below
            outcome.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while not killed and time.monotonic() < deadline and thread.is_alive():
        for pid, _ in _rebuild_workers(fresh_database):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            break
        time.sleep(0.005)
    thread.join(120)

    assert killed, "no rebuild worker was seen in pg_stat_activity"
    assert len(outcome) == 1
    assert isinstance(outcome[0], RebuildFailed), outcome[0]
    assert tables(fresh_database) == before
    assert shadow_tables(fresh_database) == []
    with fresh_database.connect_worker() as conn:
        conn.execute("SELECT 1")  # the server is fine
    with pytest.raises(psycopg.Error), fresh_database.connect() as conn:
        conn.execute(f"SELECT 1 FROM {SHADOW_SCHEMA}.anything")


@pytest.mark.slow
def test_interrupted_rebuild_command_changes_nothing(
    fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    for number in range(12):
        seed_demo(fresh_store, f"town-{number}", incidents=40, seed=number, end=T0)
    project_everything(fresh_database)
    before = tables(fresh_database)
    env = dict(os.environ)
    env["DATABASE_URL"] = fresh_database.owner_conninfo
    env["CIVICPULSE_LOG_LEVEL"] = "WARNING"

    # Its own process group, as a shell gives a job: Ctrl-C reaches every process in it.
    # The test holds the lock that the swap takes, so the rebuild stops before its swap,
    # with the shadow model complete, until Ctrl-C reaches it.
    with fresh_database.connect_owner(autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s, hashtext('sla'))", (APPLY_LOCK_CLASS,))
        command = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "rebuild", "sla", "--workers", "2"],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 60
            while not _waiting_for_lock(holder) and time.monotonic() < deadline:
                assert command.poll() is None, command.communicate()[1]
                time.sleep(0.01)
            os.killpg(command.pid, signal.SIGINT)
            _, stderr = command.communicate(timeout=60)
        finally:
            if command.poll() is None:
                os.killpg(command.pid, signal.SIGKILL)

    assert command.returncode == 130, stderr
    assert "the live model and its checkpoint are unchanged" in stderr
    assert tables(fresh_database) == before
    assert shadow_tables(fresh_database) == []


def test_rebuild_command_several_projections(
    fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    seed_demo(fresh_store, "demo", incidents=12, seed=15, end=T0)
    project_everything(fresh_database)
    env = dict(os.environ)
    env["DATABASE_URL"] = fresh_database.owner_conninfo
    env["CIVICPULSE_LOG_LEVEL"] = "INFO"
    command = [sys.executable, "-m", "api.cli", "rebuild", "sla", "grouping", "--workers", "2"]

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    with fresh_database.connect_worker(autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s, hashtext('grouping'))", (REBUILD_LOCK_CLASS,))
        locked = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stderr
    assert "rebuilt sla: " in done.stderr
    assert "rebuilt grouping: " in done.stderr
    assert "rebuild of sla: partitions 1 of 1 done" in done.stderr
    assert "rebuild of grouping: partitions 1 of 1 done" in done.stderr
    assert locked.returncode == 2, locked.stderr
    assert "another rebuild of projection grouping is running" in locked.stderr
    assert "for sla, grouping the live model and its checkpoint are unchanged" in locked.stderr
    assert tables(fresh_database)["sla"][0] == folded(fresh_database, "sla")[0]


def test_rebuild_unknown_tenant_fails(database: Database) -> None:
    with pytest.raises(RebuildFailed, match="tenant 'nobody-here' has no events"):
        rebuild(database, projection_named("sla"), tenant_id="nobody-here")
    assert shadow_tables(database) == []


def test_rebuild_needs_a_worker(database: Database) -> None:
    with pytest.raises(ValueError, match="workers = 0"):
        rebuild(database, projection_named("sla"), workers=0)
