"""The City of Boston 311 export: rows to incident events.

Each case becomes a ReportSubmitted event at OPEN_DT, carrying the city's TARGET_DT as its
resolution due time, and an IncidentClosed event at CLOSED_DT when the case is closed.
Times in the file are naive local times, read in the tenant's time zone.
"""

from __future__ import annotations

import csv
import gc
import io
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from ledger.events import canonical_json, event_hash_serialized
from ledger.ids import MAX_ORDERED_NUMBER, derived_id_text, ordered_id_text
from ledger.imports.copytext import escape
from ledger.lifecycle import INCIDENT_CLOSED, REPORT_SUBMITTED

SOURCE = "boston-311"

# Columns read from the export; the rest are ignored.
COLUMNS = (
    "CASE_ENQUIRY_ID",
    "OPEN_DT",
    "TARGET_DT",
    "CLOSED_DT",
    "CASE_STATUS",
    "CLOSURE_REASON",
    "CASE_TITLE",
    "SUBJECT",
    "REASON",
    "TYPE",
    "QUEUE",
    "Department",
    "Location",
    "LATITUDE",
    "LONGITUDE",
    "Source",
)
REQUIRED = ("CASE_ENQUIRY_ID", "OPEN_DT")

# MM/DD/YYYY hh:mm:ss AM, as in every time column of the export. Parsed by hand: strptime
# costs more than the rest of a row's work together.
_TIME = re.compile(r"(\d{2})/(\d{2})/(\d{4}) (\d{2}):(\d{2}):(\d{2}) ([AP]M)")


class RowRejected(ValueError):
    """A row that cannot become events. The message gives the reason."""


class ParsedCase(NamedTuple):
    """The span of one case's events in its chunk's COPY text, and its stream head after them.

    A named tuple rather than a dataclass: chunks of these cross process boundaries, and
    tuples pickle several times faster.
    """

    stream_id: str
    row_number: int
    start: int
    end: int
    version: int
    head_hash: bytes


@dataclass
class ParsedChunk:
    """A chunk of rows parsed by a worker: COPY text for its events, cases and rejects."""

    events_copy: bytes = b""
    streams_copy: bytes = b""
    records: int = 0
    cases: list[ParsedCase] = field(default_factory=list)
    rejects: list[tuple[int, str]] = field(default_factory=list)


def column_indexes(header: list[str]) -> tuple[int, ...]:
    """Return the position of each column in COLUMNS; raise ValueError naming missing ones."""
    names = [name.strip().lstrip("\ufeff") for name in header]
    missing = [column for column in REQUIRED if column not in names]
    if missing:
        raise ValueError(
            f"not a Boston 311 export: missing column(s) {', '.join(missing)}; "
            f"found {', '.join(name for name in names if name)}"
        )
    return tuple(names.index(column) if column in names else -1 for column in COLUMNS)


def _text(value: str, column: str) -> str | None:
    value = value.strip()
    if "\x00" in value:
        raise RowRejected(f"invalid {column}: contains a NUL character")
    return value or None


class LocalTimeReader:
    """Reads the export's naive local times in one zone and returns them as UTC text.

    A time that occurs twice when clocks fall back is read as the first (daylight) one. A
    time skipped when clocks spring forward is read with the offset before the change.
    The UTC offset is looked up once per local hour and reused when it is the same at the
    start and the end of that hour, which is exact for any zone whose offset changes at most
    once an hour. Rows are parsed by hand: strptime costs more than the rest of a row's work.
    """

    def __init__(self, zone: ZoneInfo) -> None:
        self.zone = zone
        self._offsets: dict[tuple[int, int, int, int], timedelta | None] = {}

    def utc_text(self, value: str, column: str) -> str | None:
        value = value.strip()
        if not value:
            return None
        match = _TIME.fullmatch(value)
        if match is None:
            raise RowRejected(f"invalid {column} {value!r}: expected MM/DD/YYYY hh:mm:ss AM")
        month, day, year, hour, minute, second = map(int, match.groups()[:6])
        if not 1 <= hour <= 12:
            raise RowRejected(f"invalid {column} {value!r}: the hour must be 01 to 12")
        hour = hour % 12 + (12 if match.group(7) == "PM" else 0)
        try:
            local = datetime(year, month, day, hour, minute, second)
        except ValueError as error:
            raise RowRejected(f"invalid {column} {value!r}: {error}") from error
        key = (year, month, day, hour)
        if key in self._offsets:
            offset = self._offsets[key]
        else:
            start = local.replace(minute=0, second=0, tzinfo=self.zone).utcoffset()
            end = local.replace(minute=59, second=59, tzinfo=self.zone).utcoffset()
            offset = self._offsets[key] = start if start == end else None
        if offset is None:
            offset = local.replace(tzinfo=self.zone).utcoffset()
            assert offset is not None
        return (local - offset).isoformat(timespec="microseconds") + "+00:00"


