"""Audit queries on a real PostgreSQL: filters, pages, exports, histories and changes."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import tracemalloc
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool

from ledger.audit import (
    MAX_PAGE_SIZE,
    AuditFilter,
    audit_transaction,
    incident_history,
    parse_time,
    read_changes,
    read_page,
)
from ledger.audit_export import RECORD_FIELDS, event_record, export_events
from ledger.database import Database, set_tenant
from ledger.errors import IncidentNotFound, InvalidRequest
from ledger.events import NewEvent, RecordedEvent, recorded_event_hash
from ledger.ids import incident_stream_id
from ledger.lifecycle import ACKNOWLEDGED, ASSIGNED, SUBMITTED
from ledger.store import PostgresEventStore
from ledger.tenants import create_tenant
from tests.ledger.audit_scenario import (
    MARCH_1,
    MARCH_2,
    MARCH_3,
    AuditScenario,
    build_scenario,
    copy_events,
    tenant_events,
    wait_for_horizon,
)


@pytest.fixture(scope="module")
def scenario(database: Database, session_pool: ConnectionPool[Any]) -> AuditScenario:
    return build_scenario(PostgresEventStore(session_pool), database)


def walk(
    pool: ConnectionPool[Any],
    tenant_id: str,
    audit_filter: AuditFilter,
    limit: int,
    cursor: str | None = None,
) -> tuple[list[list[RecordedEvent]], str]:
    """Read pages from `cursor` until has_more is false; return them and the last
    next_cursor."""
    pages = []
    while True:
        with pool.connection() as conn, audit_transaction(conn, tenant_id):
            page = read_page(conn, tenant_id, audit_filter, cursor=cursor, limit=limit)
        pages.append(page.events)
        cursor = page.next_cursor
        if not page.has_more:
            return pages, cursor
        assert len(pages) < 1000, "pages never end"


def positions(events: list[RecordedEvent]) -> list[int]:
    return [event.position for event in events]


def recorded_at_of(scenario: AuditScenario, incident: uuid.UUID, version: int) -> datetime:
    stream = incident_stream_id(incident)
    return next(
        event.recorded_at
        for event in scenario.events
        if event.stream_id == stream and event.stream_version == version
    )


FilterCase = tuple[
    Callable[[AuditScenario], AuditFilter], Callable[[AuditScenario, RecordedEvent], bool]
]

FILTER_CASES: dict[str, FilterCase] = {
    "actor": (
        lambda s: AuditFilter(actor="alice"),
        lambda s, e: e.metadata.get("actor") == "alice",
    ),
    "role": (
        lambda s: AuditFilter(role="reporter"),
        lambda s, e: e.metadata.get("role") == "reporter",
    ),
    "one event type": (
        lambda s: AuditFilter(event_types=("IncidentAcknowledged",)),
        lambda s, e: e.event_type == "IncidentAcknowledged",
    ),
    "two event types": (
        lambda s: AuditFilter(event_types=("IncidentResolved", "ReportSubmitted")),
        lambda s, e: e.event_type in ("IncidentResolved", "ReportSubmitted"),
    ),
    "incident": (
        lambda s: AuditFilter(incident_id=s.graffiti),
        lambda s, e: e.stream_id == incident_stream_id(s.graffiti),
    ),
    "stream": (
        lambda s: AuditFilter(stream_id=f"keys-{s.tenant_id}"),
        lambda s, e: e.stream_id == f"keys-{s.tenant_id}",
    ),
    "category": (
        lambda s: AuditFilter(category="Pothole"),
        lambda s, e: (
            e.stream_id in (incident_stream_id(s.old_pothole), incident_stream_id(s.new_pothole))
        ),
    ),
    "valid time": (
        lambda s: AuditFilter(occurred_from=MARCH_1, occurred_to=MARCH_3),
        lambda s, e: MARCH_1 <= e.occurred_at < MARCH_3,
    ),
    "transaction time": (
        lambda s: AuditFilter(
            recorded_from=recorded_at_of(s, s.graffiti, 1),
            recorded_to=recorded_at_of(s, s.new_pothole, 1),
        ),
        lambda s, e: (
            recorded_at_of(s, s.graffiti, 1) <= e.recorded_at < recorded_at_of(s, s.new_pothole, 1)
        ),
    ),
    "actor and category": (
        lambda s: AuditFilter(actor="bob", category="Pothole"),
        lambda s, e: (
            e.metadata.get("actor") == "bob"
            and e.stream_id
            in (incident_stream_id(s.old_pothole), incident_stream_id(s.new_pothole))
        ),
    ),
}


@pytest.mark.parametrize("case", FILTER_CASES, ids=list(FILTER_CASES))
def test_filter_narrows(
    scenario: AuditScenario, session_pool: ConnectionPool[Any], case: str
) -> None:
    make_filter, matches = FILTER_CASES[case]
    expected = [event for event in scenario.events if matches(scenario, event)]

    pages, _ = walk(session_pool, scenario.tenant_id, make_filter(scenario), MAX_PAGE_SIZE)

    assert expected, "the case selects nothing in the scenario"
    assert len(expected) < len(scenario.events), "the case does not narrow anything"
    assert positions(pages[0]) == positions(expected)


def test_valid_time_and_transaction_time_differ(
    scenario: AuditScenario, session_pool: ConnectionPool[Any]
) -> None:
    march = AuditFilter(occurred_from=MARCH_1, occurred_to=MARCH_3 + timedelta(days=1), actor="bob")
    recorded_in_march = AuditFilter(
        recorded_from=MARCH_1, recorded_to=MARCH_3 + timedelta(days=1), actor="bob"
    )
    recorded_lately = AuditFilter(
        recorded_from=scenario.events[0].recorded_at, actor="bob", category="Pothole"
    )

    in_march, _ = walk(session_pool, scenario.tenant_id, march, 100)
    nothing, _ = walk(session_pool, scenario.tenant_id, recorded_in_march, 100)
    lately, _ = walk(session_pool, scenario.tenant_id, recorded_lately, 100)

    assert [event.event_type for event in in_march[0]] == ["IncidentAssigned"]
    assert nothing == [[]]
    assert in_march[0][0].position in positions(lately[0])


@pytest.mark.parametrize("limit", [1, 2, 3, 5])
def test_pages_walk_every_event_once(
    scenario: AuditScenario, session_pool: ConnectionPool[Any], limit: int
) -> None:
    pages, _ = walk(session_pool, scenario.tenant_id, AuditFilter(), limit)
    walked = [event for page in pages for event in page]

    assert positions(walked) == positions(scenario.events)
    assert all(len(page) <= limit for page in pages)
    assert all(len(page) == limit for page in pages[:-1])


def test_pages_take_events_appended_between_pages(
    database: Database, session_pool: ConnectionPool[Any]
) -> None:
    store = PostgresEventStore(session_pool)
    tenant = build_scenario(store, database).tenant_id
    cursor = None
    walked: list[RecordedEvent] = []
    for round_number in range(6):
        with session_pool.connection() as conn, audit_transaction(conn, tenant):
            page = read_page(conn, tenant, AuditFilter(), cursor=cursor, limit=3)
        walked.extend(page.events)
        cursor = page.next_cursor
        # Two new events on an existing stream and one on a new stream, between pages.
        for stream, version in (("notes", None), (f"notes-{round_number}", 0)):
            note = NewEvent("NoteAdded", {"round": round_number}, datetime.now(UTC))
            store.append(tenant, f"{stream}-{tenant}", [note], expected_version=version)
    every = tenant_events(database, tenant)
    wait_for_horizon(database, every[-1].tx_id)
    rest, _ = walk(session_pool, tenant, AuditFilter(), 4, cursor)
    walked.extend(event for page in rest for event in page)

    assert positions(walked) == positions(every)
    assert len(set(positions(walked))) == len(walked)


def test_pages_wait_for_a_transaction_that_commits_late(
    database: Database, session_pool: ConnectionPool[Any]
) -> None:
    store = PostgresEventStore(session_pool)
    tenant = build_scenario(store, database).tenant_id
    _, cursor = walk(session_pool, tenant, AuditFilter(), 50)
    now = datetime.now(UTC)

    # The first append takes the lower position but commits after the second one.
    with database.connect() as late_conn:
        with late_conn.transaction():
            late = store.append(
                tenant,
                f"late-{tenant}",
                [NewEvent("NoteAdded", {}, now)],
                expected_version=0,
                conn=late_conn,
            )
            early = store.append(
                tenant, f"early-{tenant}", [NewEvent("NoteAdded", {}, now)], expected_version=0
            )
            with session_pool.connection() as conn, audit_transaction(conn, tenant):
                while_open = read_page(conn, tenant, AuditFilter(), cursor=cursor, limit=50)
        every = tenant_events(database, tenant)
        wait_for_horizon(database, every[-1].tx_id)
    with session_pool.connection() as conn, audit_transaction(conn, tenant):
        after_commit = read_page(
            conn, tenant, AuditFilter(), cursor=while_open.next_cursor, limit=50
        )

    assert late.positions[0] < early.positions[0]
    assert while_open.events == []
    assert sorted(positions(after_commit.events)) == [late.positions[0], early.positions[0]]


def test_cursor_of_other_filters_rejected(
    scenario: AuditScenario, session_pool: ConnectionPool[Any]
) -> None:
    with session_pool.connection() as conn, audit_transaction(conn, scenario.tenant_id):
        page = read_page(conn, scenario.tenant_id, AuditFilter(actor="alice"), limit=1)
        with pytest.raises(InvalidRequest, match="other filters"):
            read_page(conn, scenario.tenant_id, AuditFilter(actor="bob"), cursor=page.next_cursor)
        with pytest.raises(InvalidRequest, match="other filters"):
            read_page(conn, scenario.tenant_id, AuditFilter(), cursor=page.next_cursor)
        with pytest.raises(InvalidRequest, match="other filters"):
            read_page(conn, "another-tenant", AuditFilter(actor="alice"), cursor=page.next_cursor)
        again = read_page(
            conn, scenario.tenant_id, AuditFilter(actor="alice"), cursor=page.next_cursor
        )

    assert again.events[0].position > page.events[0].position


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "cursor",
    [
        "not a cursor",
        "",
        _b64(b"not json"),
        _b64(b"[1, 2]"),
        _b64(b'{"v": 2, "t": 1, "p": 1, "f": "x"}'),
        _b64(b'{"v": 1, "t": "1", "p": 1, "f": "x"}'),
        _b64(b'{"v": 1, "t": 1, "p": -1, "f": "x"}'),
        _b64(b'{"v": 1, "t": 1, "p": 1}'),
        "A" * 600,
    ],
)
def test_corrupt_cursor_rejected(
    scenario: AuditScenario, session_pool: ConnectionPool[Any], cursor: str
) -> None:
    with (
        session_pool.connection() as conn,
        audit_transaction(conn, scenario.tenant_id),
        pytest.raises(InvalidRequest, match="invalid cursor"),
    ):
        read_page(conn, scenario.tenant_id, AuditFilter(), cursor=cursor)


@pytest.mark.parametrize("limit", [0, -1, MAX_PAGE_SIZE + 1])
def test_limit_out_of_range_rejected(
    scenario: AuditScenario, session_pool: ConnectionPool[Any], limit: int
) -> None:
    with (
        session_pool.connection() as conn,
        audit_transaction(conn, scenario.tenant_id),
        pytest.raises(InvalidRequest, match=f"invalid limit {limit}"),
    ):
        read_page(conn, scenario.tenant_id, AuditFilter(), limit=limit)


def test_event_types_and_roles_checked(
    database: Database, session_pool: ConnectionPool[Any]
) -> None:
    store = PostgresEventStore(session_pool)
    tenant = build_scenario(store, database).tenant_id
    note = NewEvent("NoteAdded", {}, datetime.now(UTC), metadata={"role": "scheduler"})
    store.append(tenant, f"notes-{tenant}", [note], expected_version=0)
    wait_for_horizon(database, tenant_events(database, tenant)[-1].tx_id)

    def page(audit_filter: AuditFilter) -> list[RecordedEvent]:
        with session_pool.connection() as conn, audit_transaction(conn, tenant):
            return read_page(conn, tenant, audit_filter).events

    with pytest.raises(InvalidRequest, match="unknown event_type 'Reported'") as unknown_type:
        page(AuditFilter(event_types=("ReportSubmitted", "Reported")))
    with pytest.raises(InvalidRequest, match="unknown role 'auditor'") as unknown_role:
        page(AuditFilter(role="auditor"))
    never_happened = page(AuditFilter(event_types=("IncidentRejected",)))
    from_the_log = page(AuditFilter(event_types=("NoteAdded",), role="scheduler"))

    assert "IncidentRejected" in str(unknown_type.value)
    assert "NoteAdded" in str(unknown_type.value)
    assert "scheduler" in str(unknown_role.value)
    assert never_happened == []
    assert [event.event_type for event in from_the_log] == ["NoteAdded"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"actor": ""}, "invalid actor"),
        ({"actor": "a\x00b"}, "invalid actor"),
        ({"category": "x" * 201}, "invalid category"),
        ({"event_types": ("Bad\x00",)}, "invalid event_type"),
        (
            {"occurred_from": MARCH_2, "occurred_to": MARCH_1},
            "invalid occurred range",
        ),
        ({"recorded_from": MARCH_1, "recorded_to": MARCH_1}, "invalid recorded range"),
        ({"recorded_from": datetime(2015, 3, 1)}, "no time zone offset"),
    ],
)
def test_invalid_filter_values_rejected(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        AuditFilter(**arguments)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2015-03-01T09:00", datetime(2015, 3, 1, 14, 0, tzinfo=UTC)),
        ("2015-07-01", datetime(2015, 7, 1, 4, 0, tzinfo=UTC)),
        ("2015-03-01T14:00:00Z", datetime(2015, 3, 1, 14, 0, tzinfo=UTC)),
        ("2015-03-01T15:00:00+01:00", datetime(2015, 3, 1, 14, 0, tzinfo=UTC)),
        # A '+' sent unencoded in a URL arrives as a space.
        ("2015-03-01T15:00:00 01:00", datetime(2015, 3, 1, 14, 0, tzinfo=UTC)),
    ],
)
def test_parse_time_reads_tenant_zone(text: str, expected: datetime) -> None:
    parsed = parse_time("known_at", text, "America/New_York")

    assert parsed == expected


@pytest.mark.parametrize("text", ["yesterday", "2015-13-01", "2015-03-01T25:00", "1e9", ""])
def test_parse_time_rejects_malformed(text: str) -> None:
    with pytest.raises(InvalidRequest, match=f"invalid occurred_from {text!r}: use ISO 8601"):
        parse_time("occurred_from", text, "UTC")


@pytest.mark.parametrize("text", ["9999-12-31T23:59", "0001-01-01T00:00+14:00"])
def test_parse_time_rejects_out_of_range(text: str) -> None:
    expected = re.escape(f"invalid occurred_to {text!r}: the time is out of range")
    with pytest.raises(InvalidRequest, match=expected):
        parse_time("occurred_to", text, "America/New_York")


def _parse_csv(data: bytes) -> list[dict[str, Any]]:
    """Read an export back into records, with the types event_record gives them."""
    records = []
    for row in csv.DictReader(io.StringIO(data.decode())):
        record: dict[str, Any] = {}
        for name in RECORD_FIELDS:
            text = row[name]
            if name in ("position", "tx_id", "schema_version", "stream_version"):
                record[name] = int(text)
            elif name in ("payload", "metadata"):
                record[name] = json.loads(text)
            else:
                record[name] = text or None
        records.append(record)
    return records


@pytest.mark.parametrize("export_format", ["csv", "jsonl"])
@pytest.mark.parametrize("batch_size", [1, 2, 1000])
def test_export_contains_exactly_the_filtered_events(
    scenario: AuditScenario,
    session_pool: ConnectionPool[Any],
    export_format: Any,
    batch_size: int,
) -> None:
    audit_filter = AuditFilter(category="Pothole")
    potholes = (incident_stream_id(scenario.old_pothole), incident_stream_id(scenario.new_pothole))
    expected = [event_record(e) for e in scenario.events if e.stream_id in potholes]

    with session_pool.connection() as conn:
        data = b"".join(
            export_events(
                conn, scenario.tenant_id, audit_filter, export_format, batch_size=batch_size
            )
        )
    if export_format == "csv":
        exported = _parse_csv(data)
    else:
        exported = [json.loads(line) for line in data.splitlines()]

    assert len(expected) == 4
    assert exported == expected


def test_export_of_nothing_is_header_or_empty(
    scenario: AuditScenario, session_pool: ConnectionPool[Any]
) -> None:
    nobody = AuditFilter(actor="nobody")
    with session_pool.connection() as conn:
        csv_data = b"".join(export_events(conn, scenario.tenant_id, nobody, "csv"))
        jsonl_data = b"".join(export_events(conn, scenario.tenant_id, nobody, "jsonl"))

    assert csv_data.decode().splitlines() == [",".join(RECORD_FIELDS)]
    assert jsonl_data == b""


def test_export_carries_what_the_hash_covers(
    scenario: AuditScenario, session_pool: ConnectionPool[Any]
) -> None:
    with session_pool.connection() as conn:
        data = b"".join(
            export_events(
                conn, scenario.tenant_id, AuditFilter(incident_id=scenario.graffiti), "jsonl"
            )
        )
    previous = None
    for line in data.splitlines():
        record = orjson.loads(line)
        rebuilt = RecordedEvent(
            position=record["position"],
            tx_id=record["tx_id"],
            tenant_id=scenario.tenant_id,
            stream_id=record["stream_id"],
            stream_version=record["stream_version"],
            event_type=record["event_type"],
            schema_version=record["schema_version"],
            payload=record["payload"],
            metadata=record["metadata"],
            occurred_at=datetime.fromisoformat(record["occurred_at"]),
            recorded_at=datetime.fromisoformat(record["recorded_at"]),
            event_id=uuid.UUID(record["event_id"]),
            hash=bytes.fromhex(record["hash"]),
        )

        assert recorded_event_hash(rebuilt, previous) == rebuilt.hash
        previous = rebuilt.hash
    assert previous is not None


def test_export_closed_early_ends_its_transaction(
    scenario: AuditScenario, database: Database
) -> None:
    with database.connect() as conn:
        chunks = export_events(conn, scenario.tenant_id, AuditFilter(), "jsonl", batch_size=1)
        first = next(chunks)
        during = conn.info.transaction_status
        cursors_during = _open_cursors(conn)
        chunks.close()

        assert len(first.splitlines()) == 1
        assert during == TransactionStatus.INTRANS
        assert cursors_during == ["audit_events_export"]
        assert conn.info.transaction_status == TransactionStatus.IDLE
        with conn.transaction():
            set_tenant(conn, scenario.tenant_id)
            assert conn.execute("SELECT count(*) FROM pg_cursors").fetchone() == (0,)


def _open_cursors(conn: psycopg.Connection[Any]) -> list[str]:
    return [row[0] for row in conn.execute("SELECT name FROM pg_cursors")]


def test_history_known_at_excludes_later_events(
    scenario: AuditScenario, session_pool: ConnectionPool[Any]
) -> None:
    tenant = scenario.tenant_id
    submitted_at = recorded_at_of(scenario, scenario.graffiti, 1)
    acknowledged_at = recorded_at_of(scenario, scenario.graffiti, 2)

    with session_pool.connection() as conn, audit_transaction(conn, tenant):
        at_submission = incident_history(conn, tenant, scenario.graffiti, known_at=submitted_at)
        just_before = incident_history(
            conn, tenant, scenario.graffiti, known_at=acknowledged_at - timedelta(microseconds=1)
        )
        before = incident_history(
            conn, tenant, scenario.graffiti, known_at=submitted_at - timedelta(seconds=1)
        )
        now = incident_history(conn, tenant, scenario.graffiti, known_at=datetime.now(UTC))

    assert [event.stream_version for event in at_submission.events] == [1]
    assert at_submission.state is not None
    assert at_submission.state.status == SUBMITTED
    assert [event.stream_version for event in just_before.events] == [1]
    assert before.events == []
    assert before.state is None
    assert [event.stream_version for event in now.events] == [1, 2, 3]
    assert now.state is not None
    assert now.state.status == "resolved"


def test_history_as_of_limits_valid_time(
    scenario: AuditScenario, session_pool: ConnectionPool[Any]
) -> None:
    tenant = scenario.tenant_id
    with session_pool.connection() as conn, audit_transaction(conn, tenant):
        on_march_2 = incident_history(
            conn,
            tenant,
            scenario.old_pothole,
            known_at=datetime.now(UTC),
            as_of=MARCH_2 + timedelta(hours=1),
        )
        known_in_march = incident_history(
            conn, tenant, scenario.old_pothole, known_at=MARCH_3 + timedelta(days=1)
        )
        now = incident_history(conn, tenant, scenario.old_pothole, known_at=datetime.now(UTC))

    assert [event.event_type for event in on_march_2.events] == [
        "ReportSubmitted",
        "IncidentAcknowledged",
    ]
    assert on_march_2.state is not None
    assert on_march_2.state.status == ACKNOWLEDGED
    # It happened in March 2015, but the ledger learned of it only during this test.
    assert known_in_march.events == []
    assert now.state is not None
    assert now.state.status == ASSIGNED


def test_history_of_unknown_incident_not_found(
    scenario: AuditScenario, database: Database, session_pool: ConnectionPool[Any]
) -> None:
    other = build_scenario(PostgresEventStore(session_pool), database)
    with session_pool.connection() as conn, audit_transaction(conn, scenario.tenant_id):
        with pytest.raises(IncidentNotFound):
            incident_history(conn, scenario.tenant_id, uuid.uuid4(), known_at=datetime.now(UTC))
        with pytest.raises(IncidentNotFound):
            incident_history(conn, scenario.tenant_id, other.graffiti, known_at=datetime.now(UTC))


def test_changes_show_fields_before_and_after(
    scenario: AuditScenario, session_pool: ConnectionPool[Any]
) -> None:
    tenant = scenario.tenant_id
    # From the assignment on, so the report and acknowledgement before it are outside.
    audit_filter = AuditFilter(recorded_from=recorded_at_of(scenario, scenario.old_pothole, 3))
    with session_pool.connection() as conn, audit_transaction(conn, tenant):
        changes, page = read_changes(conn, tenant, audit_filter, limit=MAX_PAGE_SIZE)
    by_type = {item.event.event_type: item for item in changes if item.source == "state"}
    assignment = by_type["IncidentAssigned"]
    fields = {change.name: (change.before, change.after) for change in assignment.fields}

    assert positions(page.events) == [item.event.position for item in changes]
    assert assignment.event.metadata["actor"] == "bob"
    assert fields == {
        "status": (ACKNOWLEDGED, ASSIGNED),
        "assignee": (None, "crew-1"),
        "department": (None, "Public Works"),
    }
    assert {change.name for change in by_type["IncidentResolved"].fields} == {
        "status",
        "resolved_at",
    }


def test_changes_of_keys_hide_secret_digests(
    scenario: AuditScenario, session_pool: ConnectionPool[Any]
) -> None:
    tenant = scenario.tenant_id
    with session_pool.connection() as conn, audit_transaction(conn, tenant):
        changes, _ = read_changes(conn, tenant, AuditFilter(stream_id=f"keys-{tenant}"))

    assert [item.source for item in changes] == ["payload", "payload"]
    names = {change.name for item in changes for change in item.fields}
    assert names == {"key_id", "role", "name", "expires_at"}


def test_view_shows_one_tenant(
    scenario: AuditScenario, database: Database, session_pool: ConnectionPool[Any]
) -> None:
    other = build_scenario(PostgresEventStore(session_pool), database)
    with database.connect() as conn:
        without_tenant = conn.execute("SELECT count(*) FROM audit_events").fetchone()
        conn.rollback()
        set_tenant(conn, scenario.tenant_id)
        tenants = conn.execute("SELECT DISTINCT tenant_id FROM audit_events").fetchall()
        theirs = conn.execute(
            "SELECT count(*) FROM audit_events WHERE tenant_id = %s", (other.tenant_id,)
        ).fetchone()
        conn.rollback()

    assert without_tenant == (0,)
    assert tenants == [(scenario.tenant_id,)]
    assert theirs == (0,)


def test_audit_transaction_needs_an_idle_connection(
    scenario: AuditScenario, database: Database
) -> None:
    with database.connect() as conn:
        conn.execute("SELECT 1")
        with (
            pytest.raises(RuntimeError, match="not in one"),
            audit_transaction(conn, scenario.tenant_id),
        ):
            pass


def test_export_memory_does_not_grow_with_result(
    database: Database, session_pool: ConnectionPool[Any]
) -> None:
    # The same export of a result four times larger: holding the result in memory would
    # make the peak about four times higher, streaming it in batches keeps it level.
    # bench/audit_export.py measures the whole process on a million events.
    small = export_peak(database, session_pool, 2_500)
    large = export_peak(database, session_pool, 10_000)

    assert large.exported_bytes > 3 * small.exported_bytes
    assert large.peak < 1.5 * small.peak, f"peak {small.peak} bytes, then {large.peak}"
    assert large.peak < large.exported_bytes / 5


@dataclass
class ExportPeak:
    exported_bytes: int
    peak: int  # bytes allocated by Python at most during the export, from tracemalloc


def export_peak(database: Database, pool: ConnectionPool[Any], count: int) -> ExportPeak:
    tenant = f"mem-{uuid.uuid4().hex[:8]}"
    create_tenant(
        PostgresEventStore(pool),
        tenant,
        name="Memory",
        time_zone="UTC",
        occurred_at=datetime(2015, 1, 1, tzinfo=UTC),
    )
    copy_events(database, tenant, count)
    exported_bytes = 0
    with pool.connection() as conn:
        tracemalloc.start()
        try:
            for chunk in export_events(conn, tenant, AuditFilter(), "csv", batch_size=100):
                exported_bytes += len(chunk)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    return ExportPeak(exported_bytes, peak)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    # For each writer transaction: the step at which it appends, and how many steps later it
    # commits. The reader reads one page after every step.
    schedule=st.lists(st.tuples(st.integers(0, 10), st.integers(0, 10)), min_size=2, max_size=5),
    limit=st.integers(1, 3),
)
def test_pages_see_each_event_once_whatever_commit_order(
    database: Database,
    session_pool: ConnectionPool[Any],
    schedule: list[tuple[int, int]],
    limit: int,
) -> None:
    store = PostgresEventStore(session_pool)
    tenant = f"order-{uuid.uuid4().hex[:8]}"
    create_tenant(
        store, tenant, name="Order", time_zone="UTC", occurred_at=datetime(2015, 1, 1, tzinfo=UTC)
    )
    steps: list[tuple[int, int, str]] = []
    for writer, (append_at, commit_after) in enumerate(schedule):
        steps.append((append_at, writer, "append"))
        steps.append((append_at + commit_after + 1, writer, "commit"))
    steps.sort()

    walked: list[RecordedEvent] = []
    cursor = None

    def read_one_page() -> bool:
        nonlocal cursor
        with session_pool.connection() as conn, audit_transaction(conn, tenant):
            page = read_page(conn, tenant, AuditFilter(), cursor=cursor, limit=limit)
        walked.extend(page.events)
        cursor = page.next_cursor
        return page.has_more

    connections = [database.connect() for _ in schedule]
    try:
        for _, writer, action in steps:
            conn = connections[writer]
            if action == "append":
                # Each writer has a stream of its own, so no writer waits for another.
                events = [NewEvent("NoteAdded", {"n": n}, datetime.now(UTC)) for n in range(2)]
                store.append(
                    tenant, f"writer-{writer}-{tenant}", events, expected_version=0, conn=conn
                )
            else:
                conn.commit()
            read_one_page()
    finally:
        for conn in connections:
            conn.close()
    every = tenant_events(database, tenant)
    wait_for_horizon(database, every[-1].tx_id)
    while read_one_page():
        pass

    assert len(every) == 1 + 2 * len(schedule)
    assert positions(walked) == positions(every)
