from __future__ import annotations

import csv
import gzip
import io
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.database import Database, set_tenant
from ledger.events import RecordedEvent, recorded_event_hash
from ledger.imports.boston import RowRejected
from ledger.imports.pipeline import ImportFileError, ImportReport, import_file
from ledger.imports.requests import RequestIds, TimeReader
from ledger.lifecycle import fold_incident
from ledger.store import PostgresEventStore
from tests.conftest import SHARED_DATA, boston_file

NEW_YORK = "America/New_York"
LOS_ANGELES = "America/Los_Angeles"
# The import's clock in these tests: times after it are in the future.
NOW = datetime(2026, 1, 1, tzinfo=UTC)

NYC_DISPLAY = [
    "Unique Key",
    "Created Date",
    "Closed Date",
    "Agency",
    "Agency Name",
    "Complaint Type",
    "Descriptor",
    "Incident Zip",
    "Incident Address",
    "Status",
    "Due Date",
    "Resolution Description",
    "Resolution Action Updated Date",
    "Borough",
    "Open Data Channel Type",
    "Latitude",
    "Longitude",
]
NYC_API = [
    "unique_key",
    "created_date",
    "closed_date",
    "agency",
    "agency_name",
    "complaint_type",
    "descriptor",
    "incident_zip",
    "incident_address",
    "status",
    "due_date",
    "resolution_description",
    "resolution_action_updated_date",
    "borough",
    "open_data_channel_type",
    "latitude",
    "longitude",
]
LA_HEADER = [
    "SRNumber",
    "CreatedDate",
    "UpdatedDate",
    "ActionTaken",
    "Owner",
    "RequestType",
    "Status",
    "RequestSource",
    "CreatedByUserOrganization",
    "MobileOS",
    "Anonymous",
    "AssignTo",
    "ServiceDate",
    "ClosedDate",
    "AddressVerified",
    "ApproximateAddress",
    "Address",
    "HouseNumber",
    "Direction",
    "StreetName",
    "Suffix",
    "ZipCode",
    "Latitude",
    "Longitude",
    "Location",
    "CD",
    "CDMember",
    "NC",
    "NCName",
    "PolicePrecinct",
]


def write_csv(
    path: Path,
    header: list[str],
    rows: list[dict[str, str]],
    *,
    bom: bool = False,
    delimiter: str = ",",
) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter)
    writer.writerow(header)
    for row in rows:
        writer.writerow([row.get(name, "") for name in header])
    data = ("\ufeff" if bom else "") + buffer.getvalue()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data.encode()))
    else:
        path.write_text(data, encoding="utf-8")
    return path


@pytest.fixture
def tenant() -> str:
    return f"f-{uuid.uuid4().hex[:10]}"


def run_import(
    database: Database,
    path: Path,
    tenant: str,
    *,
    time_zone: str = NEW_YORK,
    format_name: str | None = None,
    rejects: Path | None = None,
) -> ImportReport:
    with database.connect_owner() as conn:
        return import_file(
            conn,
            path,
            tenant_id=tenant,
            time_zone=time_zone,
            format_name=format_name,
            workers=2,
            rejects_path=rejects,
            now=NOW,
        )


def stream(store: PostgresEventStore, tenant: str, source: str, source_id: str) -> list[Any]:
    incident_id = RequestIds(tenant, source, source_id).of("incident")
    return store.read_stream(tenant, f"incident-{incident_id}")


def event_count(store: PostgresEventStore, tenant: str) -> int:
    with store.pool.connection() as conn:
        set_tenant(conn, tenant)
        row = conn.execute("SELECT count(*) FROM events WHERE tenant_id = %s", (tenant,)).fetchone()
    assert row is not None
    return int(row[0])


def assert_chain(events: list[RecordedEvent]) -> None:
    previous = None
    for number, event in enumerate(events, start=1):
        assert event.stream_version == number
        assert event.hash == recorded_event_hash(event, previous)
        previous = event.hash


