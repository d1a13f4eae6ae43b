"""Snapshots, the replay and snapshot commands, and time travel through the API."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import threading
import uuid
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg_pool import ConnectionPool

from api.app import create_app
from ledger.database import Database
from ledger.demo import seed_demo
from ledger.keys import Role, issue_key
from ledger.scheduler import default_jobs
from ledger.store import PostgresEventStore
from ledger.tenants import require_tenant
from projections.runtime import projection_named
from projections.sla_queries import sla_summary, summarize_states
from replay.snapshots import (
    list_snapshots,
    nearest_snapshot,
    prune_snapshots,
    serialize,
    take_snapshot,
    take_snapshots,
)
from replay.time_travel import replay
from tests.conftest import app_pool, create_database, drop_database, project_everything

END = datetime(2026, 1, 31, tzinfo=UTC)
# The projections the seeded tenant has snapshots of.
SNAPSHOTTED = ("incidents", "sla", "grouping")
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def database(server_conninfo: str) -> Iterator[Database]:
    """A database of this module's own. Snapshots, the scheduler and the commands here read
    every tenant's log, and the session database contains what every earlier test left."""
    name, database = create_database(server_conninfo)
    yield database
    drop_database(server_conninfo, name)


@pytest.fixture(scope="module")
def session_pool(database: Database) -> Iterator[ConnectionPool[Any]]:
    pool = app_pool(database)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def seeded(database: Database, session_pool: ConnectionPool[Any]) -> str:
    """A tenant with a demo history, projected, with one snapshot per projection taken
    half-way through its log."""
    tenant = f"snap-{uuid.uuid4().hex[:8]}"
    store = PostgresEventStore(session_pool)
    seed_demo(store, tenant, incidents=60, seed=21, end=END)
    project_everything(database)
    with database.connect_worker() as conn:
        for name in SNAPSHOTTED:
            assert take_snapshot(conn, projection_named(name), tenant) is not None
    seed_demo(store, f"{tenant}-b", incidents=5, seed=22, end=END)
    return tenant


def _worker(database: Database) -> Any:
    return database.connect_worker()


def test_snapshot_records_its_content(database: Database, seeded: str) -> None:
    projection = projection_named("sla")
    with _worker(database) as conn:
        (info,) = list_snapshots(conn, seeded, "sla")
        content = conn.execute(
            "SELECT content FROM projection_snapshots WHERE tenant_id = %s AND snapshot_id = %s",
            (seeded, info.snapshot_id),
        ).fetchone()
        live = projection.read_states(conn, seeded)
    assert content is not None
    raw = zlib.decompress(content[0])
    assert hashlib.sha256(raw).hexdigest() == info.sha256
    assert raw == serialize(projection, live)
    assert info.row_count == len(live) == 60
    assert info.event_count > info.row_count


def test_snapshot_skipped_without_new_events(database: Database, seeded: str) -> None:
    with _worker(database) as conn:
        assert take_snapshot(conn, projection_named("incidents"), seeded) is None
        assert take_snapshot(conn, projection_named("sla"), "no-such-tenant") is None


@pytest.mark.parametrize("name", ["sla", "grouping"])
def test_deleting_snapshots_changes_no_answer(database: Database, seeded: str, name: str) -> None:
    projection = projection_named(name)
    # Read as the worker: the application role sees no rows before a tenant is set.
    with _worker(database) as conn:
        times = conn.execute(
            "SELECT min(recorded_at), max(recorded_at), min(occurred_at), max(occurred_at) "
            "FROM events WHERE tenant_id = %s",
            (seeded,),
        ).fetchone()
    assert times is not None
    first_known, last_known, first_valid, last_valid = times
    probes = [
        (None, None),
        (first_valid + (last_valid - first_valid) / 3, None),
        (None, last_known),
        (last_valid - timedelta(days=5), last_known + timedelta(seconds=1)),
        (None, first_known + (last_known - first_known) / 2),
    ]
    with database.connect() as conn:
        before = [replay(conn, projection, seeded, as_of=a, known_at=k) for a, k in probes]
    with _worker(database) as conn:
        conn.execute("DELETE FROM projection_snapshots WHERE tenant_id = %s", (seeded,))
        conn.commit()
        try:
            with database.connect() as reader:
                after = [replay(reader, projection, seeded, as_of=a, known_at=k) for a, k in probes]
        finally:
            # The other tests start from snapshots again.
            for snapshotted in SNAPSHOTTED:
                take_snapshot(conn, projection_named(snapshotted), seeded)

    assert any(result.snapshot_id is not None for result in before)
    assert all(result.snapshot_id is None for result in after)
    assert [result.states for result in before] == [result.states for result in after]
    # A snapshot shortens the fold: fewer events after it than in the whole log.
    assert before[0].events_folded < after[0].events_folded


