"""The City of Boston 311 export: rows to incident events.

Each case becomes a ReportSubmitted event at OPEN_DT, carrying the city's TARGET_DT as its
resolution due time, and an IncidentClosed event at CLOSED_DT when the case is closed.
Times in the file are naive local times, read in the tenant's time zone.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

import orjson

from ledger.errors import InvalidEventData
from ledger.events import canonical_json, event_hash, normalize_json
from ledger.ids import derived_id, incident_stream_id
from ledger.lifecycle import INCIDENT_CLOSED, REPORT_SUBMITTED

SOURCE = "boston-311"
TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"

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


class RowRejected(ValueError):
    """A row that cannot become events; the message says why."""


@dataclass(frozen=True, slots=True)
class EventRow:
    """One event ready for COPY into the events table, hashed as the start of a new stream."""

    stream_id: str
    stream_version: int
    event_type: str
    payload_json: bytes
    metadata_json: bytes
    occurred_at: datetime
    event_id: UUID
    hash: bytes


@dataclass(frozen=True, slots=True)
class ParsedCase:
    row_number: int
    case_id: str
    events: tuple[EventRow, ...]


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


def _text(value: str) -> str | None:
    value = value.strip()
    return value or None


def _time(value: str, column: str, zone: ZoneInfo) -> datetime | None:
    value = value.strip()
    if not value:
        return None
    try:
        naive = datetime.strptime(value, TIME_FORMAT)
    except ValueError as error:
        raise RowRejected(
            f"invalid {column} {value!r}: expected MM/DD/YYYY hh:mm:ss AM"
        ) from error
    return naive.replace(tzinfo=zone).astimezone(UTC)


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


def parse_case(
    tenant_id: str, zone: ZoneInfo, values: list[str], row_number: int, source_file: str
) -> ParsedCase:
    """Turn one row (already narrowed to COLUMNS, '' for absent ones) into events."""
    row = dict(zip(COLUMNS, values, strict=True))
    case_id = row["CASE_ENQUIRY_ID"].strip()
    if not case_id:
        raise RowRejected("missing CASE_ENQUIRY_ID")
    if not case_id.isdigit():
        raise RowRejected(f"invalid CASE_ENQUIRY_ID {case_id!r}: expected digits")
    opened = _time(row["OPEN_DT"], "OPEN_DT", zone)
    if opened is None:
        raise RowRejected("missing OPEN_DT")
    target = _time(row["TARGET_DT"], "TARGET_DT", zone)
    closed = _time(row["CLOSED_DT"], "CLOSED_DT", zone)
    latitude = _coordinate(row["LATITUDE"], "LATITUDE", 90)
    longitude = _coordinate(row["LONGITUDE"], "LONGITUDE", 180)

    incident_id = derived_id(tenant_id, SOURCE, case_id)
    stream_id = incident_stream_id(incident_id)
    submitted: dict[str, Any] = {
        "incident_id": str(incident_id),
        "source": SOURCE,
        "source_id": case_id,
        "category": _text(row["TYPE"]),
        "reason": _text(row["REASON"]),
        "department": _text(row["Department"]),
        "queue": _text(row["QUEUE"]),
        "subject": _text(row["SUBJECT"]),
        "title": _text(row["CASE_TITLE"]),
        "source_channel": _text(row["Source"]),
        "address": _text(row["Location"]),
        "latitude": latitude,
        "longitude": longitude,
        "resolution_due_at": target.isoformat() if target else None,
    }
    metadata = {
        "actor": "import",
        "role": "system",
        "channel": "import",
        "source_file": source_file,
        "source_row": row_number,
    }
    specs: list[tuple[str, datetime, dict[str, Any], str]] = [
        (REPORT_SUBMITTED, opened, {k: v for k, v in submitted.items() if v is not None},
         "submitted")
    ]
    if closed is not None:
        closing = {"reason": _text(row["CLOSURE_REASON"]), "source_status": _text(
            row["CASE_STATUS"])}
        specs.append(
            (INCIDENT_CLOSED, closed, {k: v for k, v in closing.items() if v is not None},
             "closed")
        )

    events = []
    previous: bytes | None = None
    for version, (event_type, occurred_at, payload, suffix) in enumerate(specs, start=1):
        payload = normalize_json(payload, "payload")
        event_id = derived_id(tenant_id, SOURCE, case_id, suffix)
        digest = event_hash(
            previous,
            tenant_id=tenant_id,
            stream_id=stream_id,
            stream_version=version,
            event_type=event_type,
            schema_version=1,
            event_id=event_id,
            occurred_at=occurred_at,
            payload=payload,
            metadata=metadata,
        )
        events.append(
            EventRow(
                stream_id=stream_id,
                stream_version=version,
                event_type=event_type,
                payload_json=canonical_json(payload),
                metadata_json=canonical_json(metadata),
                occurred_at=occurred_at,
                event_id=event_id,
                hash=digest,
            )
        )
        previous = digest
    return ParsedCase(row_number, case_id, tuple(events))


def parse_chunk(
    tenant_id: str,
    time_zone: str,
    source_file: str,
    rows: list[tuple[int, list[str]]],
) -> tuple[list[ParsedCase], list[tuple[int, str]]]:
    """Parse a chunk of rows in a worker process; return cases and (row number, reason)."""
    zone = ZoneInfo(time_zone)
    cases: list[ParsedCase] = []
    rejects: list[tuple[int, str]] = []
    for row_number, values in rows:
        try:
            cases.append(parse_case(tenant_id, zone, values, row_number, source_file))
        except (RowRejected, InvalidEventData) as error:
            rejects.append((row_number, str(error)))
    return cases, rejects


def payload_of(row: EventRow) -> Any:
    return orjson.loads(row.payload_json)