def nyc_row(key: str, created: str, **values: str) -> dict[str, str]:
    row = {
        "Unique Key": key,
        "Created Date": created,
        "Agency": "DOT",
        "Agency Name": "Department of Transportation",
        "Complaint Type": "Street Condition",
        "Descriptor": "Pothole",
        "Incident Address": "100 BROADWAY",
        "Status": "Open",
        "Borough": "MANHATTAN",
        "Latitude": "40.7081",
        "Longitude": "-74.0110",
    }
    row.update(values)
    return row


def test_nyc_display_headers_with_hazards(
    database: Database, store: PostgresEventStore, tenant: str, tmp_path: Path
) -> None:
    rows = [
        nyc_row(
            "41000001",
            "01/05/2019 09:15:00 PM",
            **{
                "Closed Date": "01/06/2019 08:00:00 AM",
                "Status": "Closed",
                "Resolution Description": 'Repaired.\nSecond line, "quoted".',
                "Due Date": "01/15/2019 09:15:00 PM",
            },
        ),
        # Placeholders: no address, no position, no status (the closed date decides).
        nyc_row(
            "41000002",
            "03/10/2019 02:30:00 AM",
            **{
                "Incident Address": "N/A",
                "Status": "Unspecified",
                "Latitude": "0.0",
                "Longitude": "0",
                "Closed Date": "03/11/2019 10:00:00 AM",
            },
        ),
        nyc_row("41000003", "2019-02-01T10:00:00", **{"Status": "In Progress"}),
    ]
    path = write_csv(tmp_path / "nyc.csv", NYC_DISPLAY, rows, bom=True)

    report = run_import(database, path, tenant)

    assert report.format == "nyc"
    assert report.rejected == []
    assert report.rows == 3
    assert report.events_appended == 6
    closed = stream(store, tenant, "nyc-311", "41000001")
    assert [e.event_type for e in closed] == ["ReportSubmitted", "IncidentClosed"]
    # 9:15 PM in New York in January is 02:15 UTC the next day.
    assert closed[0].occurred_at == datetime(2019, 1, 6, 2, 15, tzinfo=UTC)
    assert closed[0].payload["category"] == "Street Condition"
    assert closed[0].payload["title"] == "Pothole"
    assert closed[0].payload["department"] == "DOT"
    assert closed[0].payload["details"]["borough"] == "MANHATTAN"
    assert closed[0].payload["resolution_due_at"].startswith("2019-01-16T02:15:00")
    assert closed[1].occurred_at == datetime(2019, 1, 6, 13, 0, tzinfo=UTC)
    assert closed[1].payload["reason"] == 'Repaired.\nSecond line, "quoted".'
    assert_chain(closed)

    placeholders = stream(store, tenant, "nyc-311", "41000002")
    assert [e.event_type for e in placeholders] == ["ReportSubmitted", "IncidentClosed"]
    assert "address" not in placeholders[0].payload
    assert "latitude" not in placeholders[0].payload
    assert "source_status" not in placeholders[0].payload
    # 02:30 on the night clocks spring forward does not exist; it is read with the
    # offset before the change (EST, UTC-5).
    assert placeholders[0].occurred_at == datetime(2019, 3, 10, 7, 30, tzinfo=UTC)

    started = stream(store, tenant, "nyc-311", "41000003")
    assert [e.event_type for e in started] == ["ReportSubmitted", "WorkStarted"]
    state = fold_incident(started)
    assert state is not None
    assert state.status == "in_progress"


def test_nyc_api_fields_match_display_headers(
    database: Database, store: PostgresEventStore, tmp_path: Path
) -> None:
    display = nyc_row(
        "42000001",
        "07/04/2019 11:00:00 AM",
        **{"Closed Date": "07/05/2019 01:30:00 PM", "Status": "Closed"},
    )
    api = {NYC_API[NYC_DISPLAY.index(name)]: value for name, value in display.items()}
    api["created_date"] = "2019-07-04T11:00:00.000"
    api["closed_date"] = "2019-07-05T13:30:00.000"
    first, second = f"d-{uuid.uuid4().hex[:8]}", f"a-{uuid.uuid4().hex[:8]}"

    run_import(database, write_csv(tmp_path / "display.csv", NYC_DISPLAY, [display]), first)
    report = run_import(database, write_csv(tmp_path / "api.csv", NYC_API, [api]), second)

    assert report.format == "nyc"
    from_display = stream(store, first, "nyc-311", "42000001")
    from_api = stream(store, second, "nyc-311", "42000001")
    assert [e.occurred_at for e in from_display] == [e.occurred_at for e in from_api]
    assert from_display[0].payload | {"incident_id": None} == from_api[0].payload | {
        "incident_id": None
    }


