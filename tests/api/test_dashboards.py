"""Dashboards: configuration, JSON and CSV with as_of and known_at, public reads, incident lists."""

from __future__ import annotations

import csv
import io
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from psycopg_pool import ConnectionPool

from api.app import COMMAND_BODIES, create_app
from ledger.config_sections import apply_config
from ledger.database import Database
from ledger.errors import ConfigInvalid
from ledger.keys import Role, issue_key
from ledger.seals import seal_all
from ledger.store import PostgresEventStore
from ledger.tenants import create_tenant
from projections import dashboard_queries
from projections.incident_queries import IncidentFilter, export_incidents
from projections.trends import trends_projection
from replay.snapshots import take_snapshot
from tests.api.test_app import assert_problem
from tests.conftest import project_everything

DASHBOARDS = [
    {
        "name": "overview",
        "title": "How we are doing",
        "widgets": [
            {"id": "on-time", "kind": "on_time_rate", "by": "category", "public": True},
            {"id": "backlog", "kind": "backlog", "period": "day", "periods": 7, "public": True},
            {"id": "closing", "kind": "time_to_close", "span_days": 30, "public": True},
            {
                "id": "ranking",
                "kind": "ranking",
                "by": "department",
                "min_cases": 1,
                "public": True,
            },
            {"id": "map", "kind": "open_map", "public": True},
            {"id": "seals", "kind": "recent_seals", "public": True},
            {"id": "staff-ranking", "kind": "ranking", "by": "department", "min_cases": 1},
        ],
    },
    {"name": "internal", "widgets": [{"id": "backlog", "kind": "backlog"}]},
]

# Personal data and unpublished text that the reports and commands below carry.
SECRETS = {
    "name": "Margarethe Quillfeather",
    "email": "m.quillfeather@example.org",
    "phone": "617 555 0142",
    "description": "Sinkhole outside number 14 Pemberton Square, my kitchen floods",
    "title": "Pemberton Square sinkhole",
    "address": "14 Pemberton Square",
    "note": "Crew reported the owner was rude; do not publish",
    "question": "Is the basement door at 14 Pemberton unlocked?",
    "reason": "Resident Quillfeather asked to reopen",
}


@dataclass
class City:
    tenant_id: str
    clients: dict[Role, TestClient]
    public: TestClient
    incidents: list[str]
    before_last: datetime  # valid and transaction time between the two batches of reports


def _submit(client: TestClient, tenant_id: str, **fields: Any) -> str:
    response = client.post(f"/tenants/{tenant_id}/incidents", json=fields)
    assert response.status_code == 201, response.text
    incident: str = response.json()["incident_id"]
    return incident


def _run(client: TestClient, tenant_id: str, incident: str, command: str, **body: Any) -> None:
    url = f"/tenants/{tenant_id}/incidents/{incident}"
    version = client.get(url).headers["ETag"]
    response = client.post(f"{url}/{command}", json=body, headers={"If-Match": version})
    assert response.status_code == 200, response.text


@pytest.fixture
def city(fresh_database: Database, fresh_pool: ConnectionPool[Any]) -> Iterator[City]:
    """A tenant with dashboards, reports that carry personal data, and lifecycles."""
    store = PostgresEventStore(fresh_pool)
    tenant_id = f"dash-{uuid.uuid4().hex[:8]}"
    create_tenant(
        store,
        tenant_id,
        name="Pemberton City",
        time_zone="America/New_York",
        occurred_at=datetime(2015, 1, 1, tzinfo=UTC),
    )
    apply_config(
        store,
        tenant_id,
        {
            "categories": [
                {"name": "Pothole", "department": "Public Works"},
                {"name": "Streetlight", "department": "Lighting"},
            ],
            "dashboards": DASHBOARDS,
        },
        occurred_at=datetime(2015, 1, 1, tzinfo=UTC),
    )
    app = create_app(fresh_database, pool=fresh_pool)
    clients = {}
    for role in Role:
        _, token = issue_key(store, tenant_id, role=role, name=f"{role} key", issued_by="test")
        clients[role] = TestClient(app, headers={"Authorization": f"Bearer {token}"})
    staff = clients[Role.STAFF]
    with staff, TestClient(app) as public:
        first = _submit(
            staff,
            tenant_id,
            description=SECRETS["description"],
            title=SECRETS["title"],
            address=SECRETS["address"],
            category="Pothole",
            latitude=42.36041,
            longitude=-71.05889,
            reporter={
                "name": SECRETS["name"],
                "email": SECRETS["email"],
                "phone": SECRETS["phone"],
            },
        )
        second = _submit(
            staff,
            tenant_id,
            description="Lamp dark",
            category="Streetlight",
            latitude=42.35,
            longitude=-71.06,
        )
        _run(staff, tenant_id, second, "request-information", question=SECRETS["question"])
        _run(staff, tenant_id, second, "resolve", note=SECRETS["note"])
        before_last = datetime.now(UTC)
        third = _submit(
            staff,
            tenant_id,
            description="Another hole",
            category="Pothole",
            latitude=42.3605,
            longitude=-71.0589,
        )
        _run(staff, tenant_id, third, "merge-group", with_incident=first)
        _run(staff, tenant_id, second, "reopen", reason=SECRETS["reason"])
        _run(staff, tenant_id, second, "resolve", note=SECRETS["note"])
        seal_all(fresh_database, tenant_id=tenant_id, actor="test")
        project_everything(fresh_database)
        yield City(tenant_id, clients, public, [first, second, third], before_last)


