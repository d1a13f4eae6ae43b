"""Events rows in binary COPY format: what the import writes, read back by the server."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import orjson
from hypothesis import given
from hypothesis import strategies as st

from ledger.database import Database
from ledger.imports.copytext import BINARY_SIGNATURE, EVENT_COPY_COLUMNS, EventLine, binary_rows

TEXT = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)))
JSON = st.dictionaries(
    st.text(min_size=1, max_size=8), TEXT | st.integers(-(2**53), 2**53) | st.none(), max_size=4
)
TIMES = st.datetimes(
    min_value=datetime(1990, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)


@st.composite
def event_lines(draw: st.DrawFn) -> EventLine:
    return EventLine(
        tenant_id=draw(st.from_regex(r"[a-z0-9][a-z0-9-]{1,20}", fullmatch=True)),
        stream_id=f"incident-{draw(st.uuids())}",
        stream_version=draw(st.integers(0, 2**31 - 1)),
        event_type=draw(st.sampled_from(["ReportSubmitted", "IncidentClosed"])),
        schema_version=draw(st.integers(1, 3)),
        payload_json=orjson.dumps(draw(JSON)).decode(),
        metadata_json=orjson.dumps(draw(JSON)).decode(),
        occurred_at=draw(TIMES),
        event_id=str(draw(st.uuids())),
        hash=draw(st.binary(min_size=32, max_size=32)),
    )


@given(st.lists(event_lines(), max_size=5))
def test_binary_rows_round_trip(events: list[EventLine]) -> None:
    copied = b"".join(event.encode_binary() for event in events)

    rows = binary_rows(copied)

    assert len(rows) == len(events)
    assert [EventLine.decode_binary(row) for row in rows] == events


def test_server_reads_binary_rows_as_text_rows(database: Database) -> None:
    events = [
        EventLine(
            tenant_id="acme",
            stream_id=f"incident-{uuid.uuid4()}",
            stream_version=version,
            event_type="ReportSubmitted",
            schema_version=1,
            payload_json=orjson.dumps({"description": 'Tab\there, quote " and é'}).decode(),
            metadata_json='{"actor":"import"}',
            occurred_at=datetime(2015, 3, 8, 7, 30, tzinfo=UTC) + timedelta(microseconds=version),
            event_id=str(uuid.uuid4()),
            hash=bytes(range(version, version + 32)),
        )
        for version in (1, 2)
    ]
    table = "LIKE events INCLUDING ALL"
    read_back = {}
    with database.connect_owner() as conn:
        for name, statement, data in (
            ("text", "", "".join(event.encode() for event in events).encode()),
            (
                "binary",
                " (FORMAT binary)",
                BINARY_SIGNATURE + b"".join(event.encode_binary() for event in events),
            ),
        ):
            conn.execute(f"CREATE TEMPORARY TABLE copied_{name} ({table})")
            with conn.cursor().copy(
                f"COPY copied_{name} ({EVENT_COPY_COLUMNS}) FROM STDIN{statement}"
            ) as copy:
                copy.write(data)
            read_back[name] = conn.execute(
                f"SELECT {EVENT_COPY_COLUMNS} FROM copied_{name} ORDER BY stream_version"
            ).fetchall()

    assert read_back["binary"] == read_back["text"]
    assert read_back["binary"][0][5] == {"description": 'Tab\there, quote " and é'}
    assert read_back["binary"][1][7] == events[1].occurred_at