def test_replay_now_matches_read_model(database: Database, seeded: str) -> None:
    with database.connect() as conn:
        replayed = replay(conn, projection_named("sla"), seeded)
        judged = summarize_states(replayed.states.values(), END)
        stored = sla_summary(conn, seeded, END)
    assert replayed.snapshot_id is not None
    assert judged == stored


def test_snapshot_with_bad_hash_is_skipped(database: Database, seeded: str) -> None:
    projection = projection_named("incidents")
    # Tampering takes the owner: the worker role may not update snapshots.
    with database.connect_owner() as conn, conn.transaction():
        conn.execute(
            "UPDATE projection_snapshots SET sha256 = %s WHERE tenant_id = %s",
            (bytes(32), seeded),
        )
    try:
        with database.connect() as conn:
            assert nearest_snapshot(conn, projection, seeded, as_of=None, known_at=None) is None
    finally:
        with _worker(database) as conn:
            conn.execute("DELETE FROM projection_snapshots WHERE tenant_id = %s", (seeded,))
            conn.commit()
            for name in SNAPSHOTTED:
                take_snapshot(conn, projection_named(name), seeded)


def _rewrite_content(database: Database, tenant: str, document: Any) -> None:
    """Replace the tenant's snapshots' content with `document`, under a matching SHA-256."""
    raw = orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
    with database.connect_owner() as conn, conn.transaction():
        conn.execute(
            "UPDATE projection_snapshots SET content = %s, sha256 = %s WHERE tenant_id = %s",
            (zlib.compress(raw), hashlib.sha256(raw).digest(), tenant),
        )


@pytest.fixture()
def small_tenant(database: Database, session_pool: ConnectionPool[Any]) -> str:
    """A tenant of five incidents, projected, with one snapshot of the SLA model."""
    tenant = f"fmt-{uuid.uuid4().hex[:8]}"
    seed_demo(PostgresEventStore(session_pool), tenant, incidents=5, seed=24, end=END)
    project_everything(database)
    with _worker(database) as conn:
        assert take_snapshot(conn, projection_named("sla"), tenant) is not None
    return tenant


def test_snapshot_stores_columns(database: Database, small_tenant: str) -> None:
    projection = projection_named("sla")
    with _worker(database) as conn:
        row = conn.execute(
            "SELECT content FROM projection_snapshots WHERE tenant_id = %s", (small_tenant,)
        ).fetchone()
        live = projection.read_states(conn, small_tenant)
    assert row is not None
    document = orjson.loads(zlib.decompress(row[0]))
    assert sorted(document) == ["columns", "values"]
    assert document["columns"][0] == "incident_id"
    assert len(document["values"]) == len(document["columns"])
    assert all(len(column) == len(live) == 5 for column in document["values"])
    assert document["values"][0] == sorted(str(incident_id) for _, incident_id in live)


def test_old_format_snapshot_still_loads(database: Database, small_tenant: str) -> None:
    projection = projection_named("sla")
    with _worker(database) as conn:
        live = projection.read_states(conn, small_tenant)
    _rewrite_content(database, small_tenant, projection.to_records(live))
    # Row-level security shows the worker every tenant's snapshots. The application role
    # reads them only after replay sets the tenant.
    with _worker(database) as conn:
        loaded = nearest_snapshot(conn, projection, small_tenant, as_of=None, known_at=None)
    with database.connect() as conn:
        replayed = replay(conn, projection, small_tenant)
    assert loaded is not None
    assert loaded.states == live
    assert replayed.snapshot_id == loaded.info.snapshot_id
    assert replayed.states == live