def _widgets(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {widget["id"]: widget for widget in document["widgets"]}


def test_dashboard_section_rejects_unknown_kind(store: PostgresEventStore, tenant_id: str) -> None:
    document = {"dashboards": [{"name": "x", "widgets": [{"id": "a", "kind": "pie"}]}]}

    with pytest.raises(ConfigInvalid) as error:
        apply_config(store, tenant_id, document, occurred_at=datetime.now(UTC))

    assert "'pie'" in str(error.value)
    assert "on_time_rate" in str(error.value)


def test_dashboard_section_rejects_repeated_widget_ids(
    store: PostgresEventStore, tenant_id: str
) -> None:
    widget = {"id": "a", "kind": "backlog"}
    document = {"dashboards": [{"name": "x", "widgets": [widget, widget]}]}

    with pytest.raises(ConfigInvalid) as error:
        apply_config(store, tenant_id, document, occurred_at=datetime.now(UTC))

    assert "widget id(s) a listed twice" in str(error.value)


def test_dashboard_serves_every_widget(city: City) -> None:
    response = city.clients[Role.OFFICER].get(f"/tenants/{city.tenant_id}/dashboards/overview")

    assert response.status_code == 200, response.text
    widgets = _widgets(response.json())
    assert list(widgets) == [item["id"] for item in DASHBOARDS[0]["widgets"]]
    on_time = {row[0]: row for row in widgets["on-time"]["rows"]}
    assert on_time["Pothole"][1] == 2
    assert on_time["Streetlight"][1] == 1
    assert widgets["backlog"]["rows"][-1][1:] == [3, 1, 2]
    assert sum(row[3] for row in widgets["closing"]["rows"]) == 1
    assert len(widgets["map"]["rows"]) == 2
    # Staff merged the two pothole reports into one group.
    assert {row[6] for row in widgets["map"]["rows"]} == {2}
    assert len(widgets["seals"]["rows"]) == 1
    assert re.fullmatch("[0-9a-f]{64}", widgets["seals"]["rows"][0][3])


def test_dashboard_as_of_and_known_at(city: City) -> None:
    url = f"/tenants/{city.tenant_id}/dashboards/overview"
    officer = city.clients[Role.OFFICER]
    moment = city.before_last.isoformat()

    now = _widgets(officer.get(url).json())
    as_of = _widgets(officer.get(url, params={"as_of": moment}).json())
    known = officer.get(url, params={"known_at": moment})
    both = _widgets(officer.get(url, params={"as_of": moment, "known_at": moment}).json())

    assert known.status_code == 200, known.text
    assert known.json()["known_at"] is not None
    known_widgets = _widgets(known.json())
    # Two reports by then, one of them resolved; the third came later.
    assert as_of["backlog"]["rows"][-1][1:] == [2, 1, 1]
    assert known_widgets["backlog"]["rows"][-1][1:] == [2, 1, 1]
    assert now["backlog"]["rows"][-1][1:] == [3, 1, 2]
    for name in ("on-time", "backlog", "closing", "ranking", "map"):
        assert both[name]["rows"] == as_of[name]["rows"], name
        assert known_widgets[name]["rows"] == as_of[name]["rows"], name
    # The seal was made after before_last.
    assert as_of["seals"]["rows"] == []


def test_public_dashboard_serves_public_widgets_only(city: City) -> None:
    url = f"/public/tenants/{city.tenant_id}/dashboards"

    overview = city.public.get(f"{url}/overview")
    internal = city.public.get(f"{url}/internal")
    private_csv = city.public.get(f"{url}/overview/widgets/staff-ranking.csv")

    assert overview.status_code == 200, overview.text
    assert "staff-ranking" not in _widgets(overview.json())
    assert all(widget["public"] for widget in overview.json()["widgets"])
    assert_problem(internal, 404, "public dashboard 'internal'", "overview")
    assert_problem(private_csv, 404, "public widget 'staff-ranking'", "on-time")


def test_widget_csv_matches_json(city: City) -> None:
    base = f"/public/tenants/{city.tenant_id}/dashboards/overview"
    as_of = {"as_of": datetime.now(UTC).isoformat()}

    document = _widgets(city.public.get(base, params=as_of).json())
    for widget_id, widget in document.items():
        response = city.public.get(f"{base}/widgets/{widget_id}.csv", params=as_of)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/csv")
        rows = list(csv.reader(io.StringIO(response.text)))
        assert rows[0] == widget["columns"], widget_id
        expected = [
            ["" if value is None else str(value) for value in row] for row in widget["rows"]
        ]
        assert rows[1:] == expected, widget_id


def test_public_page_shows_tables_and_seal(city: City) -> None:
    page = city.public.get(f"/public/tenants/{city.tenant_id}")

    assert page.status_code == 200, page.text
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    assert html.count("<table>") == 6
    assert "staff-ranking" not in html
    assert 'src="/static/plotly.min.js"' in html
    seal = _widgets(
        city.public.get(f"/public/tenants/{city.tenant_id}/dashboards/overview").json()
    )["seals"]["rows"][0]
    assert f'<code id="seal-root">{seal[3]}</code>' in html
    assert f"civicpulse verify --tenant {city.tenant_id}" in html
    bundle = city.public.get("/static/plotly.min.js")
    assert bundle.status_code == 200
    assert b"plotly" in bundle.content[:2000].lower()


def test_public_page_takes_a_past_day(city: City) -> None:
    page = city.public.get(f"/public/tenants/{city.tenant_id}", params={"day": "2015-06-30"})
    bad = city.public.get(f"/public/tenants/{city.tenant_id}", params={"day": "30/06/2015"})

    assert page.status_code == 200, page.text
    assert 'datetime="2015-07-01T00:00:00-04:00"' in page.text
    assert "No data for this day." in page.text
    # The latest seal is shown whatever the day.
    assert '<code id="seal-root">' in page.text
    assert_problem(bad, 422, "'30/06/2015'", "YYYY-MM-DD")


def test_public_views_contain_no_personal_data(city: City) -> None:
    tenant = city.tenant_id
    moment = {"as_of": city.before_last.isoformat()}
    texts = [
        city.public.get(f"/public/tenants/{tenant}").text,
        city.public.get(
            f"/public/tenants/{tenant}", params={"day": datetime.now(UTC).date().isoformat()}
        ).text,
        city.public.get(f"/public/tenants/{tenant}/dashboards/overview").text,
        city.public.get(f"/public/tenants/{tenant}/dashboards/overview", params=moment).text,
        city.public.get(
            f"/public/tenants/{tenant}/dashboards/overview",
            params={"known_at": datetime.now(UTC).isoformat()},
        ).text,
    ]
    for widget in DASHBOARDS[0]["widgets"]:
        if widget.get("public"):
            texts.append(
                city.public.get(
                    f"/public/tenants/{tenant}/dashboards/overview/widgets/{widget['id']}.csv"
                ).text
            )
    # The reporter's contact details are stored: staff can read them back.
    contact = city.clients[Role.STAFF].get(
        f"/tenants/{tenant}/incidents/{city.incidents[0]}/contact"
    )
    assert contact.json()["name"] == SECRETS["name"]

    for text in texts:
        assert text
        for label, secret in SECRETS.items():
            assert secret not in text, label
            assert json.dumps(secret)[1:-1] not in text, label
        # Only rounded coordinates leave the ledger.
        assert "42.36041" not in text
        assert "42.3605" not in text


def test_put_dashboard_replaces_one_dashboard(city: City) -> None:
    url = f"/tenants/{city.tenant_id}/dashboards/internal"
    body = {"title": "Internal", "widgets": [{"id": "seals", "kind": "recent_seals"}]}

    put = city.clients[Role.ADMIN].put(url, json=body)
    listed = city.clients[Role.STAFF].get(f"/tenants/{city.tenant_id}/dashboards")
    mismatch = city.clients[Role.ADMIN].put(url, json={**body, "name": "other"})
    invalid = city.clients[Role.ADMIN].put(url, json={"widgets": [{"id": "x", "kind": "pie"}]})

    assert put.status_code == 200, put.text
    assert put.json()["changed"] == ["dashboards"]
    assert [item["name"] for item in listed.json()] == ["overview", "internal"]
    assert listed.json()[1]["widgets"] == ["seals"]
    assert listed.json()[0]["public_widgets"] == [
        "on-time",
        "backlog",
        "closing",
        "ranking",
        "map",
        "seals",
    ]
    assert_problem(mismatch, 422, "'other'", "'internal'")
    assert_problem(invalid, 422, "'pie'")


def test_incident_list_filters(city: City) -> None:
    url = f"/tenants/{city.tenant_id}/incidents"
    staff = city.clients[Role.STAFF]

    everything = staff.get(url)
    potholes = staff.get(url, params={"category": "Pothole"})
    resolved = staff.get(url, params={"status": "resolved"})
    breached = staff.get(url, params={"sla": "breached"})
    group_id = potholes.json()["incidents"][0]["group_id"]
    grouped = staff.get(url, params={"group": group_id})
    paged = staff.get(url, params={"limit": 1, "offset": 1})

    assert everything.status_code == 200, everything.text
    incidents = everything.json()["incidents"]
    assert [item["incident_id"] for item in incidents] == city.incidents[::-1]
    assert {item["category"] for item in potholes.json()["incidents"]} == {"Pothole"}
    assert [item["incident_id"] for item in resolved.json()["incidents"]] == [city.incidents[1]]
    assert breached.json()["incidents"] == []
    assert {item["incident_id"] for item in grouped.json()["incidents"]} == {
        city.incidents[0],
        city.incidents[2],
    }
    assert [item["incident_id"] for item in paged.json()["incidents"]] == [city.incidents[1]]
    for item in incidents:
        assert "description" not in item
        assert "contact" not in item


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"status": "lost"}, ("status lost", "submitted")),
        ({"sla": "late"}, ("'late'", "breached, near_breach, on_track")),
        ({"limit": 0}, ("limit 0", "1 to 1000")),
        ({"offset": 2**70}, (f"offset {2**70}", "filters")),
        ({"group": "not-a-uuid"}, ("group",)),
    ],
)
def test_incident_list_bad_parameters(
    city: City, params: dict[str, Any], words: tuple[str, ...]
) -> None:
    response = city.clients[Role.STAFF].get(f"/tenants/{city.tenant_id}/incidents", params=params)
    assert_problem(response, 422, *words)