def la_row(number: str, created: str, **values: str) -> dict[str, str]:
    row = {
        "SRNumber": number,
        "CreatedDate": created,
        "UpdatedDate": created,
        "ActionTaken": "SR Created",
        "Owner": "BOS",
        "RequestType": "Bulky Items",
        "Status": "Open",
        "RequestSource": "Mobile App",
        "Address": "200 N SPRING ST, 90012",
        "ZipCode": "90012",
        "Latitude": "34.0537",
        "Longitude": "-118.2427",
        "CD": "14",
        "NCName": "DOWNTOWN LOS ANGELES",
    }
    row.update(values)
    return row


def test_los_angeles_export(
    database: Database, store: PostgresEventStore, tenant: str, tmp_path: Path
) -> None:
    rows = [
        la_row(
            "1-1523590121",
            "01/02/2019 08:05:00 AM",
            UpdatedDate="01/04/2019 03:00:00 PM",
            ClosedDate="01/04/2019 03:00:00 PM",
            Status="Closed",
            ActionTaken="SR Closed",
            ServiceDate="01/04/2019 12:00:00 AM",
            AssignTo="EV",
        ),
        la_row("1-1523590122", "2019-01-03T10:00:00.000", Status="Pending"),
        la_row("1-1523590123", "2019-01-03T10:00:00", Latitude="", Longitude=""),
    ]
    path = write_csv(tmp_path / "myla311.csv", LA_HEADER, rows)

    report = run_import(database, path, tenant, time_zone=LOS_ANGELES)

    assert report.format == "la"
    assert report.rejected == []
    assert report.events_appended == 5
    closed = stream(store, tenant, "la-311", "1-1523590121")
    assert [e.event_type for e in closed] == ["ReportSubmitted", "IncidentClosed"]
    assert closed[0].occurred_at == datetime(2019, 1, 2, 16, 5, tzinfo=UTC)
    assert closed[0].payload["department"] == "BOS"
    assert closed[0].payload["assignee"] == "EV"
    assert closed[0].payload["source_channel"] == "Mobile App"
    assert closed[0].payload["details"]["service_date"].startswith("2019-01-04T08:00:00")
    assert closed[0].payload["details"]["council_district"] == "14"
    assert closed[1].payload["reason"] == "SR Closed"
    pending = stream(store, tenant, "la-311", "1-1523590122")
    assert [e.event_type for e in pending] == ["ReportSubmitted", "WorkStarted"]
    assert "latitude" not in stream(store, tenant, "la-311", "1-1523590123")[0].payload


def open311_request(request_id: str, requested: str, **values: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "service_request_id": request_id,
        "status": "open",
        "service_name": "Pothole",
        "service_code": "4fd3b167e750846744000005",
        "description": "Deep pothole",
        "agency_responsible": "Public Works",
        "requested_datetime": requested,
        "updated_datetime": requested,
        "address": "1 Main St",
        "lat": 37.7749,
        "long": -122.4194,
        "media_url": None,
    }
    item.update(values)
    return item


