from __future__ import annotations

import csv
import gzip
import io
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from ledger.database import Database, set_tenant
from ledger.events import recorded_event_hash
from ledger.ids import incident_stream_id
from ledger.imports.boston import case_ids
from ledger.imports.pipeline import ImportFileError, import_boston
from ledger.store import PostgresEventStore
from tests.conftest import boston_file

NEW_YORK = "America/New_York"


def boston_header() -> list[str]:
    with gzip.open(boston_file(), "rt", encoding="utf-8", newline="") as source:
        return next(csv.reader(source))


def make_row(header: list[str], **values: str) -> list[str]:
    row = dict.fromkeys(header, "")
    row.update(values)
    return [row[name] for name in header]


def write_export(path: Path, rows: list[list[str]], *, bom: bool = False) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(boston_header())
    writer.writerows(rows)
    data = ("\ufeff" if bom else "") + buffer.getvalue()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data.encode()))
    else:
        path.write_text(data, encoding="utf-8")
    return path


def case(
    case_id: str, opened: str, closed: str = "", target: str = "", **extra: str
) -> dict[str, str]:
    return {
        "CASE_ENQUIRY_ID": case_id,
        "OPEN_DT": opened,
        "CLOSED_DT": closed,
        "TARGET_DT": target,
        "TYPE": "Street Light Outages",
        "Department": "PWDx",
        "LATITUDE": "42.3474",
        "LONGITUDE": "-71.0944",
        "CASE_STATUS": "Closed" if closed else "Open",
        **extra,
    }


def stream_of(tenant: str, case_id: str) -> str:
    return incident_stream_id(case_ids(tenant, case_id)[0])


@pytest.fixture
def tenant() -> str:
    return f"b-{uuid.uuid4().hex[:10]}"


def run_import(database: Database, path: Path, tenant: str, workers: int = 2):  # type: ignore[no-untyped-def]
    with database.connect_owner() as conn:
        return import_boston(conn, path, tenant_id=tenant, time_zone=NEW_YORK, workers=workers)


def test_import_reports_bad_rows_and_keeps_good(
    database: Database, store: PostgresEventStore, tenant: str, tmp_path: Path
) -> None:
    header = boston_header()
    rows = [
        make_row(
            header,
            **case(
                "1001",
                "01/01/2015 12:20:09 AM",
                "01/02/2015 09:08:42 AM",
                "01/03/2015 08:30:00 AM",
                CLOSURE_REASON='Case Closed\nline two, "quoted"',
            ),
        ),
        make_row(header, **case("1002", "13/45/2015 10:00:00 AM")),
        make_row(header, **case("", "01/01/2015 10:00:00 AM")),
        make_row(header, **case("1004", "01/01/2015 10:00:00 AM", LATITUDE="142.1")),
        make_row(header, **case("10O5", "01/01/2015 10:00:00 AM")),
        make_row(header, **case("1006", "")),
        make_row(
            header,
            **case("1007", "02/01/2015 03:04:05 PM", neighborhood=" Roxbury ", ward="Ward 8"),
        ),
        ["too", "few", "fields"],
    ]
    path = write_export(tmp_path / "export.csv", rows, bom=True)

    report = run_import(database, path, tenant)

    assert report.rows == 8
    assert report.cases == 2
    assert report.events_appended == 3
    assert [number for number, _ in report.rejected] == [3, 4, 5, 6, 7, 9]
    reasons = dict(report.rejected)
    assert "OPEN_DT '13/45/2015 10:00:00 AM'" in reasons[3]
    assert "missing CASE_ENQUIRY_ID" in reasons[4]
    assert "LATITUDE '142.1'" in reasons[5]
    assert "CASE_ENQUIRY_ID '10O5'" in reasons[6]
    assert "missing OPEN_DT" in reasons[7]
    assert "3 fields" in reasons[9]

    closed = store.read_stream(tenant, stream_of(tenant, "1001"))
    assert [event.event_type for event in closed] == ["ReportSubmitted", "IncidentClosed"]
    assert closed[0].occurred_at == datetime(2015, 1, 1, 5, 20, 9, tzinfo=UTC)
    assert closed[0].payload["resolution_due_at"].startswith("2015-01-03T13:30:00")
    assert closed[1].payload["reason"] == 'Case Closed\nline two, "quoted"'
    afternoon = store.read_stream(tenant, stream_of(tenant, "1007"))
    assert afternoon[0].occurred_at == datetime(2015, 2, 1, 20, 4, 5, tzinfo=UTC)
    assert afternoon[0].payload["neighborhood"] == "Roxbury"
    assert afternoon[0].payload["ward"] == "Ward 8"
    assert "neighborhood" not in closed[0].payload