def test_snapshot_with_other_columns_is_skipped(
    database: Database, small_tenant: str, caplog: pytest.LogCaptureFixture
) -> None:
    projection = projection_named("sla")
    with _worker(database) as conn:
        live = projection.read_states(conn, small_tenant)
    document = projection.to_snapshot(live)
    # As if the state type had lost its last field since the snapshot was taken.
    document["columns"] = [*document["columns"], "retired_field"]
    document["values"] = [*document["values"], [None] * len(live)]
    _rewrite_content(database, small_tenant, document)
    with caplog.at_level(logging.WARNING, logger="replay.snapshots"):
        with _worker(database) as conn:
            assert len(list_snapshots(conn, small_tenant)) == 1
            loaded = nearest_snapshot(conn, projection, small_tenant, as_of=None, known_at=None)
        with database.connect() as conn:
            replayed = replay(conn, projection, small_tenant)
    assert loaded is None
    assert replayed.snapshot_id is None
    assert replayed.states == live
    assert any("cannot be read" in record.getMessage() for record in caplog.records)


def test_as_of_skips_snapshot_after_it(database: Database, seeded: str) -> None:
    projection = projection_named("sla")
    with _worker(database) as conn:
        (info,) = list_snapshots(conn, seeded, "sla")
        row = conn.execute(
            "SELECT occurred_at FROM events WHERE tenant_id = %s "
            "AND (tx_id, position) <= (%s::text::xid8, %s) ORDER BY tx_id DESC, position DESC "
            "LIMIT 1",
            (seeded, str(info.checkpoint.tx_id), info.checkpoint.position),
        ).fetchone()
    assert row is not None
    frontier = row[0]
    with database.connect() as conn:
        before = replay(conn, projection, seeded, as_of=frontier - timedelta(seconds=1))
        at = replay(conn, projection, seeded, as_of=frontier)
        before_slow = replay(
            conn, projection, seeded, as_of=frontier - timedelta(seconds=1), use_snapshots=False
        )
        at_slow = replay(conn, projection, seeded, as_of=frontier, use_snapshots=False)
    assert before.snapshot_id is None
    assert at.snapshot_id == info.snapshot_id
    assert before.states == before_slow.states
    assert at.states == at_slow.states


def test_prune_keeps_newest(database: Database, session_pool: ConnectionPool[Any]) -> None:
    tenant = f"prune-{uuid.uuid4().hex[:8]}"
    store = PostgresEventStore(session_pool)
    with _worker(database) as conn:
        for size in (3, 4, 5):
            seed_demo(store, f"{tenant}-{size}", incidents=size, seed=size, end=END)
        # Three snapshots of one tenant: each after new events of that tenant.
        for number in range(3):
            seed_demo(store, f"{tenant}-x{number}", incidents=1, seed=number, end=END)
            project_everything(database)
            take_snapshots(database, [projection_named("sla")], tenant_id=f"{tenant}-3")
            take_snapshot(conn, projection_named("sla"), f"{tenant}-x{number}")
        assert len(list_snapshots(conn, f"{tenant}-3")) == 1
        assert prune_snapshots(conn, keep=0, tenant_id=f"{tenant}-x0") == 1
        assert list_snapshots(conn, f"{tenant}-x0") == []
        assert len(list_snapshots(conn, f"{tenant}-3")) == 1
        with pytest.raises(ValueError, match="keep = -1"):
            prune_snapshots(conn, keep=-1)


def test_scheduler_runs_snapshot_job(database: Database) -> None:
    jobs = {job.name: job for job in default_jobs(database, seal_interval_seconds=60)}
    assert jobs["snapshot"].interval_seconds == 3600
    with _worker(database) as conn:
        before = len(list_snapshots(conn))
    project_everything(database)
    jobs["snapshot"].function(threading.Event())
    with _worker(database) as conn:
        after = list_snapshots(conn)
    assert len(after) > before
    # Run again at once: no tenant has new events, so nothing is added.
    jobs["snapshot"].function(threading.Event())
    with _worker(database) as conn:
        assert len(list_snapshots(conn)) == len(after)