def test_incident_exports_stream_every_match(city: City) -> None:
    url = f"/tenants/{city.tenant_id}/incidents"
    officer = city.clients[Role.OFFICER]

    as_csv = officer.get(url, params={"format": "csv"})
    as_jsonl = officer.get(url, params={"format": "jsonl", "category": "Pothole"})

    assert as_csv.status_code == 200, as_csv.text
    assert as_csv.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert [row["incident_id"] for row in rows] == city.incidents[::-1]
    assert rows[1]["status"] == "resolved"
    assert as_jsonl.headers["content-type"].startswith("application/x-ndjson")
    records = [json.loads(line) for line in as_jsonl.text.splitlines()]
    assert [record["incident_id"] for record in records] == [city.incidents[2], city.incidents[0]]
    assert records[0]["group_reports"] == 2


def test_staff_page_contains_no_data(city: City) -> None:
    page = city.public.get(f"/staff/tenants/{city.tenant_id}")

    assert page.status_code == 200
    assert 'src="/static/dashboards/staff.js"' in page.text
    assert city.incidents[0] not in page.text


def test_staff_page_offers_every_command(city: City) -> None:
    script = city.public.get("/static/dashboards/staff.js")
    block = re.search(r"const ARGUMENTS = \{(.*?)\};", script.text, re.S)

    assert script.status_code == 200
    assert block is not None
    assert set(re.findall(r'^\s*"([a-z-]+)":', block.group(1), re.M)) == set(COMMAND_BODIES)


