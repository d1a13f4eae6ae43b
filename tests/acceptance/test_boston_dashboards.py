"""The public and staff pages of a tenant imported from the Boston 2015 export, in headless
Chromium."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
import requests
from psycopg_pool import ConnectionPool

from api.app import create_app
from ledger.config_sections import apply_config
from ledger.database import Database
from ledger.imports.pipeline import import_boston
from ledger.keys import Role, issue_key
from ledger.seals import seal_all
from ledger.store import PostgresEventStore
from ledger.tenants import create_tenant
from tests.browser import artifacts_dir, browser, serve
from tests.conftest import boston_file, project_everything

CASES = 121_145
TENANT = "boston"
DASHBOARDS = [
    {
        "name": "accountability",
        "title": "How Boston answers its 311 cases",
        "widgets": [
            {"id": "on-time", "kind": "on_time_rate", "by": "department", "public": True},
            {"id": "backlog", "kind": "backlog", "period": "week", "periods": 12, "public": True},
            {"id": "closing", "kind": "time_to_close", "span_days": 30, "public": True},
            {
                "id": "ranking",
                "kind": "ranking",
                "by": "department",
                "min_cases": 20,
                "public": True,
            },
            {"id": "map", "kind": "open_map", "limit": 300, "public": True},
            {"id": "seals", "kind": "recent_seals", "public": True},
        ],
    }
]
CHARTED = ("on-time", "backlog", "closing", "ranking", "map")


def _cells(value: Any) -> str:
    return "" if value is None else str(value)


def _tables(page: Any) -> dict[str, list[list[str]]]:
    """Return each widget's table body as text cells, by widget id."""
    tables: dict[str, list[list[str]]] = page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll("article.widget")].map(
            (article) => [article.dataset.widgetId,
                [...article.querySelectorAll("tbody tr")].map(
                    (row) => [...row.querySelectorAll("td")].map((cell) => cell.textContent))]))"""
    )
    return tables


def _check_against_json(page: Any, base: str) -> dict[str, Any]:
    """Assert that every table shows the rows of the JSON API; return the JSON's widgets."""
    url = page.get_attribute("section.dashboard", "data-json-url")
    document = requests.get(base + url, timeout=60).json()
    widgets = {widget["id"]: widget for widget in document["widgets"]}
    tables = _tables(page)
    assert set(tables) == set(widgets)
    for widget_id, widget in widgets.items():
        expected = [[_cells(value) for value in row] for row in widget["rows"]]
        if not expected:
            expected = [["No data for this day."]]
        assert tables[widget_id] == expected, widget_id
    return widgets


def _chart_points(page: Any) -> dict[str, int]:
    points: dict[str, int] = page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll("article.widget .chart")].map(
            (chart) => [chart.closest("article").dataset.widgetId,
                (chart.data || []).reduce((total, trace) =>
                    total + (trace.x || []).filter((value) => value !== null).length, 0)]))"""
    )
    return points


@pytest.mark.slow
def test_boston_public_and_staff_pages(
    fresh_database: Database, fresh_pool: ConnectionPool[Any]
) -> None:
    shots = artifacts_dir("boston-dashboards")
    store = PostgresEventStore(fresh_pool)
    create_tenant(
        store,
        TENANT,
        name="City of Boston",
        time_zone="America/New_York",
        occurred_at=datetime(2014, 12, 31, tzinfo=UTC),
    )
    with fresh_database.connect_owner() as conn:
        report = import_boston(
            conn,
            boston_file(),
            tenant_id=TENANT,
            time_zone="America/New_York",
        )
    assert report.rejected == []
    assert report.cases == CASES
    apply_config(store, TENANT, {"dashboards": DASHBOARDS}, occurred_at=datetime.now(UTC))
    _, staff_key = issue_key(store, TENANT, role=Role.STAFF, name="browser", issued_by="test")
    seal_all(fresh_database, tenant_id=TENANT, actor="test")
    project_everything(fresh_database, batch_size=5000, timeout=300)

    with serve(create_app(fresh_database, pool=fresh_pool)) as base, browser() as context:
        page = context.new_page()

        # The public page as of the end of 10 March 2015.
        page.goto(f"{base}/public/tenants/{TENANT}?day=2015-03-10")
        page.wait_for_selector("html[data-charts-drawn=true]", timeout=60_000)
        assert page.get_attribute("#as-of", "datetime") == "2015-03-11T00:00:00-04:00"
        march = _check_against_json(page, base)
        points = _chart_points(page)
        assert set(points) == set(CHARTED)
        for widget_id in CHARTED:
            assert points[widget_id] > 0, widget_id
        # The seal was made today: none as of March 2015, but the page shows the latest.
        assert march["seals"]["rows"] == []
        latest = requests.get(
            f"{base}/public/tenants/{TENANT}/dashboards/accountability", timeout=60
        ).json()["widgets"][-1]
        assert page.text_content("#seal-root") == latest["rows"][0][3]
        page.screenshot(path=str(shots / "public-2015-03-10.png"), full_page=True)

        # The date picker, moved back: other figures, still equal to the JSON API's.
        page.fill("#day", "2015-02-01")
        page.click(".day-picker button")
        page.wait_for_selector("html[data-charts-drawn=true]", timeout=60_000)
        assert page.get_attribute("#as-of", "datetime") == "2015-02-02T00:00:00-05:00"
        february = _check_against_json(page, base)
        assert february["backlog"]["rows"] != march["backlog"]["rows"]
        assert february["on-time"]["rows"] != march["on-time"]["rows"]
        assert sum(row[1] for row in february["on-time"]["rows"]) < sum(
            row[1] for row in march["on-time"]["rows"]
        )
        page.screenshot(path=str(shots / "public-2015-02-01.png"), full_page=True)

        # On a phone.
        page.set_viewport_size({"width": 390, "height": 844})
        page.reload()
        page.wait_for_selector("html[data-charts-drawn=true]", timeout=60_000)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390
        page.screenshot(path=str(shots / "public-phone.png"), full_page=True)

        # The staff page: list the open cases, then acknowledge the newest one.
        staff = context.new_page()
        staff.goto(f"{base}/staff/tenants/{TENANT}")
        staff.fill("#api-key", staff_key)
        staff.select_option("select[name=status]", "submitted")
        staff.click("#filters button[type=submit]")
        staff.wait_for_selector("#incidents tbody tr", timeout=30_000)
        first_id = staff.get_attribute("#incidents tbody tr", "data-incident-id")
        staff.select_option("#incidents tbody tr select", "acknowledge")
        staff.click("#incidents tbody tr button")
        staff.wait_for_function(
            "document.getElementById('message').textContent.startsWith('acknowledge done')",
            timeout=30_000,
        )
        state = requests.get(
            f"{base}/tenants/{TENANT}/incidents/{first_id}",
            headers={"Authorization": f"Bearer {staff_key}"},
            timeout=60,
        ).json()
        assert state["status"] == "acknowledged"
        staff.screenshot(path=str(shots / "staff.png"), full_page=True)

        # With the page's scripts blocked, the tables are all there.
        plain = context.new_page()
        plain.route("**/*.js", lambda route: route.abort())
        plain.goto(f"{base}/public/tenants/{TENANT}?day=2015-03-10")
        assert _tables(plain)["backlog"] == [
            [_cells(value) for value in row] for row in march["backlog"]["rows"]
        ]
        assert plain.get_attribute("html", "data-charts-drawn") is None
        plain.screenshot(path=str(shots / "public-without-javascript.png"), full_page=True)
