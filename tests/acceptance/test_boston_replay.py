"""The Boston SLA summary as of a past moment, replayed from a snapshot and from the log.

Imports the whole Boston 2015 export, snapshots the SLA read model, and replays the SLA
model as of 2016-01-13T00:00 America/New_York both ways. The two must be identical and
agree with the city's OnTime_Status for every case that has one.
"""

from __future__ import annotations

import csv
import gzip
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from ledger.database import Database, set_tenant
from ledger.imports.pipeline import import_boston
from projections.runtime import projection_named
from projections.sla_queries import sla_summary, summarize_states, verdicts_of_states
from replay.snapshots import take_snapshot
from replay.time_travel import replay
from tests.conftest import boston_file, project_everything

AS_OF = datetime(2016, 1, 13, tzinfo=ZoneInfo("America/New_York"))


@pytest.mark.slow
def test_boston_replay_from_snapshot_matches_city(fresh_database: Database) -> None:
    with gzip.open(boston_file(), "rt", encoding="utf-8", newline="") as source:
        city = {
            row["CASE_ENQUIRY_ID"]: row["OnTime_Status"]
            for row in csv.DictReader(source)
            if row["OnTime_Status"]
        }
    assert len(city) == 120_992
    with fresh_database.connect_owner() as conn:
        report = import_boston(
            conn, boston_file(), tenant_id="boston", time_zone="America/New_York"
        )
    assert report.rejected == []
    project_everything(fresh_database, batch_size=5000, timeout=600)
    sla = projection_named("sla")
    with fresh_database.connect_worker() as conn:
        snapshot = take_snapshot(conn, sla, "boston")
    assert snapshot is not None
    assert snapshot.row_count == 121_145

    with fresh_database.connect() as conn:
        from_snapshot = replay(conn, sla, "boston", as_of=AS_OF)
        from_log = replay(conn, sla, "boston", as_of=AS_OF, use_snapshots=False)
        stored = sla_summary(conn, "boston", AS_OF)
        set_tenant(conn, "boston")
        case_ids = dict(
            conn.execute("SELECT incident_id, source_id FROM incidents WHERE tenant_id = 'boston'")
        )
        conn.commit()

    assert from_snapshot.snapshot_id == snapshot.snapshot_id
    assert from_log.snapshot_id is None
    assert from_snapshot.events_folded < from_log.events_folded
    assert from_snapshot.states == from_log.states
    summary = summarize_states(from_snapshot.states.values(), AS_OF)
    assert summary == summarize_states(from_log.states.values(), AS_OF)
    assert summary == stored

    verdicts = verdicts_of_states(from_snapshot.states.values(), AS_OF)
    ours = {case_ids[incident]: breached for incident, breached in verdicts.items()}
    disagreeing = sorted(
        case_id for case_id, status in city.items() if ours[case_id] != (status == "OVERDUE")
    )
    assert disagreeing == [], f"{len(disagreeing)} cases disagree, first: {disagreeing[:5]}"
    assert sum(counts.total for counts in summary["department"].values()) == 121_145
