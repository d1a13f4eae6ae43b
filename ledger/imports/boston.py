"""The City of Boston 311 export: rows to incident events.

Each case becomes a ReportSubmitted event at OPEN_DT, carrying the city's TARGET_DT as its
resolution due time, and an IncidentClosed event at CLOSED_DT when the case is closed.
Times in the file are naive local times, read in the tenant's time zone.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from ledger.events import canonical_json
from ledger.ids import MAX_ORDERED_NUMBER, NAMESPACE, derived_id_text, ordered_id_with_prefix
from ledger.imports.copytext import EventRows
from ledger.lifecycle import INCIDENT_CLOSED, REPORT_SUBMITTED

SOURCE = "boston-311"
_NAMESPACE_BYTES = NAMESPACE.bytes  # UUID.bytes converts from int on every access

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
    "neighborhood",
    "ward",
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
    """The span of one case's events in its chunk's COPY rows, and its stream head after them.

    A named tuple rather than a dataclass: chunks of these cross process boundaries, and
    tuples pickle several times faster.
    """

    stream_id: str
    row_number: int
    start: int
    end: int
    version: int
    head_hash: bytes
    # The row's snapshot time (UTC text), when the format has one: the writer skips a row
    # older than what a stream already records.
    updated_at: str | None = None
    # Whether the row lists the request as closed, or None when the format has no status.
    closed: bool | None = None
    # A COPY row for an IncidentReopened event, without version and hash, that the writer
    # appends only when the stream's latest event closed it.
    reopen_line: bytes | None = None


@dataclass
class ParsedChunk:
    """A chunk of rows parsed by a worker: binary COPY rows for its events (without the
    signature), COPY text for its stream heads, cases and rejects."""

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


def _nul_column(values: list[str]) -> str | None:
    """Return the name of the first column whose value contains a NUL character."""
    for column, value in zip(COLUMNS, values, strict=True):
        if "\x00" in value:
            return column
    return None


class LocalTimeReader:
    """Reads the export's naive local times in one zone and returns them as UTC text.

    A time that occurs twice when clocks fall back is read as the first (daylight) one. A
    time skipped when clocks spring forward is read with the offset before the change.

    Times are parsed by hand, since strptime costs more than the rest of a row's work. The
    UTC offset is looked up once per local hour and reused when it is the same at the start
    and the end of that hour, which is exact for any zone whose offset changes at most once
    an hour. When that offset is a whole number of hours, the UTC text of the hour is kept
    too, and later times in the hour only append their minutes and seconds.
    """

    def __init__(self, zone: ZoneInfo) -> None:
        self.zone = zone
        self._offsets: dict[tuple[int, int, int, int], timedelta | None] = {}
        # "MM/DD/YYYY hh" + "AM" -> "YYYY-MM-DDTHH:" in UTC
        self._hours: dict[str, str] = {}

    def utc_text(self, value: str, column: str) -> str | None:
        value = value.strip()
        if not value:
            return None
        utc_hour = self._hours.get(value[:13] + value[20:]) if len(value) == 22 else None
        if utc_hour is not None:
            minute, second = value[14:16], value[17:19]
            if (
                value[13] == ":"
                and value[16] == ":"
                and value[19] == " "
                and minute.isdigit()
                and second.isdigit()
                and minute < "60"
                and second < "60"
            ):
                return f"{utc_hour}{minute}:{second}.000000+00:00"
        return self._parse(value, column)

    def _parse(self, value: str, column: str) -> str:
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
        elif offset.seconds % 3600 == 0:
            start_of_hour = local.replace(minute=0, second=0) - offset
            self._hours[value[:13] + value[20:]] = start_of_hour.strftime("%Y-%m-%dT%H:")
        return (local - offset).isoformat(timespec="microseconds") + "+00:00"


@functools.lru_cache(maxsize=8)
def time_reader(time_zone: str) -> LocalTimeReader:
    """Return this process's reader for a zone, so its caches carry over from one chunk of
    an import to the next. The caches hold at most one entry per hour the files contain."""
    return LocalTimeReader(ZoneInfo(time_zone))


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


def case_ids(tenant_id: str, case_id: str) -> tuple[str, str, str]:
    """Return the ids of a case's incident, its submitted event and its closed event.

    Case numbers are assigned in order, and ids that start with them keep the indexes on
    events and streams growing at one end. On the Boston export that made the server's
    COPY about a third cheaper than with random ids. The ids derive from the tenant and
    case number alone, so a re-import maps to the same ids.
    """
    number = int(case_id) if case_id.isdigit() else -1
    if 0 <= number <= MAX_ORDERED_NUMBER:
        digest = hashlib.sha256(
            _NAMESPACE_BYTES + f"{tenant_id}/{SOURCE}/{case_id}".encode()
        ).hexdigest()
        hexed = f"{number:012x}"
        prefix = f"{hexed[:8]}-{hexed[8:]}-8"
        return (
            ordered_id_with_prefix(prefix, digest[0:19]),
            ordered_id_with_prefix(prefix, digest[19:38]),
            ordered_id_with_prefix(prefix, digest[38:57]),
        )
    return (
        derived_id_text(tenant_id, SOURCE, case_id),
        derived_id_text(tenant_id, SOURCE, case_id, "submitted"),
        derived_id_text(tenant_id, SOURCE, case_id, "closed"),
    )


def case_events(
    times: LocalTimeReader, values: list[str], events: EventRows
) -> tuple[str, bytes, int, bytes]:
    """Turn one row (narrowed to COLUMNS, '' for absent ones) into binary COPY rows for its
    events, built by `events`.

    Returns the stream id, the COPY rows, the stream's version after them and its head hash.
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
        neighborhood,
        ward,
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

    incident_id, submitted_id, closed_id = case_ids(events.tenant_id, case_id)
    stream_id = f"incident-{incident_id}"
    submitted: dict[str, Any] = {
        "incident_id": incident_id,
        "source": SOURCE,
        "source_id": case_id,
        "category": case_type.strip() or None,
        "reason": reason.strip() or None,
        "department": department.strip() or None,
        "queue": queue.strip() or None,
        "subject": subject.strip() or None,
        "title": case_title.strip() or None,
        "source_channel": source_channel.strip() or None,
        "address": location.strip() or None,
        "neighborhood": neighborhood.strip() or None,
        "ward": ward.strip() or None,
        "latitude": _coordinate(latitude, "LATITUDE", 90),
        "longitude": _coordinate(longitude, "LONGITUDE", 180),
        "resolution_due_at": target,
    }
    specs: list[tuple[str, str, dict[str, Any], str]] = [
        (REPORT_SUBMITTED, opened, submitted, submitted_id)
    ]
    if closed is not None:
        closing = {
            "reason": closure_reason.strip() or None,
            "source_status": case_status.strip() or None,
            # Both are UTC text in one format, so text order is time order.
            "anomalies": ["closed_before_opened"] if closed < opened else None,
        }
        specs.append((INCIDENT_CLOSED, closed, closing, closed_id))

    rows = []
    digest: bytes | None = None
    for version, (event_type, occurred_text, payload, event_id) in enumerate(specs, start=1):
        row, digest = events.row(
            stream_id, version, event_type, occurred_text, payload, event_id, digest
        )
        rows.append(row)
    assert digest is not None
    return stream_id, b"".join(rows), len(specs), digest


