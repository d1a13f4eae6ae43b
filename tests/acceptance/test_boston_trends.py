"""Trend counts of the Boston 2015 import against counts taken straight from the CSV.

The export's times are wall times in Boston, so the month of a time is the month written
in the file, and the counts below need no time zone arithmetic.
"""

from __future__ import annotations

import csv
import gzip
from collections import Counter
from datetime import UTC, date, datetime

import pytest

from ledger.database import Database
from ledger.imports.pipeline import import_boston
from projections.trends_queries import trend_counts
from tests.conftest import boston_file, project_everything

BOSTON_TIME = "%m/%d/%Y %I:%M:%S %p"
Month = tuple[int, int]


def _month(text: str) -> Month:
    moment = datetime.strptime(text, BOSTON_TIME)
    return moment.year, moment.month


@pytest.mark.slow
def test_boston_monthly_counts_match_the_csv(fresh_database: Database) -> None:
    opened: Counter[tuple[Month, str | None]] = Counter()
    closed: Counter[tuple[Month, str | None]] = Counter()
    flagged: Counter[tuple[Month, str | None]] = Counter()
    # The area is the neighborhood, or the ward when the neighborhood is blank.
    by_area: Counter[tuple[Month, str | None]] = Counter()
    # (opened month, month the case left the backlog or None) per department.
    spans: list[tuple[str | None, Month, Month | None]] = []
    with gzip.open(boston_file(), "rt", encoding="utf-8", newline="") as source:
        for row in csv.DictReader(source):
            department = row["Department"].strip() or None
            opened_at = datetime.strptime(row["OPEN_DT"], BOSTON_TIME)
            opened[(_month(row["OPEN_DT"]), department)] += 1
            area = row["neighborhood"].strip() or row["ward"].strip() or None
            by_area[(_month(row["OPEN_DT"]), area)] += 1
            left = None
            if row["CLOSED_DT"]:
                closed_at = datetime.strptime(row["CLOSED_DT"], BOSTON_TIME)
                closed[(_month(row["CLOSED_DT"]), department)] += 1
                if closed_at < opened_at:
                    flagged[(_month(row["OPEN_DT"]), department)] += 1
                latest = max(opened_at, closed_at)
                left = (latest.year, latest.month)
            spans.append((department, _month(row["OPEN_DT"]), left))
    assert sum(opened.values()) == 121_145

    with fresh_database.connect_owner() as conn:
        report = import_boston(
            conn, boston_file(), tenant_id="boston", time_zone="America/New_York"
        )
    assert report.rejected == []
    project_everything(fresh_database, batch_size=5000, timeout=600)

    months = sorted({month for month, _ in opened} | {month for month, _ in closed})
    with fresh_database.connect() as conn:
        rows = trend_counts(
            conn,
            "boston",
            period="month",
            by="department",
            since=date(*months[0], 1),
            until=date(*months[-1], 1),
            now=datetime(2030, 1, 1, tzinfo=UTC),
            time_zone="America/New_York",
        )

        area_rows = trend_counts(
            conn,
            "boston",
            period="month",
            by="area",
            since=date(*months[0], 1),
            until=date(*months[-1], 1),
            now=datetime(2030, 1, 1, tzinfo=UTC),
            time_zone="America/New_York",
        )

    opened_by_area = {
        ((row.period.year, row.period.month), row.key): row.opened
        for row in area_rows
        if row.opened
    }
    assert opened_by_area == dict(by_area)
    assert len({area for _, area in by_area if area is not None}) > 10

    ours = {((row.period.year, row.period.month), row.key): row for row in rows}
    assert {key: row.opened for key, row in ours.items() if row.opened} == dict(opened)
    assert {key: row.closed for key, row in ours.items() if row.closed} == dict(closed)
    assert {key: row.flagged for key, row in ours.items() if row.flagged} == dict(flagged)
    backlog: Counter[tuple[Month, str | None]] = Counter()
    for department, first, left in spans:
        for month in months:
            if first <= month and (left is None or left > month):
                backlog[(month, department)] += 1
    assert {key: row.backlog for key, row in ours.items() if row.backlog} == dict(backlog)