def test_open311_json_array(
    database: Database, store: PostgresEventStore, tenant: str, tmp_path: Path
) -> None:
    items = [
        open311_request(
            "638344",
            "2010-04-14T06:37:38-08:00",
            status="closed",
            status_notes="Duplicate request.",
            updated_datetime="2010-04-14T06:37:38-08:00",
        ),
        open311_request("638349", "2010-04-19T06:37:38Z", expected_datetime="2010-04-20T00:00Z"),
        "not a request",
        open311_request("638350", "yesterday"),
        {"service_request_id": "638351"},
    ]
    path = tmp_path / "requests.json"
    path.write_text("\ufeff" + json.dumps(items), encoding="utf-8")
    rejects = tmp_path / "rejects.csv"

    report = run_import(database, path, tenant, time_zone="UTC", rejects=rejects)

    assert report.format == "open311"
    assert report.rows == 5
    assert [number for number, _ in report.rejected] == [3, 4, 5]
    reasons = dict(report.rejected)
    assert "expected a JSON object" in reasons[3]
    assert "invalid requested_datetime 'yesterday'" in reasons[4]
    assert reasons[5] == "missing requested_datetime"
    with rejects.open(newline="") as source:
        assert list(csv.reader(source))[0] == ["row_number", "reason"]
    closed = stream(store, tenant, "open311", "638344")
    assert [e.event_type for e in closed] == ["ReportSubmitted", "IncidentClosed"]
    assert closed[0].occurred_at == datetime(2010, 4, 14, 14, 37, 38, tzinfo=UTC)
    assert closed[1].occurred_at == closed[0].occurred_at
    assert closed[1].payload["reason"] == "Duplicate request."
    opened = stream(store, tenant, "open311", "638349")
    assert opened[0].payload["resolution_due_at"].startswith("2010-04-20T00:00:00")
    assert opened[0].payload["latitude"] == 37.7749


def test_open311_json_object_rejected(database: Database, tenant: str, tmp_path: Path) -> None:
    path = tmp_path / "requests.json"
    path.write_text('{"service_requests": []}')

    with pytest.raises(ImportFileError, match="expected the JSON array of requests"):
        run_import(database, path, tenant)


def open311_tsv() -> Path:
    path = SHARED_DATA / "open311_multi_city" / "sample_311_data.tsv"
    if not path.is_file():
        boston_file()  # skips, or fails in CI, with the same message style
        pytest.skip(f"Open311 sample not found at {path}")
    return path


def test_open311_multi_city_tsv(
    database: Database, store: PostgresEventStore, tenant: str, tmp_path: Path
) -> None:
    path = open311_tsv()
    with path.open(newline="") as source:
        rows = list(csv.DictReader(source, delimiter="\t"))
    closed = sum(row["status"] == "closed" for row in rows)

    report = run_import(database, path, tenant, rejects=tmp_path / "rejects.csv")
    again = run_import(database, path, tenant, rejects=tmp_path / "rejects.csv")

    assert report.format == "open311"
    assert report.rejected == []
    assert report.rows == len(rows) == 701
    assert report.events_appended == len(rows) + closed
    assert again.events_appended == 0
    assert again.events_already_present == len(rows) + closed
    assert event_count(store, tenant) == len(rows) + closed
    first = rows[0]
    events = stream(store, tenant, "open311", f"{first['city']}/{first['service_request_id']}")
    assert events[0].payload["details"]["city"] == first["city"]
    assert events[0].occurred_at == datetime.fromisoformat(first["requested_datetime"])
    assert_chain(events)


def test_boston_detected_from_header(
    database: Database, store: PostgresEventStore, tenant: str, tmp_path: Path
) -> None:
    with gzip.open(boston_file(), "rt", encoding="utf-8", newline="") as source:
        lines = [next(source) for _ in range(301)]
    path = tmp_path / "boston-sample.csv"
    path.write_text("".join(lines), encoding="utf-8")
    expected = sum(
        1 + bool(row["CLOSED_DT"]) for row in csv.DictReader(io.StringIO("".join(lines)))
    )

    report = run_import(database, path, tenant)
    again = run_import(database, path, tenant)

    assert report.format == "boston"
    assert report.events_appended == expected
    assert again.events_appended == 0