def test_dashboards_need_a_staff_officer_or_admin_key(city: City) -> None:
    url = f"/tenants/{city.tenant_id}/dashboards/overview"

    assert_problem(city.clients[Role.REPORTER].get(url), 403)
    assert_problem(city.public.get(url), 401)
    assert_problem(
        city.clients[Role.OFFICER].get(f"/tenants/{city.tenant_id}/dashboards/none"),
        404,
        "dashboard 'none'",
        "overview, internal",
    )


def test_bad_times_get_a_problem(city: City) -> None:
    url = f"/public/tenants/{city.tenant_id}/dashboards/overview"

    assert_problem(city.public.get(url, params={"as_of": "yesterday"}), 422, "'yesterday'")
    assert_problem(city.public.get(url, params={"known_at": "2015-13-01"}), 422, "known_at")
    assert_problem(city.public.get("/public/tenants/nobody-here"), 404, "'nobody-here'")


def test_dashboards_before_any_event_are_empty(city: City) -> None:
    response = city.public.get(
        f"/public/tenants/{city.tenant_id}/dashboards/overview",
        params={"as_of": (datetime.now(UTC) - timedelta(days=400)).isoformat()},
    )

    widgets = _widgets(response.json())
    assert widgets["on-time"]["rows"] == []
    assert all(row[1:] == [0, 0, 0] for row in widgets["backlog"]["rows"])
    assert widgets["map"]["rows"] == []