def import_metadata(source_file: str) -> bytes:
    """Metadata of every event imported from `source_file`, in canonical JSON."""
    return canonical_json(
        {"actor": "import", "role": "system", "channel": "import", "source_file": source_file}
    )


def parse_chunk(
    tenant_id: str,
    time_zone: str,
    source_file: str,
    rows: list[tuple[int, list[str]]],
    nul_possible: bool | None = None,
) -> ParsedChunk:
    """Parse a chunk of rows in a worker process into COPY rows, cases and rejects."""
    if nul_possible is None:
        nul_possible = any("\x00" in value for _, values in rows for value in values)
    # The loop allocates many short-lived objects and no reference cycles, so collection
    # passes would only cost time.
    gc.disable()
    try:
        return _parse_rows(tenant_id, time_reader(time_zone), source_file, rows, nul_possible)
    finally:
        gc.enable()


def _parse_rows(
    tenant_id: str,
    times: LocalTimeReader,
    source_file: str,
    rows: list[tuple[int, list[str]]],
    nul_possible: bool,
) -> ParsedChunk:
    """Turn rows into a chunk. PostgreSQL text cannot hold NUL characters, so with
    `nul_possible` each row is checked for them first; callers decide it with one scan."""
    chunk = ParsedChunk()
    parts: list[bytes] = []
    heads: list[str] = []
    offset = 0
    events = EventRows(tenant_id, import_metadata(source_file))
    for row_number, values in rows:
        if nul_possible and (column := _nul_column(values)) is not None:
            chunk.rejects.append((row_number, f"invalid {column}: contains a NUL character"))
            continue
        try:
            stream_id, text, version, head_hash = case_events(times, values, events)
        except RowRejected as error:
            chunk.rejects.append((row_number, str(error)))
            continue
        # Positional: keyword arguments make a named tuple several times slower to build.
        chunk.cases.append(
            ParsedCase(stream_id, row_number, offset, offset + len(text), version, head_hash)
        )
        parts.append(text)
        heads.append(f"{stream_id}\t{tenant_id}\t{version}\t\\\\x{head_hash.hex()}\n")
        offset += len(text)
    chunk.events_copy = b"".join(parts)
    chunk.streams_copy = "".join(heads).encode()
    return chunk