def parse_time(value: str, column: str, zone: ZoneInfo) -> datetime | None:
    """Read one naive export time in `zone`; return it as an aware UTC datetime."""
    text = LocalTimeReader(zone).utc_text(value, column)
    return datetime.fromisoformat(text) if text else None


def _coordinate(value: str, column: str, limit: float) -> float | None:
    value = value.strip()
    if not value:
        return None
    try:
        number = float(value)
    except ValueError as error:
        raise RowRejected(f"invalid {column} {value!r}: expected a decimal number") from error
    if not -limit <= number <= limit:
        raise RowRejected(f"invalid {column} {value!r}: outside -{limit:g}..{limit:g}")
    return number


def case_id_text(tenant_id: str, case_id: str, *suffix: str) -> str:
    """Return the id of a case's incident (or, with a suffix, of one of its events).

    Case numbers are assigned in order, and ids that start with them keep the indexes on
    events and streams growing at one end, which makes the COPY of an import about a
    third cheaper for the server than random ids (measured on the Boston export). Ids
    derive from the tenant and case number alone, so a re-import maps to the same ids.
    """
    number = int(case_id) if case_id.isdigit() else -1
    if 0 <= number <= MAX_ORDERED_NUMBER:
        return ordered_id_text(number, tenant_id, SOURCE, case_id, *suffix)
    return derived_id_text(tenant_id, SOURCE, case_id, *suffix)


def case_events(
    tenant_id: str, times: LocalTimeReader, values: list[str], metadata_json: bytes
) -> tuple[str, str, int, bytes]:
    """Turn one row (narrowed to COLUMNS, '' for absent ones) into COPY text for its events.

    Returns the stream id, the COPY lines, the stream's version after them and its head hash.
    This runs once per row of files with millions of rows, so it formats text directly.
    """
    (
        case_id,
        open_dt,
        target_dt,
        closed_dt,
        case_status,
        closure_reason,
        case_title,
        subject,
        reason,
        case_type,
        queue,
        department,
        location,
        latitude,
        longitude,
        source_channel,
    ) = values
    case_id = case_id.strip()
    if not case_id:
        raise RowRejected("missing CASE_ENQUIRY_ID")
    if not case_id.isdigit():
        raise RowRejected(f"invalid CASE_ENQUIRY_ID {case_id!r}: expected digits")
    opened = times.utc_text(open_dt, "OPEN_DT")
    if opened is None:
        raise RowRejected("missing OPEN_DT")
    target = times.utc_text(target_dt, "TARGET_DT")
    closed = times.utc_text(closed_dt, "CLOSED_DT")

    incident_id = case_id_text(tenant_id, case_id)
    stream_id = f"incident-{incident_id}"
    submitted: dict[str, Any] = {
        "incident_id": incident_id,
        "source": SOURCE,
        "source_id": case_id,
        "category": _text(case_type, "TYPE"),
        "reason": _text(reason, "REASON"),
        "department": _text(department, "Department"),
        "queue": _text(queue, "QUEUE"),
        "subject": _text(subject, "SUBJECT"),
        "title": _text(case_title, "CASE_TITLE"),
        "source_channel": _text(source_channel, "Source"),
        "address": _text(location, "Location"),
        "latitude": _coordinate(latitude, "LATITUDE", 90),
        "longitude": _coordinate(longitude, "LONGITUDE", 180),
        "resolution_due_at": target,
    }
    specs: list[tuple[str, str, dict[str, Any], str]] = [
        (REPORT_SUBMITTED, opened, submitted, "submitted")
    ]
    if closed is not None:
        closing = {
            "reason": _text(closure_reason, "CLOSURE_REASON"),
            "source_status": _text(case_status, "CASE_STATUS"),
        }
        specs.append((INCIDENT_CLOSED, closed, closing, "closed"))

    metadata_text = escape(metadata_json.decode())
    lines = []
    digest: bytes | None = None
    for version, (event_type, occurred_text, payload, suffix) in enumerate(specs, start=1):
        payload_json = canonical_json({k: v for k, v in payload.items() if v is not None})
        event_id = case_id_text(tenant_id, case_id, suffix)
        digest = event_hash_serialized(
            digest,
            tenant_id=tenant_id,
            stream_id=stream_id,
            stream_version=version,
            event_type=event_type,
            schema_version=1,
            event_id=event_id,
            occurred_at_utc=occurred_text,
            payload_json=payload_json,
            metadata_json=metadata_json,
        )
        lines.append(
            f"{tenant_id}\t{stream_id}\t{version}\t{event_type}\t1\t"
            f"{escape(payload_json.decode())}\t{metadata_text}\t{occurred_text}\t"
            f"{event_id}\t\\\\x{digest.hex()}\n"
        )
    assert digest is not None
    return stream_id, "".join(lines), len(specs), digest