def test_known_at_rows_and_replay_agree(
    city: City, fresh_database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"/tenants/{city.tenant_id}/dashboards/overview"
    officer = city.clients[Role.OFFICER]
    with fresh_database.connect_worker() as conn:
        snapshot = take_snapshot(conn, trends_projection(), city.tenant_id)
    assert snapshot is not None
    times = [datetime.now(UTC).isoformat(), city.before_last.isoformat()]

    live = _widgets(officer.get(url).json())
    from_rows = [officer.get(url, params={"known_at": moment}) for moment in times]
    # As when the configuration history prevents the split: the whole tenant is folded.
    monkeypatch.setattr(dashboard_queries, "known_at_states", lambda *args: None)
    replayed = [officer.get(url, params={"known_at": moment}) for moment in times]

    for response in [*from_rows, *replayed]:
        assert response.status_code == 200, response.text
    assert [response.json()["snapshot_id"] for response in from_rows] == [None, None]
    assert replayed[0].json()["snapshot_id"] == snapshot.snapshot_id
    for name in ("on-time", "backlog", "closing", "ranking", "map", "seals"):
        assert _widgets(from_rows[0].json())[name]["rows"] == live[name]["rows"], name
        assert _widgets(replayed[0].json())[name]["rows"] == live[name]["rows"], name
        assert (
            _widgets(from_rows[1].json())[name]["rows"]
            == _widgets(replayed[1].json())[name]["rows"]
        ), name


@pytest.mark.parametrize("moment", ["now", "before_last"])
def test_on_time_rate_equals_sla_summary(city: City, moment: str) -> None:
    officer = city.clients[Role.OFFICER]
    params = {} if moment == "now" else {"as_of": city.before_last.isoformat()}

    widget = _widgets(
        officer.get(f"/tenants/{city.tenant_id}/dashboards/overview", params=params).json()
    )["on-time"]
    summary = officer.get(f"/tenants/{city.tenant_id}/sla/summary", params=params).json()

    expected = [
        [item["key"] or "(none)", item["total"], item["breached"], round(item["on_time_rate"], 4)]
        for item in summary["by_category"]
    ]
    assert widget["rows"] == expected


def test_incident_export_yields_one_chunk_per_batch(
    city: City, fresh_pool: ConnectionPool[Any]
) -> None:
    with fresh_pool.connection() as conn:
        chunks = list(
            export_incidents(
                conn,
                city.tenant_id,
                IncidentFilter(),
                "jsonl",
                now=datetime.now(UTC),
                batch_size=1,
            )
        )

    assert len(chunks) == 3
    assert [json.loads(chunk)["incident_id"] for chunk in chunks] == city.incidents[::-1]


def test_public_page_says_when_figures_lag(city: City) -> None:
    page = f"/public/tenants/{city.tenant_id}"
    before = city.public.get(page).text

    _submit(city.clients[Role.STAFF], city.tenant_id, description="Late report")
    after = city.public.get(page).text

    assert "still applying recent reports" not in before
    assert "still applying recent reports" in after
