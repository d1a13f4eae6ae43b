"""The city's own SLA verdicts, reproduced from the ledger.

Imports the whole Boston 2015 export and compares, case by case, the breach verdict as of
2016-01-13T00:00 America/New_York with the city's OnTime_Status column.
"""

from __future__ import annotations

import csv
import gzip
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from ledger.database import Database, set_tenant
from ledger.imports.pipeline import import_boston
from projections.sla_queries import sla_summary, sla_verdicts
from tests.conftest import boston_file, project_everything

AS_OF = datetime(2016, 1, 13, tzinfo=ZoneInfo("America/New_York"))


@pytest.mark.slow
def test_boston_verdicts_match_city(fresh_database: Database) -> None:
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
    assert report.cases == 121_145
    project_everything(fresh_database, batch_size=5000, timeout=600)

    with fresh_database.connect() as conn:
        verdicts = sla_verdicts(conn, "boston", AS_OF)
        set_tenant(conn, "boston")
        case_ids = dict(
            conn.execute("SELECT incident_id, source_id FROM incidents WHERE tenant_id = 'boston'")
        )
        summary = sla_summary(conn, "boston", AS_OF)

    ours = {case_ids[incident]: breached for incident, breached in verdicts.items()}
    agreeing = [
        case_id for case_id, status in city.items() if ours[case_id] == (status == "OVERDUE")
    ]
    disagreeing = sorted(set(city) - set(agreeing))
    assert disagreeing == [], f"{len(disagreeing)} cases disagree, first: {disagreeing[:5]}"
    assert len(agreeing) == 120_992

    totals = summary["department"].values()
    assert sum(counts.total for counts in totals) == 121_145
    assert sum(counts.breached for counts in totals) == sum(ours.values())
    assert sum(counts.breached for counts in summary["category"].values()) == sum(ours.values())
