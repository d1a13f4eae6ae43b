"""The trend routes: figures from the projected model, role checks and bad parameters."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient

from ledger.database import Database
from ledger.keys import Role
from tests.api.test_app import assert_problem
from tests.api.test_grouping import clients, submit  # noqa: F401  (the fixture is used)
from tests.conftest import project_everything


def test_counts_durations_and_rankings(
    clients: dict[Role, TestClient],  # noqa: F811
    database: Database,
    tenant_id: str,
) -> None:
    staff = clients[Role.STAFF]
    first = submit(staff, tenant_id, category="Pothole")
    submit(staff, tenant_id, category="Pothole")
    resolved = staff.post(f"/tenants/{tenant_id}/incidents/{first}/resolve", json={})
    assert resolved.status_code == 200, resolved.text
    project_everything(database)

    now = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    since = (datetime.now(UTC) - timedelta(days=3)).date().isoformat()
    trends = clients[Role.OFFICER].get(
        f"/tenants/{tenant_id}/trends",
        params={"period": "day", "by": "category", "since": since, "now": now},
    )
    durations = clients[Role.ADMIN].get(
        f"/tenants/{tenant_id}/trends/durations",
        params={"measure": "resolution", "period": "month", "now": now},
    )
    ranking = staff.get(
        f"/tenants/{tenant_id}/trends/rankings", params={"min_cases": 1, "now": now}
    )

    assert trends.status_code == 200, trends.text
    rows = trends.json()["rows"]
    assert sum(row["opened"] for row in rows if row["key"] == "Pothole") == 2
    assert sum(row["closed"] for row in rows if row["key"] == "Pothole") == 1
    # The backlog at the end of the last day (New York time) contains the one open incident.
    assert rows[-1]["backlog"] == 1
    assert trends.json()["since"] == since
    assert durations.status_code == 200, durations.text
    assert [row["count"] for row in durations.json()["rows"]] == [1]
    assert durations.json()["rows"][0]["calendar_median"] >= 0
    assert ranking.status_code == 200, ranking.text
    assert ranking.json()["min_cases"] == 1


def test_reporters_may_not_read_trends(
    clients: dict[Role, TestClient],  # noqa: F811
    tenant_id: str,
) -> None:
    response = clients[Role.REPORTER].get(f"/tenants/{tenant_id}/trends")
    assert_problem(response, 403)


@pytest.mark.parametrize(
    ("path", "params", "words"),
    [
        ("trends", {"period": "year"}, ("'year'", "day, week or month")),
        ("trends", {"by": "colour"}, ("'colour'", "category, department, area")),
        ("trends", {"since": "2015-13-01"}, ("'2015-13-01'", "YYYY-MM-DD")),
        ("trends", {"since": "2016-02-01", "until": "2016-01-01"}, ("swap them",)),
        ("trends", {"period": "day", "since": "1990-01-01"}, ("more than 1000 days",)),
        ("trends", {"now": "yesterday"}, ("'yesterday'", "ISO 8601")),
        ("trends/rankings", {"now": "notatime"}, ("invalid now 'notatime'", "ISO 8601")),
        ("trends/durations", {"measure": "speed"}, ("'speed'", "first_response or resolution")),
        ("trends/rankings", {"by": "category"}, ("'category'", "department, area")),
        ("trends/rankings", {"min_cases": 0}, ("min_cases 0", "1 or more")),
    ],
)
def test_bad_parameters_get_a_problem(
    clients: dict[Role, TestClient],  # noqa: F811
    tenant_id: str,
    path: str,
    params: dict[str, object],
    words: tuple[str, ...],
) -> None:
    response = clients[Role.STAFF].get(f"/tenants/{tenant_id}/{path}", params=params)
    assert_problem(response, 422, *words)