def test_bad_rows_go_to_rejects_file(
    database: Database, store: PostgresEventStore, tenant: str, tmp_path: Path
) -> None:
    rows = [
        nyc_row("43000001", "01/05/2019 09:15:00 AM"),
        nyc_row("", "01/05/2019 09:15:00 AM"),
        nyc_row("43000003", ""),
        nyc_row("43000004", "31/31/2019 09:15:00 AM"),
        nyc_row("43000005", "01/05/2019 09:15:00 AM", **{"Closed Date": "soon"}),
        nyc_row("43000006", "01/05/2019 09:15:00 AM", Latitude="north"),
        nyc_row("43000007", "01/05/2019 13:15:00 PM"),
        nyc_row("43000008", "01/05/2019 09:15:00 AM", Descriptor="nul\x00byte"),
        nyc_row("43000009", "01/06/2019 09:15:00 AM"),
    ]
    path = write_csv(tmp_path / "nyc.csv.gz", NYC_DISPLAY, rows)
    rejects = tmp_path / "out" / "nyc.rejects.csv"
    rejects.parent.mkdir()

    report = run_import(database, path, tenant, rejects=rejects)

    assert report.events_appended == 2
    assert report.rejected_count == 7
    with rejects.open(newline="") as source:
        written = list(csv.DictReader(source))
    assert [int(row["row_number"]) for row in written] == [3, 4, 5, 6, 7, 8, 9]
    reasons = {int(row["row_number"]): row["reason"] for row in written}
    assert reasons[3] == "missing Unique Key"
    assert reasons[4] == "missing Created Date"
    assert "invalid Created Date '31/31/2019 09:15:00 AM'" in reasons[5]
    assert "invalid Closed Date 'soon'" in reasons[6]
    assert "invalid latitude 'north'" in reasons[7]
    assert "hour is 1 to 12" in reasons[8]
    assert "contains a NUL character" in reasons[9]
    assert report.rejected == [(number, reasons[number]) for number in sorted(reasons)]


def snapshot(status: str, updated: str, closed: str = "") -> dict[str, str]:
    return nyc_row(
        "44000001",
        "05/01/2019 09:00:00 AM",
        **{
            "Status": status,
            "Resolution Action Updated Date": updated,
            "Closed Date": closed,
        },
    )


@pytest.mark.parametrize("block_bytes", [1 << 20, 200])
def test_versions_of_one_request_in_order(
    database: Database,
    store: PostgresEventStore,
    tenant: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    block_bytes: int,
) -> None:
    import ledger.imports.pipeline as pipeline

    # 200-byte blocks put each row in a block of its own, so the versions meet in the
    # database instead of inside one chunk.
    monkeypatch.setattr(pipeline, "BLOCK_BYTES", block_bytes)
    rows = [
        snapshot("Open", "05/01/2019 09:00:00 AM"),
        snapshot("Assigned", "05/02/2019 09:00:00 AM"),
        snapshot("Closed", "05/03/2019 09:00:00 AM", "05/03/2019 09:00:00 AM"),
        snapshot("Open", "05/04/2019 09:00:00 AM"),
        snapshot("Closed", "05/05/2019 09:00:00 AM", "05/05/2019 09:00:00 AM"),
    ]
    path = write_csv(tmp_path / "versions.csv", NYC_DISPLAY, rows)

    report = run_import(database, path, tenant)
    again = run_import(database, path, tenant)

    events = stream(store, tenant, "nyc-311", "44000001")
    assert [e.event_type for e in events] == [
        "ReportSubmitted",
        "WorkStarted",
        "IncidentClosed",
        "IncidentReopened",
        "IncidentClosed",
    ]
    assert report.events_appended == 5
    assert again.events_appended == 0
    assert_chain(events)
    state = fold_incident(events)
    assert state is not None
    assert state.status == "closed"
    assert state.closed_at == datetime(2019, 5, 5, 13, 0, tzinfo=UTC)


@pytest.mark.parametrize("block_bytes", [1 << 20, 200])
def test_older_version_does_not_undo_later(
    database: Database,
    store: PostgresEventStore,
    tenant: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    block_bytes: int,
) -> None:
    import ledger.imports.pipeline as pipeline

    monkeypatch.setattr(pipeline, "BLOCK_BYTES", block_bytes)
    rows = [
        snapshot("Closed", "05/03/2019 09:00:00 AM", "05/03/2019 09:00:00 AM"),
        snapshot("Open", "05/01/2019 09:00:00 AM"),
    ]
    path = write_csv(tmp_path / "versions.csv", NYC_DISPLAY, rows)

    report = run_import(database, path, tenant)

    events = stream(store, tenant, "nyc-311", "44000001")
    assert [e.event_type for e in events] == ["ReportSubmitted", "IncidentClosed"]
    assert report.versions_superseded == 1
    state = fold_incident(events)
    assert state is not None
    assert state.status == "closed"


