"""Audit records of events, and exports of a filtered log as CSV or JSON Lines.

An export streams from a server-side cursor in batches and yields encoded bytes batch by
batch, so its memory use depends on the batch size, not on the number of events.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Generator, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
import psycopg

from ledger.audit import AuditFilter, audit_transaction, incident_id_of, iter_event_batches
from ledger.events import RecordedEvent, canonical_json

logger = logging.getLogger(__name__)

ExportFormat = Literal["csv", "jsonl"]
EXPORT_FORMATS: tuple[ExportFormat, ...] = ("csv", "jsonl")
EXPORT_BATCH_SIZE = 2000

MEDIA_TYPES: dict[ExportFormat, str] = {
    "csv": "text/csv; charset=utf-8",
    "jsonl": "application/x-ndjson",
}

# The fields of an audit record, in the order of the CSV columns.
RECORD_FIELDS = (
    "position",
    "tx_id",
    "recorded_at",
    "occurred_at",
    "event_type",
    "schema_version",
    "stream_id",
    "stream_version",
    "incident_id",
    "actor",
    "role",
    "actor_id",
    "channel",
    "correlation_id",
    "event_id",
    "payload",
    "metadata",
    "hash",
)


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


def event_record(event: RecordedEvent) -> dict[str, Any]:
    """Return the audit record of an event: JSON values only, times in UTC.

    Payload and metadata are complete, so the record carries everything the event's hash
    covers and the hash chain can be checked from an export.
    """
    metadata = event.metadata
    return {
        "position": event.position,
        "tx_id": event.tx_id,
        "recorded_at": _utc(event.recorded_at),
        "occurred_at": _utc(event.occurred_at),
        "event_type": event.event_type,
        "schema_version": event.schema_version,
        "stream_id": event.stream_id,
        "stream_version": event.stream_version,
        "incident_id": incident_id_of(event.stream_id),
        "actor": metadata.get("actor"),
        "role": metadata.get("role"),
        "actor_id": metadata.get("actor_id"),
        "channel": metadata.get("channel"),
        "correlation_id": metadata.get("correlation_id"),
        "event_id": str(event.event_id),
        "payload": event.payload,
        "metadata": metadata,
        "hash": event.hash.hex(),
    }


def csv_row(record: dict[str, Any]) -> list[Any]:
    """Return a record as CSV cells: payload and metadata as JSON with sorted keys, and
    empty cells for missing values."""
    cells = []
    for name in RECORD_FIELDS:
        value = record[name]
        if name in ("payload", "metadata"):
            value = canonical_json(value).decode()
        cells.append("" if value is None else value)
    return cells


def encode_batches(
    batches: Iterable[list[RecordedEvent]], export_format: ExportFormat
) -> Iterator[bytes]:
    """Encode batches of events, yielding one chunk per batch.

    The first chunk is yielded once the first batch is read: for CSV it starts with the
    header row, and it is the header alone (CSV) or empty (JSON Lines) when nothing matches.
    """
    pending_header = export_format == "csv"
    for events in batches:
        chunk = _encode(events, export_format, header=pending_header)
        pending_header = False
        yield chunk
    if pending_header:
        yield _encode([], export_format, header=True)


def _encode(events: list[RecordedEvent], export_format: ExportFormat, *, header: bool) -> bytes:
    if export_format == "jsonl":
        return b"".join(orjson.dumps(event_record(event)) + b"\n" for event in events)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    if header:
        writer.writerow(RECORD_FIELDS)
    writer.writerows(csv_row(event_record(event)) for event in events)
    return buffer.getvalue().encode()


@dataclass
class ExportProgress:
    """How far an export got: the events encoded so far."""

    events: int = 0


def export_events(
    conn: psycopg.Connection[Any],
    tenant_id: str,
    audit_filter: AuditFilter,
    export_format: ExportFormat,
    *,
    batch_size: int = EXPORT_BATCH_SIZE,
    progress: ExportProgress | None = None,
) -> Generator[bytes, None, None]:
    """Yield the tenant's matching events, encoded, in (transaction id, position) order.

    The generator opens its own `audit_transaction` on `conn`, which must not be in a
    transaction, and keeps it open until the generator is exhausted or closed. Close it
    when stopping early, so that the transaction ends and the connection can be reused. Raises
    InvalidRequest from the first `next()` when a filter value is unknown.
    """
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {export_format!r}: use csv or jsonl")
    progress = progress if progress is not None else ExportProgress()
    logger.info("audit export of tenant %s as %s started", tenant_id, export_format)
    try:
        # The batches are closed explicitly, inside the transaction: left to the garbage
        # collector, the server-side cursor would be closed later, from whichever thread
        # collects it, on a connection that may be serving another request by then.
        with (
            audit_transaction(conn, tenant_id),
            closing(
                iter_event_batches(conn, tenant_id, audit_filter, batch_size=batch_size)
            ) as batches,
        ):
            yield from encode_batches(_counted(batches, progress), export_format)
    except GeneratorExit:
        logger.info(
            "audit export of tenant %s closed after %d events, before its end",
            tenant_id,
            progress.events,
        )
        raise
    logger.info("audit export of tenant %s finished: %d events", tenant_id, progress.events)


def _counted(
    batches: Iterator[list[RecordedEvent]], progress: ExportProgress
) -> Iterator[list[RecordedEvent]]:
    for events in batches:
        progress.events += len(events)
        yield events
