"""`civicpulse trends ...` against a database of the test's own."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from ledger import lifecycle as lc
from ledger.database import Database
from ledger.events import NewEvent
from ledger.ids import incident_stream_id
from ledger.store import PostgresEventStore
from ledger.tenants import create_tenant
from tests.api.test_cli import civicpulse, database_env
from tests.conftest import project_everything

T0 = datetime(2026, 3, 5, 14, tzinfo=UTC)


def cells(table: str) -> list[list[str]]:
    """The rows of a printed table, as lists of stripped cells."""
    return [
        [cell.strip() for cell in line.strip("│ ").split("│")]
        for line in table.splitlines()
        if line.startswith("│")
    ]


def test_counts_durations_rankings_and_bad_options(
    fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    create_tenant(fresh_store, "acme", name="Acme", time_zone="UTC", occurred_at=T0)
    for hours in (2, 4, 30):
        incident = uuid.uuid4()
        report = {
            "incident_id": str(incident),
            "category": "Pothole",
            "department": "Streets",
            "resolution_due_at": (T0 + timedelta(hours=24)).isoformat(),
        }
        events = [
            NewEvent(lc.REPORT_SUBMITTED, report, T0),
            NewEvent(lc.INCIDENT_RESOLVED, {}, T0 + timedelta(hours=hours)),
        ]
        fresh_store.append("acme", incident_stream_id(incident), events, expected_version=0)
    project_everything(fresh_database)
    env = database_env(fresh_database)
    window = ["--since", "2026-03-01", "--until", "2026-03-31", "--now", "2026-04-01T00:00Z"]

    counts = civicpulse(
        "trends", "counts", "--tenant", "acme", "--by", "department", *window, env=env
    )
    durations = civicpulse("trends", "durations", "--tenant", "acme", *window, env=env)
    ranked = civicpulse(
        "trends", "rankings", "--tenant", "acme", "--min-cases", "3", "--now", "2026-04-01", env=env
    )
    bad_period = civicpulse("trends", "counts", "--tenant", "acme", "--period", "year", env=env)
    bad_since = civicpulse("trends", "rankings", "--tenant", "acme", "--since", "1 May", env=env)
    bad_now = civicpulse("trends", "counts", "--tenant", "acme", "--now", "bogus", env=env)
    bad_min_cases = civicpulse(
        "trends", "rankings", "--tenant", "acme", "--min-cases", "0", env=env
    )

    assert counts.returncode == 0, counts.stderr
    assert ["2026-03-01", "Streets", "3", "3", "0", "0"] in cells(counts.stdout)
    assert durations.returncode == 0, durations.stderr
    # Durations of 2, 4 and 30 hours: the median is 4 and the 90th percentile 24.8 (4 plus
    # 0.8 of 26), in both clocks as no policy calendar applies.
    assert ["2026-03-01", "all", "3", "4.0", "24.8", "4.0", "24.8"] in cells(durations.stdout)
    assert ranked.returncode == 0, ranked.stderr
    assert ["1", "Streets", "3", "2", "66.7%"] in cells(ranked.stdout)
    assert bad_period.returncode == 2
    assert "invalid period 'year': use day, week or month" in bad_period.stderr
    assert bad_since.returncode == 2
    assert "invalid since '1 May'" in bad_since.stderr
    assert bad_now.returncode == 2
    assert "invalid --now 'bogus'" in bad_now.stderr
    assert bad_min_cases.returncode == 2
    assert "--min-cases" in bad_min_cases.stderr
    assert "min_cases" not in bad_min_cases.stderr