def test_later_export_reopens_request(
    database: Database, store: PostgresEventStore, tenant: str, tmp_path: Path
) -> None:
    closed = snapshot("Closed", "05/03/2019 09:00:00 AM", "05/03/2019 09:00:00 AM")
    reopened = snapshot("Open", "05/06/2019 09:00:00 AM")
    run_import(database, write_csv(tmp_path / "may.csv", NYC_DISPLAY, [closed]), tenant)

    report = run_import(database, write_csv(tmp_path / "june.csv", NYC_DISPLAY, [reopened]), tenant)

    events = stream(store, tenant, "nyc-311", "44000001")
    assert [e.event_type for e in events] == [
        "ReportSubmitted",
        "IncidentClosed",
        "IncidentReopened",
    ]
    assert report.events_appended == 1
    assert events[2].occurred_at == datetime(2019, 5, 6, 13, 0, tzinfo=UTC)
    assert_chain(events)


def test_impossible_history_is_flagged(
    database: Database, store: PostgresEventStore, tenant: str, tmp_path: Path
) -> None:
    rows = [
        # NYC exports carry closed dates such as 01/01/1900 for some requests.
        nyc_row(
            "45000001",
            "05/01/2019 09:00:00 AM",
            **{"Status": "Closed", "Closed Date": "01/01/1900 12:00:00 AM"},
        ),
        nyc_row("45000002", "05/01/2031 09:00:00 AM"),
        nyc_row("45000003", "05/01/2019 09:00:00 AM", Status="Closed"),
    ]
    path = write_csv(tmp_path / "nyc.csv", NYC_DISPLAY, rows)

    report = run_import(database, path, tenant)

    assert report.rejected == []
    backwards = stream(store, tenant, "nyc-311", "45000001")
    assert backwards[0].payload["anomalies"] == ["closed_before_opened"]
    assert backwards[1].payload["anomalies"] == ["closed_before_opened"]
    assert backwards[1].occurred_at == datetime(1900, 1, 1, 5, 0, tzinfo=UTC)
    future = stream(store, tenant, "nyc-311", "45000002")
    assert future[0].payload["anomalies"] == ["opened_in_future"]
    undated = stream(store, tenant, "nyc-311", "45000003")
    assert undated[1].payload["anomalies"] == ["closed_without_date"]
    assert undated[1].occurred_at == undated[0].occurred_at


@pytest.mark.parametrize(
    ("content", "format_name", "message"),
    [
        (b"id,text\n1,hello\n", None, "matches no known export format: found id, text"),
        (b"Unique Key,Closed Date\n1,2\n", "nyc", r"missing column\(s\) created_date"),
        (b"[]", "nyc", "only the open311 format reads"),
        (b"a,b\n", "chicago", "unknown format 'chicago'"),
        (b"\xef\xbb\xbf  \n", None, "empty"),
    ],
)
def test_unusable_file_rejected(
    database: Database,
    tenant: str,
    tmp_path: Path,
    content: bytes,
    format_name: str | None,
    message: str,
) -> None:
    path = tmp_path / "export.csv"
    path.write_bytes(content)

    with pytest.raises(ImportFileError, match=message):
        run_import(database, path, tenant, format_name=format_name)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2019-11-14T00:21:08-05:00", datetime(2019, 11, 14, 5, 21, 8, tzinfo=UTC)),
        ("2019-11-14T05:21:08Z", datetime(2019, 11, 14, 5, 21, 8, tzinfo=UTC)),
        ("2019-11-14T00:21:08.250", datetime(2019, 11, 14, 5, 21, 8, 250000, tzinfo=UTC)),
        ("2019-11-14 00:21:08", datetime(2019, 11, 14, 5, 21, 8, tzinfo=UTC)),
        ("2019-11-14", datetime(2019, 11, 14, 5, 0, tzinfo=UTC)),
        ("11/14/2019 12:21:08 AM", datetime(2019, 11, 14, 5, 21, 8, tzinfo=UTC)),
        ("11/14/2019 12:21:08 PM", datetime(2019, 11, 14, 17, 21, 8, tzinfo=UTC)),
        ("1/4/2019 9:05 pm", datetime(2019, 1, 5, 2, 5, tzinfo=UTC)),
        ("11/14/2019 17:21:08", datetime(2019, 11, 14, 22, 21, 8, tzinfo=UTC)),
        ("11/14/2019", datetime(2019, 11, 14, 5, 0, tzinfo=UTC)),
        # Clocks fall back at 2:00 on 3 November 2019: 1:30 is read as the first one.
        ("11/03/2019 01:30:00 AM", datetime(2019, 11, 3, 5, 30, tzinfo=UTC)),
    ],
)
def test_time_formats(text: str, expected: datetime) -> None:
    value = TimeReader(ZoneInfo(NEW_YORK)).utc_text(text, "Created Date")

    assert value is not None
    assert datetime.fromisoformat(value) == expected