def test_concurrent_imports_store_each_case_once(
    database: Database, store: PostgresEventStore, tenant: str, tmp_path: Path
) -> None:
    header = boston_header()
    rows = [
        make_row(
            header,
            **case(
                str(3000 + n), "03/08/2015 01:30:00 AM", "03/09/2015 02:00:00 PM" if n % 2 else ""
            ),
        )
        for n in range(600)
    ]
    path = write_export(tmp_path / "export.csv.gz", rows)
    start = threading.Barrier(3)

    def imported() -> Any:
        start.wait()
        return run_import(database, path, tenant, workers=1)

    with ThreadPoolExecutor(3) as pool:
        reports = list(pool.map(lambda _: imported(), range(3)))

    assert sum(report.events_appended for report in reports) == 900
    for report in reports:
        assert report.events_appended + report.events_already_present == 900
        assert report.rejected == []
    with store.pool.connection() as conn:
        set_tenant(conn, tenant)
        stored = conn.execute(
            "SELECT count(*), count(DISTINCT event_id) FROM events WHERE tenant_id = %s",
            (tenant,),
        ).fetchone()
        heads = conn.execute(
            "SELECT count(*), sum(version) FROM streams WHERE tenant_id = %s", (tenant,)
        ).fetchone()
    assert stored == (900, 900)
    assert heads == (600, 900)


def test_reimport_adds_nothing(
    database: Database, store: PostgresEventStore, tenant: str, tmp_path: Path
) -> None:
    header = boston_header()
    rows = [
        make_row(
            header,
            **case(
                str(2000 + n), "03/08/2015 01:30:00 AM", "03/09/2015 02:00:00 PM" if n % 2 else ""
            ),
        )
        for n in range(50)
    ]
    path = write_export(tmp_path / "export.csv.gz", rows)

    first = run_import(database, path, tenant)
    again = run_import(database, path, tenant, workers=1)

    assert first.events_appended == 75
    assert again.events_appended == 0
    assert again.events_already_present == 75
    with store.pool.connection() as conn:
        set_tenant(conn, tenant)
        count = conn.execute(
            "SELECT count(*) FROM events WHERE tenant_id = %s", (tenant,)
        ).fetchone()
    assert count == (75,)


def test_later_export_extends_streams(
    database: Database, store: PostgresEventStore, tenant: str, tmp_path: Path
) -> None:
    header = boston_header()
    opened = make_row(header, **case("3001", "05/01/2015 09:00:00 AM"))
    closed = make_row(header, **case("3001", "05/01/2015 09:00:00 AM", "05/02/2015 10:00:00 AM"))
    run_import(database, write_export(tmp_path / "january.csv", [opened]), tenant)

    # The later export has the same case, now closed; and a case listed twice.
    report = run_import(
        database,
        write_export(
            tmp_path / "february.csv",
            [
                closed,
                make_row(header, **case("3002", "05/03/2015 09:00:00 AM")),
                make_row(
                    header, **case("3002", "05/03/2015 09:00:00 AM", "05/04/2015 09:00:00 AM")
                ),
            ],
        ),
        tenant,
    )

    assert report.events_appended == 3
    assert report.events_already_present == 2
    for case_id in ("3001", "3002"):
        events = store.read_stream(tenant, stream_of(tenant, case_id))
        assert [e.stream_version for e in events] == [1, 2]
        assert [e.event_type for e in events] == ["ReportSubmitted", "IncidentClosed"]
        previous = None
        for event in events:
            assert event.hash == recorded_event_hash(event, previous)
            previous = event.hash
    assert store.stream_version(tenant, stream_of(tenant, "3001")) == 2