def cli(database: Database, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["DATABASE_URL"] = database.owner_conninfo
    env["CIVICPULSE_LOG_LEVEL"] = "INFO"
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_replay_command_json_and_csv(
    database: Database, session_pool: ConnectionPool[Any], seeded: str
) -> None:
    as_of = "2026-01-10T00:00"
    as_json = cli(database, "replay", "sla", "--tenant", seeded, "--as-of", as_of)
    as_csv = cli(database, "replay", "sla", "--tenant", seeded, "--as-of", as_of, "--format", "csv")
    projection = projection_named("sla")
    with database.connect() as conn:
        # A time without an offset is read in the tenant's time zone.
        zone = require_tenant(PostgresEventStore(session_pool), seeded).zone
        moment = datetime.fromisoformat(as_of).replace(tzinfo=zone)
        expected = projection.to_records(
            replay(conn, projection, seeded, as_of=moment, use_snapshots=False).states
        )

    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == expected
    assert "from snapshot" in as_json.stderr
    assert as_csv.returncode == 0, as_csv.stderr
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [row["incident_id"] for row in rows] == [row["incident_id"] for row in expected]
    assert 0 < len(rows) < 60


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--as-of", "yesterday"], ["invalid as_of 'yesterday'", "ISO 8601"]),
        (["--known-at", "2026-13-01"], ["invalid known_at"]),
        (["--format", "xml"], ["invalid --format 'xml'"]),
    ],
)
def test_replay_command_bad_input(
    database: Database, seeded: str, args: list[str], words: list[str]
) -> None:
    result = cli(database, "replay", "sla", "--tenant", seeded, *args)
    assert result.returncode == 2
    for word in words:
        assert word in result.stderr


def test_replay_command_unknown_projection(database: Database, seeded: str) -> None:
    result = cli(database, "replay", "weather", "--tenant", seeded)
    assert result.returncode == 2
    assert "unknown projection 'weather'; known projections: incidents, sla" in result.stderr


def test_replay_command_grouping(database: Database, seeded: str) -> None:
    as_json = cli(database, "replay", "grouping", "--tenant", seeded)
    as_csv = cli(database, "replay", "grouping", "--tenant", seeded, "--format", "csv")
    projection = projection_named("grouping")
    with database.connect() as conn:
        expected = projection.to_records(replay(conn, projection, seeded).states)

    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == expected
    assert sum(1 for record in expected if record["row"] == "report") == 60
    assert as_csv.returncode == 0, as_csv.stderr
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [(row["row"], row["incident_id"]) for row in rows] == [
        (record["row"], record.get("incident_id", "")) for record in expected
    ]


def test_snapshot_and_rebuild_commands(
    database: Database, session_pool: ConnectionPool[Any]
) -> None:
    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    seed_demo(PostgresEventStore(session_pool), tenant, incidents=5, seed=23, end=END)
    project_everything(database)

    taken = cli(database, "snapshot", "take", "sla", "--tenant", tenant)
    listed = cli(database, "snapshot", "list", "--tenant", tenant)
    rebuilt = cli(database, "rebuild", "incidents", "--tenant", tenant, "--workers", "2")
    grouping = cli(database, "rebuild", "grouping", "--tenant", tenant)
    pruned = cli(database, "snapshot", "prune", "--keep", "0", "--tenant", tenant)

    assert taken.returncode == 0, taken.stderr
    assert "sha256" in taken.stdout
    assert listed.returncode == 0, listed.stderr
    assert tenant in listed.stdout
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert f"rebuilt incidents for tenant {tenant}: 5 rows" in rebuilt.stderr
    # Not a terminal: progress comes as log lines.
    assert "partitions 1 of 1 done" in rebuilt.stderr
    assert grouping.returncode == 0, grouping.stderr
    with _worker(database) as conn:
        rows = projection_named("grouping").read_states(conn, tenant)
    assert sum(1 for key in rows if key[1][0] == "report") == 5
    assert f"rebuilt grouping for tenant {tenant}: {len(rows)} rows" in grouping.stderr
    assert pruned.returncode == 0, pruned.stderr
    assert "deleted 1 snapshots" in pruned.stdout


@pytest.fixture
def client(
    database: Database, session_pool: ConnectionPool[Any], seeded: str
) -> Iterator[TestClient]:
    store = PostgresEventStore(session_pool)
    _, token = issue_key(store, seeded, role=Role.OFFICER, name="auditor", issued_by="test")
    headers = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app(database, pool=session_pool), headers=headers) as test_client:
        yield test_client


