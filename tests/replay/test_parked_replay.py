"""A parked event is left out of rebuilds and time travel as it is out of streaming."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ledger.database import Database
from ledger.events import NewEvent
from ledger.ids import incident_stream_id
from ledger.lifecycle import INCIDENT_CLOSED, REPORT_SUBMITTED
from ledger.parking import park_event
from ledger.store import PostgresEventStore
from projections.runtime import BatchFailed, catch_up, projection_named
from replay.rebuild import rebuild
from replay.time_travel import replay
from tests.replay.test_rebuild import report, tables

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


def sla_rows(conn: Any) -> Any:
    return projection_named("sla").read_all(conn)  # type: ignore[attr-defined]


@pytest.fixture
def parked_log(fresh_database: Database, fresh_store: PostgresEventStore) -> uuid.UUID:
    """Five readable reports and one the SLA fold fails on, parked for `sla`."""
    incidents = [uuid.uuid4() for _ in range(5)]
    for minutes, incident in enumerate(incidents):
        fresh_store.append(
            "acme", incident_stream_id(incident), [report(incident, minutes)], expected_version=0
        )
    broken = NewEvent(
        REPORT_SUBMITTED,
        {"incident_id": "not-an-id", "category": "Pothole", "description": "hole"},
        T0 + timedelta(minutes=9),
    )
    fresh_store.append("acme", "incident-broken", [broken], expected_version=0)
    fresh_store.append(
        "acme",
        incident_stream_id(incidents[0]),
        [NewEvent(INCIDENT_CLOSED, {}, T0 + timedelta(hours=2))],
        expected_version=1,
    )
    with pytest.raises(BatchFailed):
        catch_up(fresh_database, [projection_named("sla")])
    with fresh_database.connect_worker() as conn:
        park_event(
            conn,
            fresh_store,
            "sla",
            "acme",
            broken.event_id,
            reason="incident id is not a UUID",
            parked_by="ops",
            occurred_at=T0 + timedelta(days=1),
        )
        conn.commit()
    catch_up(fresh_database, [projection_named("sla")])
    return broken.event_id


def test_replay_skips_parked_event(fresh_database: Database, parked_log: uuid.UUID) -> None:
    with fresh_database.connect_worker() as conn:
        live = sla_rows(conn)
        replayed = replay(conn, projection_named("sla"), "acme", use_snapshots=False)

    assert len(live) == 5
    assert replayed.states == live


def test_rebuild_skips_parked_event(fresh_database: Database, parked_log: uuid.UUID) -> None:
    before = tables(fresh_database)["sla"][0]

    result = rebuild(fresh_database, projection_named("sla"), workers=2, min_partition_events=2)

    after = tables(fresh_database)["sla"][0]
    assert result.rows >= 5
    assert after == before
