"""Duplicate grouping over the Boston 2015 export.

Boston gives cases without a real location the point 42.3594, -71.0587 (17,070 cases of
2015). With that point configured as a placeholder, none of them may join a group.
"""

from __future__ import annotations

import csv
import gzip
from datetime import UTC, datetime

import pytest
from psycopg_pool import ConnectionPool

from ledger.database import Database
from ledger.grouping import configure_grouping
from ledger.imports.pipeline import import_boston
from ledger.store import PostgresEventStore
from ledger.tenants import create_tenant
from projections.grouping import grouping_projection
from projections.runtime import catch_up, projection_progress
from replay.rebuild import rebuild
from tests.conftest import boston_file

DEFAULT_POINT = ("42.3594", "-71.0587")


@pytest.mark.slow
def test_default_point_stays_ungrouped(fresh_database: Database) -> None:
    with gzip.open(boston_file(), "rt", encoding="utf-8", newline="") as source:
        rows = list(csv.DictReader(source))
    at_default = {
        row["CASE_ENQUIRY_ID"]
        for row in rows
        if (row["LATITUDE"], row["LONGITUDE"]) == DEFAULT_POINT
    }
    assert len(at_default) > 10_000

    at = datetime(2014, 12, 31, tzinfo=UTC)
    with ConnectionPool(fresh_database.app_conninfo, min_size=1, max_size=2) as pool:
        store = PostgresEventStore(pool)
        create_tenant(store, "boston", name="Boston", time_zone="America/New_York", occurred_at=at)
        placeholder = {"latitude": 42.3594, "longitude": -71.0587, "radius_m": 5}
        configure_grouping(store, "boston", {"placeholders": [placeholder]}, occurred_at=at)
    with fresh_database.connect_owner() as conn:
        import_boston(conn, boston_file(), tenant_id="boston", time_zone="America/New_York")
    catch_up(fresh_database, [grouping_projection()], batch_size=2000)

    with fresh_database.connect_worker() as conn:
        assert projection_progress(conn)["grouping"].caught_up
        groups = conn.execute(
            """
            SELECT e.payload->>'source_id', g.group_id = g.incident_id,
                   (SELECT count(*) FROM grouping_reports AS o
                    WHERE o.tenant_id = g.tenant_id AND o.group_id = g.group_id),
                   (SELECT count(*) FROM grouping_links AS l
                    WHERE l.tenant_id = g.tenant_id AND l.incident_id = g.incident_id)
            FROM grouping_reports AS g
            JOIN events AS e ON e.tenant_id = g.tenant_id
                AND e.stream_id = 'incident-' || g.incident_id AND e.stream_version = 1
            WHERE g.tenant_id = 'boston'
            """
        ).fetchall()
        grouped = conn.execute(
            "SELECT count(DISTINCT group_id) FROM grouping_reports "
            "WHERE tenant_id = 'boston' AND group_id <> incident_id"
        ).fetchone()

    assert len(groups) == len(rows)
    placed = [row for row in groups if row[0] in at_default]
    assert len(placed) == len(at_default)
    assert [row[0] for row in placed if not row[1]] == []
    assert [row[0] for row in placed if row[2] != 1] == []
    assert [row[0] for row in placed if row[3] != 0] == []
    # The rule does group elsewhere: the placeholder is what keeps these cases apart.
    assert grouped is not None and grouped[0] > 1000

    # A rebuild, whose fold uses its own spatial index, gives the streamed rows.
    projection = grouping_projection()
    with fresh_database.connect_worker() as conn:
        streamed = projection.read_all(conn)
    report = rebuild(fresh_database, projection, workers=1)
    with fresh_database.connect_worker() as conn:
        rebuilt = projection.read_all(conn)
    assert report.rows == len(streamed)
    assert rebuilt == streamed