@pytest.mark.parametrize("text", ["", "  ", "N/A", "null", "Unspecified"])
def test_time_placeholders_are_missing(text: str) -> None:
    assert TimeReader(ZoneInfo(NEW_YORK)).utc_text(text, "Closed Date") is None


@pytest.mark.parametrize("text", ["2019-13-01T00:00:00", "13/01/2019 10:00:00 AM", "then"])
def test_invalid_time_rejects_row(text: str) -> None:
    with pytest.raises(RowRejected, match=f"invalid Closed Date {text!r}"):
        TimeReader(ZoneInfo(NEW_YORK)).utc_text(text, "Closed Date")


# Generating time zones is slow on a loaded machine, and the health check would fail the
# test for it; the property does not depend on how fast inputs come.
@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.datetimes(
        min_value=datetime(1971, 1, 1),
        max_value=datetime(2037, 12, 31),
        timezones=st.sampled_from([ZoneInfo(NEW_YORK), ZoneInfo(LOS_ANGELES), UTC]),
    )
)
def test_time_with_offset_keeps_instant(moment: datetime) -> None:
    reader = TimeReader(ZoneInfo(LOS_ANGELES))

    iso = reader.utc_text(moment.isoformat(), "updated_datetime")

    assert iso is not None
    # Compared in UTC: an aware time in a repeated hour never equals one in another zone.
    assert datetime.fromisoformat(iso) == moment.astimezone(UTC)


@given(
    st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2037, 12, 31)).map(
        lambda moment: moment.replace(microsecond=0)
    )
)
def test_us_and_iso_forms_agree(local: datetime) -> None:
    reader = TimeReader(ZoneInfo(NEW_YORK))

    us = reader.utc_text(local.strftime("%m/%d/%Y %I:%M:%S %p"), "Created Date")
    iso = reader.utc_text(local.isoformat(), "Created Date")

    assert us == iso
    assert iso is not None
    # Read back in the zone, the time is the local time written (or, for a time skipped
    # when clocks spring forward, an hour later).
    back = datetime.fromisoformat(iso).astimezone(ZoneInfo(NEW_YORK)).replace(tzinfo=None)
    assert back - local in (timedelta(0), timedelta(hours=1))


def test_unclosed_quote_stops_with_clear_error(
    database: Database,
    store: PostgresEventStore,
    tenant: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ledger.imports.pipeline as pipeline

    monkeypatch.setattr(pipeline, "BLOCK_BYTES", 256)
    monkeypatch.setattr(pipeline, "MAX_RECORD_BYTES", 4096)
    rows = [nyc_row(str(46000000 + n), "05/01/2019 09:00:00 AM") for n in range(20)]
    path = write_csv(tmp_path / "nyc.csv", NYC_DISPLAY, rows)
    with path.open("a") as out:
        out.write('46999999,"never closed\n' + "x,y\n" * 2000)

    with pytest.raises(ImportFileError, match="a quoted field is probably never closed"):
        run_import(database, path, tenant)

    assert event_count(store, tenant) == 20


def test_truncated_json_keeps_requests_before(
    database: Database, store: PostgresEventStore, tenant: str, tmp_path: Path
) -> None:
    items = [open311_request(str(700 + n), "2019-11-14T00:21:08-05:00") for n in range(3)]
    path = tmp_path / "requests.json.gz"
    path.write_bytes(gzip.compress(json.dumps(items).encode()[:-40]))

    with pytest.raises(ImportFileError, match="is not valid JSON"):
        run_import(database, path, tenant)

    assert event_count(store, tenant) == 2