def test_imported_chains_verify(
    database: Database, store: PostgresEventStore, tenant: str, tmp_path: Path
) -> None:
    header = boston_header()
    rows = [
        make_row(
            header,
            **case(
                "4001",
                "11/01/2015 01:30:00 AM",
                "11/01/2015 01:45:00 AM",
                "11/02/2015 08:30:00 AM",
                CASE_TITLE="Tab\there \\ slash",
            ),
        )
    ]
    run_import(database, write_export(tmp_path / "export.csv", rows), tenant)

    events = store.read_stream(tenant, stream_of(tenant, "4001"))
    assert events[0].payload["title"] == "Tab\there \\ slash"
    # 01:30 on the night clocks fall back is read as the first (daylight) 01:30.
    assert events[0].occurred_at == datetime(2015, 11, 1, 5, 30, tzinfo=UTC)
    previous = None
    for event in events:
        assert event.hash == recorded_event_hash(event, previous)
        previous = event.hash


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"id,opened\n1,2\n", r"missing column\(s\) CASE_ENQUIRY_ID, OPEN_DT"),
    ],
)
def test_unusable_file_rejected(
    database: Database, tenant: str, tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "export.csv"
    path.write_bytes(content)
    with pytest.raises(ImportFileError, match=message):
        run_import(database, path, tenant)


def test_real_export_sample_imports(
    database: Database, store: PostgresEventStore, tenant: str, tmp_path: Path
) -> None:
    with gzip.open(boston_file(), "rt", encoding="utf-8", newline="") as source:
        lines = [next(source) for _ in range(2001)]
    path = tmp_path / "sample.csv"
    path.write_text("".join(lines), encoding="utf-8")
    expected = sum(
        1 + bool(row["CLOSED_DT"]) for row in csv.DictReader(io.StringIO("".join(lines)))
    )

    report = run_import(database, path, tenant)

    assert report.rejected == []
    assert report.cases == 2000
    assert report.events_appended == expected


@pytest.mark.parametrize(
    ("buffer", "first", "last"),
    [
        (b"a,b\n1,2\n", 4, 8),
        (b'a,"x\ny"\n1,2', 8, 8),
        (b'a,"x\ny', -1, -1),
        (b"no newline", -1, -1),
        (b'"q""uoted"\n"open\n', 11, 11),
    ],
)
def test_record_boundaries(buffer: bytes, first: int, last: int) -> None:
    from ledger.imports.pipeline import first_record_end, record_end

    assert first_record_end(buffer) == first
    assert record_end(buffer) == last


def test_small_blocks_split_only_between_records(
    database: Database,
    store: PostgresEventStore,
    tenant: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ledger.imports.pipeline as pipeline

    monkeypatch.setattr(pipeline, "BLOCK_BYTES", 97)
    header = boston_header()
    rows = []
    for n in range(40):
        reason = f'Closed\n"note {n}"\nsecond line' if n % 3 == 0 else "Closed"
        rows.append(
            make_row(
                header,
                **case(
                    str(5000 + n),
                    "06/01/2015 09:00:00 AM",
                    "06/02/2015 09:00:00 AM",
                    CLOSURE_REASON=reason,
                ),
            )
        )
    rows.insert(20, make_row(header, **case("bad", "06/01/2015 09:00:00 AM")))
    path = write_export(tmp_path / "export.csv", rows)

    report = run_import(database, path, tenant)

    assert report.rows == 41
    assert report.cases == 40
    assert report.events_appended == 80
    assert [number for number, _ in report.rejected] == [22]
    events = store.read_stream(tenant, stream_of(tenant, "5039"))
    assert events[1].payload["reason"] == 'Closed\n"note 39"\nsecond line'


def test_nul_character_rejects_row(
    database: Database, store: PostgresEventStore, tenant: str, tmp_path: Path
) -> None:
    header = boston_header()
    rows = [
        make_row(header, **case("6001", "06/01/2015 09:00:00 AM", CASE_TITLE="bad\x00title")),
        make_row(header, **case("6002", "06/01/2015 09:00:00 AM")),
    ]
    report = run_import(database, write_export(tmp_path / "export.csv", rows), tenant)

    assert report.rejected == [(2, "invalid CASE_TITLE: contains a NUL character")]
    assert report.events_appended == 1


def test_oversized_field_rejects_only_its_row(
    database: Database, store: PostgresEventStore, tenant: str, tmp_path: Path
) -> None:
    header = boston_header()
    rows = [
        make_row(header, **case("7001", "06/01/2015 09:00:00 AM")),
        make_row(header, **case("7002", "06/01/2015 09:00:00 AM", CASE_TITLE="x" * 200_000)),
        make_row(header, **case("7003", "06/01/2015 09:00:00 AM")),
    ]
    report = run_import(database, write_export(tmp_path / "export.csv", rows), tenant)

    assert [number for number, _ in report.rejected] == [3]
    assert "field larger than field limit" in report.rejected[0][1]
    assert report.events_appended == 2
    assert store.stream_version(tenant, stream_of(tenant, "7003")) == 1
