"""Service requests of any city export, as one normalized record, and their events.

The NYC, Los Angeles and Open311 formats map their columns to a `ServiceRequest`; this
module turns it into incident events as COPY text. A row is a snapshot of a request at one
moment. The same request may appear in several rows: several snapshots, or several exports
imported one after the other. So every event id derives from the request id and what the
event states, and the writer appends only the events a stream does not have yet.

Each row yields, for a stream that does not exist yet:

- ReportSubmitted at the open date;
- WorkStarted at the snapshot time when the source status means work is under way;
- IncidentClosed at the closed date when the source status (or, without a status, a
  closed date) says the request is closed.

A row that lists a closed request as open again carries an IncidentReopened event, which
the writer appends only when the stream's latest event closed it.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from ledger.events import utc_text
from ledger.ids import MAX_ORDERED_NUMBER, derived_id_text, ordered_id_text
from ledger.imports.boston import (
    LocalTimeReader,
    ParsedCase,
    ParsedChunk,
    RowRejected,
    import_metadata,
)
from ledger.imports.copytext import EventRows
from ledger.lifecycle import INCIDENT_CLOSED, INCIDENT_REOPENED, REPORT_SUBMITTED, WORK_STARTED

# Values that exports write for "no value". Compared in upper case.
PLACEHOLDERS = frozenset(
    {"", "N/A", "NA", "#N/A", "NULL", "NONE", "NAN", "UNSPECIFIED", "UNKNOWN", "-", "--", "?"}
)

# Source statuses, in lower case, that mean the request is closed or that work has started.
# Any other non-empty status means open.
CLOSED_STATUSES = frozenset(
    {
        "closed",
        "close",
        "resolved",
        "completed",
        "complete",
        "cancelled",
        "canceled",
        "done",
        "archived",
    }
)
IN_PROGRESS_STATUSES = frozenset(
    {
        "in progress",
        "assigned",
        "started",
        "pending",
        "open - in progress",
        "work in progress",
        "acknowledged",
        "forwarded",
        "referred",
    }
)

OPEN = "open"
IN_PROGRESS = "in_progress"
CLOSED = "closed"

# Anomalies flagged in an event's payload under "anomalies". The row is imported as it is.
CLOSED_BEFORE_OPENED = "closed_before_opened"
OPENED_IN_FUTURE = "opened_in_future"
CLOSED_IN_FUTURE = "closed_in_future"
CLOSED_WITHOUT_DATE = "closed_without_date"

# M/D/YYYY with an optional time: h:mm, h:mm:ss or h:mm:ss.fff, in 12-hour form with AM or
# PM, or in 24-hour form without them.
_US_TIME = re.compile(
    r"(\d{1,2})/(\d{1,2})/(\d{4})"
    r"(?:[ T]+(\d{1,2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?(?:\s*([AaPp][Mm]))?)?"
)


def clean(value: str) -> str | None:
    """Return `value` stripped, or None when it is empty or a placeholder such as "N/A"."""
    value = value.strip()
    # No placeholder is longer than 11 characters, and upper() costs more than len().
    if len(value) <= 11 and value.upper() in PLACEHOLDERS:
        return None
    return value


class TimeReader:
    """Reads the time formats that city exports use and returns UTC text as `utc_text` does.

    Accepted: ISO 8601 with or without an offset ("2019-11-14T00:21:08-05:00",
    "2016-01-01T00:00:00.000", "2015-03-08 01:30:00", "...Z"), and "MM/DD/YYYY hh:mm:ss AM"
    with or without leading zeros, seconds, fractions or AM/PM (24-hour then). Naive times
    are read in the tenant's zone: a time that occurs twice when clocks fall back is read as
    the first one, and a skipped time with the offset before the change.
    """

    def __init__(self, zone: ZoneInfo) -> None:
        self.zone = zone
        self._boston = LocalTimeReader(zone)  # caches the most common US form by the hour

    def utc_text(self, value: str, column: str) -> str | None:
        text = clean(value)
        if text is None:
            return None
        if len(text) == 22 and text[2] == "/" and text[5] == "/" and text[19] == " ":
            try:
                return self._boston.utc_text(text, column)
            except RowRejected:
                pass  # the general forms below give the error message
        match = _US_TIME.fullmatch(text)
        if match is not None:
            return utc_text(self._us_time(match, text, column))
        try:
            moment = datetime.fromisoformat(text)
        except ValueError as error:
            raise RowRejected(
                f"invalid {column} {text!r}: expected an ISO 8601 time such as "
                "2015-01-31T14:05:00 (with or without an offset) or MM/DD/YYYY hh:mm:ss AM"
            ) from error
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=self.zone)
        return utc_text(moment)

    def _us_time(self, match: re.Match[str], text: str, column: str) -> datetime:
        month, day, year = int(match[1]), int(match[2]), int(match[3])
        hour = int(match[4] or 0)
        minute, second = int(match[5] or 0), int(match[6] or 0)
        micro = int((match[7] or "0").ljust(6, "0"))
        if match[8]:
            if not 1 <= hour <= 12:
                raise RowRejected(f"invalid {column} {text!r}: with AM or PM the hour is 1 to 12")
            hour = hour % 12 + (12 if match[8].upper() == "PM" else 0)
        try:
            return datetime(year, month, day, hour, minute, second, micro, tzinfo=self.zone)
        except ValueError as error:
            raise RowRejected(f"invalid {column} {text!r}: {error}") from error


def coordinates(
    latitude: str, longitude: str, names: tuple[str, str] = ("latitude", "longitude")
) -> tuple[float | None, float | None]:
    """Read a position. A placeholder or a 0 in either coordinate means no position.

    Exports write 0 (or 0.0) for a missing position, and no city in these exports lies on
    the equator or the prime meridian.
    """
    numbers: list[float | None] = []
    for value, name, limit in ((latitude, names[0], 90.0), (longitude, names[1], 180.0)):
        text = clean(value)
        if text is None:
            numbers.append(None)
            continue
        try:
            number = float(text)
        except ValueError as error:
            raise RowRejected(f"invalid {name} {text!r}: expected a decimal number") from error
        if number != number or not -limit <= number <= limit:  # NaN compares unequal
            raise RowRejected(f"invalid {name} {text!r}: outside -{limit:g}..{limit:g}")
        numbers.append(number)
    lat, lon = numbers
    if lat is None or lon is None or lat == 0 or lon == 0:
        return None, None
    return lat, lon


def status_class(status: str | None, closed_at: str | None) -> str:
    """Return OPEN, IN_PROGRESS or CLOSED for a source status. Without a status, the closed
    date decides."""
    if status is None:
        return CLOSED if closed_at else OPEN
    lowered = status.lower()
    if lowered in CLOSED_STATUSES or lowered.startswith("closed"):
        return CLOSED
    if lowered in IN_PROGRESS_STATUSES:
        return IN_PROGRESS
    return OPEN


@dataclass(slots=True)
class ServiceRequest:
    """One row of an export, normalized. Times are UTC text as `utc_text` writes it."""

    source_id: str
    opened_at: str
    status: str | None = None
    updated_at: str | None = None
    closed_at: str | None = None
    due_at: str | None = None
    category: str | None = None
    title: str | None = None
    description: str | None = None
    department: str | None = None
    assignee: str | None = None
    source_channel: str | None = None
    address: str | None = None
    latitude: float | None = None
    longitude: float | None = None
    closure_reason: str | None = None
    details: dict[str, str] = field(default_factory=dict)


# Maps a row, narrowed to the format's columns ('' for absent ones), to a request with the
# help of a time reader. Raises RowRejected.
RowMapper = Callable[[list[str], TimeReader], ServiceRequest]


class RequestIds:
    """Ids of one request's incident and events, derived from tenant, source and request id.

    Request ids that are numbers (dashes ignored, as in Los Angeles' "1-1523590121") give
    ordered ids, so index inserts land at one end, as for the Boston import.
    """

    def __init__(self, tenant_id: str, source: str, source_id: str) -> None:
        self._parts = (tenant_id, source, source_id)
        digits = source_id.replace("-", "")
        number = int(digits) if digits.isdigit() and len(digits) <= 15 else -1
        self._number = number if 0 <= number <= MAX_ORDERED_NUMBER else None

    def of(self, *kind: str) -> str:
        if self._number is None:
            return derived_id_text(*self._parts, *kind)
        return ordered_id_text(self._number, *self._parts, *kind)


def anomalies(request: ServiceRequest, state: str, now_text: str) -> list[str]:
    """Return the impossible parts of a request's history, as of the import's start."""
    found = []
    if request.closed_at is not None and request.closed_at < request.opened_at:
        found.append(CLOSED_BEFORE_OPENED)
    if request.opened_at > now_text:
        found.append(OPENED_IN_FUTURE)
    if request.closed_at is not None and request.closed_at > now_text:
        found.append(CLOSED_IN_FUTURE)
    if state == CLOSED and request.closed_at is None:
        found.append(CLOSED_WITHOUT_DATE)
    return found


EventSpec = tuple[str, str, dict[str, Any], str]  # event type, occurred at, payload, event id


def request_events(
    tenant_id: str, source: str, request: ServiceRequest, now_text: str
) -> tuple[str, list[EventSpec], EventSpec | None, str]:
    """Return a request's stream id, its events for a new stream, its reopening event and
    its state (OPEN, IN_PROGRESS or CLOSED)."""
    ids = RequestIds(tenant_id, source, request.source_id)
    incident_id = ids.of("incident")
    state = status_class(request.status, request.closed_at)
    flags = anomalies(request, state, now_text)
    snapshot_at = request.updated_at or request.opened_at
    common = {
        "source_status": request.status,
        "source_updated_at": request.updated_at,
    }
    submitted = {
        "incident_id": incident_id,
        "source": source,
        "source_id": request.source_id,
        "category": request.category,
        "title": request.title,
        "description": request.description,
        "department": request.department,
        "assignee": request.assignee,
        "source_channel": request.source_channel,
        "address": request.address,
        "latitude": request.latitude,
        "longitude": request.longitude,
        "resolution_due_at": request.due_at,
        "details": request.details or None,
        "anomalies": flags or None,
        **common,
    }
    specs: list[EventSpec] = [(REPORT_SUBMITTED, request.opened_at, submitted, ids.of("submitted"))]
    if state == IN_PROGRESS:
        specs.append((WORK_STARTED, snapshot_at, dict(common), ids.of("started")))
    elif state == CLOSED:
        closed_at = request.closed_at or snapshot_at
        closing = {
            "reason": request.closure_reason,
            "anomalies": flags or None,
            **common,
        }
        specs.append((INCIDENT_CLOSED, closed_at, closing, ids.of("closed", closed_at)))
    reopening: EventSpec | None = None
    if state != CLOSED and request.updated_at is not None:
        reopening = (
            INCIDENT_REOPENED,
            request.updated_at,
            {"reason": f"listed as {request.status or 'open'} again by the source", **common},
            ids.of("reopened", request.updated_at),
        )
    return f"incident-{incident_id}", specs, reopening, state


def parse_requests(
    tenant_id: str,
    time_zone: str,
    source_file: str,
    rows: Sequence[tuple[int, list[str]]],
    *,
    source: str,
    columns: Sequence[str],
    mapper: RowMapper,
    now_text: str,
    nul_possible: bool = True,
) -> ParsedChunk:
    """Turn rows of one format into a chunk: COPY rows, cases and rejects.

    PostgreSQL text cannot hold NUL characters, so with `nul_possible` each row is checked
    for them first.
    """
    times = TimeReader(ZoneInfo(time_zone))
    events = EventRows(tenant_id, import_metadata(source_file))
    chunk = ParsedChunk()
    parts: list[bytes] = []
    heads: list[str] = []
    offset = 0
    gc.disable()  # many short-lived objects and no cycles, as in the Boston parser
    try:
        for row_number, values in rows:
            nul = nul_possible and next(
                (name for name, value in zip(columns, values, strict=True) if "\x00" in value),
                None,
            )
            if nul:
                chunk.rejects.append((row_number, f"invalid {nul}: contains a NUL character"))
                continue
            try:
                request = mapper(values, times)
                stream_id, specs, reopening, state = request_events(
                    tenant_id, source, request, now_text
                )
            except RowRejected as error:
                chunk.rejects.append((row_number, str(error)))
                continue
            lines = []
            digest: bytes | None = None
            for version, (event_type, occurred_at, payload, event_id) in enumerate(specs, start=1):
                line, digest = events.row(
                    stream_id, version, event_type, occurred_at, payload, event_id, digest
                )
                lines.append(line)
            assert digest is not None
            reopen_line = None
            if reopening is not None:
                # Version and hash are set by the writer if it appends this event.
                event_type, occurred_at, payload, event_id = reopening
                reopen_line, _ = events.row(
                    stream_id, 0, event_type, occurred_at, payload, event_id, None
                )
            text = b"".join(lines)
            chunk.cases.append(
                ParsedCase(
                    stream_id,
                    row_number,
                    offset,
                    offset + len(text),
                    len(specs),
                    digest,
                    request.updated_at,
                    state == CLOSED,
                    reopen_line,
                )
            )
            parts.append(text)
            heads.append(f"{stream_id}\t{tenant_id}\t{len(specs)}\t\\\\x{digest.hex()}\n")
            offset += len(text)
    finally:
        gc.enable()
    chunk.events_copy = b"".join(parts)
    chunk.streams_copy = "".join(heads).encode()
    return chunk


def required(value: str, column: str) -> str:
    """Return a required text value, or reject the row naming the missing column."""
    text = clean(value)
    if text is None:
        raise RowRejected(f"missing {column}")
    return text


def opened(times: TimeReader, value: str, column: str) -> str:
    """Return a required open time, or reject the row naming the column."""
    text = times.utc_text(value, column)
    if text is None:
        raise RowRejected(f"missing {column}")
    return text