def test_sla_summary_known_at(client: TestClient, database: Database, seeded: str) -> None:
    with _worker(database) as conn:
        middle = conn.execute(
            "SELECT recorded_at FROM events WHERE tenant_id = %s ORDER BY position "
            "OFFSET (SELECT count(*) / 2 FROM events WHERE tenant_id = %s) LIMIT 1",
            (seeded, seeded),
        ).fetchone()
    assert middle is not None
    known = middle[0].isoformat()
    url = f"/tenants/{seeded}/sla/summary"
    with _worker(database) as conn:
        folded = replay(conn, projection_named("sla"), seeded, known_at=middle[0])
        expected = summarize_states(folded.states.values(), middle[0])

    everything = client.get(url, params={"known_at": "2999-01-01T00:00Z", "as_of": "2026-01-20"})
    stored = client.get(url, params={"as_of": "2026-01-20"})
    earlier = client.get(url, params={"known_at": known})

    assert everything.status_code == 200, everything.text
    assert everything.json()["totals"] == stored.json()["totals"]
    assert everything.json()["by_department"] == stored.json()["by_department"]
    # The read model's rows give the figures: the configuration was recorded before both.
    assert everything.json()["snapshot_id"] is None
    assert earlier.status_code == 200, earlier.text
    assert earlier.json()["known_at"] is not None
    assert earlier.json()["as_of"] == earlier.json()["known_at"]
    assert earlier.json()["totals"]["total"] < everything.json()["totals"]["total"]
    assert {
        row["key"]: (row["total"], row["open"], row["breached"])
        for row in earlier.json()["by_category"]
    } == {
        group: (counts.total, counts.open, counts.breached)
        for group, counts in expected["category"].items()
    }


def test_incident_as_of_and_known_at(client: TestClient, database: Database, seeded: str) -> None:
    with _worker(database) as conn:
        row = conn.execute(
            "SELECT incident_id, submitted_at, closed_at FROM incident_sla "
            "WHERE tenant_id = %s AND closed_at IS NOT NULL LIMIT 1",
            (seeded,),
        ).fetchone()
        recorded = conn.execute(
            "SELECT min(recorded_at) FROM events WHERE tenant_id = %s", (seeded,)
        ).fetchone()
    assert row is not None and recorded is not None
    incident, submitted_at, closed_at = row
    url = f"/tenants/{seeded}/incidents/{incident}"

    now = client.get(url)
    before_close = client.get(url, params={"as_of": (closed_at - timedelta(seconds=1)).isoformat()})
    before_report = client.get(
        url, params={"as_of": (submitted_at - timedelta(seconds=1)).isoformat()}
    )
    unknown = client.get(url, params={"known_at": (recorded[0] - timedelta(days=1)).isoformat()})
    bad = client.get(url, params={"known_at": "soon"})

    assert now.json()["status"] in ("closed", "rejected", "duplicate")
    assert "etag" in now.headers
    assert before_close.status_code == 200
    assert before_close.json()["closed_at"] is None
    assert "etag" not in before_close.headers
    assert before_report.status_code == 404
    assert "as of" in before_report.json()["detail"]
    assert unknown.status_code == 404
    assert "known at" in unknown.json()["detail"]
    assert bad.status_code == 422
    assert bad.headers["content-type"].startswith(PROBLEM)
    assert "invalid known_at 'soon'" in bad.json()["detail"]
    assert "ISO 8601" in bad.json()["detail"]


def test_snapshot_while_checkpoint_moves(database: Database, small_tenant: str) -> None:
    # The projector moves the checkpoint all the time. A snapshot that wrote to the
    # checkpoint row at repeatable read failed when the row changed under it.
    stop = threading.Event()

    def move_checkpoint() -> None:
        with database.connect_worker(autocommit=True) as conn:
            while not stop.is_set():
                conn.execute(
                    "UPDATE projection_checkpoints SET updated_at = now() WHERE projection = 'sla'"
                )

    mover = threading.Thread(target=move_checkpoint)
    mover.start()
    errors: list[BaseException] = []
    try:
        with _worker(database) as conn:
            for _ in range(200):
                try:
                    take_snapshot(conn, projection_named("sla"), small_tenant)
                except psycopg.Error as error:
                    errors.append(error)
    finally:
        stop.set()
        mover.join()

    assert errors == []