def import_metadata(source_file: str) -> bytes:
    """Metadata of every event imported from `source_file`, in canonical JSON."""
    return canonical_json(
        {"actor": "import", "role": "system", "channel": "import", "source_file": source_file}
    )


def parse_block(
    tenant_id: str,
    time_zone: str,
    source_file: str,
    indexes: tuple[int, ...],
    width: int,
    block: bytes,
) -> ParsedChunk:
    """Parse a block of whole CSV records in a worker process.

    Row numbers in the result count from 1 at the block's first record; rows with the
    wrong number of fields are rejected here.
    """
    text = block.decode("utf-8", errors="replace")
    rows: list[tuple[int, list[str]]] = []
    rejects: list[tuple[int, str]] = []
    number = 0
    try:
        for number, values in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
            if len(values) != width:
                if values:
                    rejects.append(
                        (number, f"row has {len(values)} fields, the header has {width}")
                    )
                continue
            rows.append((number, [values[i] if i >= 0 else "" for i in indexes]))
    except csv.Error as error:
        rejects.append((number + 1, f"invalid CSV: {error}; the rest of this block is skipped"))
    chunk = parse_chunk(tenant_id, time_zone, source_file, rows)
    chunk.rejects = sorted(rejects + chunk.rejects)
    chunk.records = number
    return chunk


def parse_chunk(
    tenant_id: str,
    time_zone: str,
    source_file: str,
    rows: list[tuple[int, list[str]]],
) -> ParsedChunk:
    """Parse a chunk of rows in a worker process into COPY text, cases and rejects."""
    # The loop allocates many short-lived objects and no reference cycles, so collection
    # passes would only cost time.
    gc.disable()
    try:
        return _parse_rows(tenant_id, LocalTimeReader(ZoneInfo(time_zone)), source_file, rows)
    finally:
        gc.enable()


def _parse_rows(
    tenant_id: str,
    times: LocalTimeReader,
    source_file: str,
    rows: list[tuple[int, list[str]]],
) -> ParsedChunk:
    chunk = ParsedChunk()
    parts: list[bytes] = []
    heads: list[str] = []
    offset = 0
    metadata_json = import_metadata(source_file)
    for row_number, values in rows:
        try:
            stream_id, lines, version, head_hash = case_events(
                tenant_id, times, values, metadata_json
            )
        except RowRejected as error:
            chunk.rejects.append((row_number, str(error)))
            continue
        text = lines.encode()
        chunk.cases.append(
            ParsedCase(
                stream_id=stream_id,
                row_number=row_number,
                start=offset,
                end=offset + len(text),
                version=version,
                head_hash=head_hash,
            )
        )
        parts.append(text)
        heads.append(f"{stream_id}\t{tenant_id}\t{version}\t\\\\x{head_hash.hex()}\n")
        offset += len(text)
    chunk.events_copy = b"".join(parts)
    chunk.streams_copy = "".join(heads).encode()
    return chunk
