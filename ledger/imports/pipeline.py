"""The import pipeline: one reader, a process pool that parses rows, one COPY writer.

The reader streams the file and hands chunks of rows to the pool, keeping a bounded number
of chunks in flight so memory stays flat whatever the file size. The writer appends each
parsed chunk in one transaction with COPY. Event ids derive from the case id, so importing
the same file again appends nothing.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
import psycopg
from psycopg import errors as pg_errors

from ledger.events import canonical_json, event_hash
from ledger.imports import boston
from ledger.imports.boston import EventRow, ParsedCase

logger = logging.getLogger(__name__)

CHUNK_ROWS = 4000
COPY_COLUMNS = (
    "tenant_id, stream_id, stream_version, event_type, schema_version, payload, metadata, "
    "occurred_at, event_id, hash"
)

ProgressCallback = Callable[[int, int], None]


@dataclass
class ImportReport:
    """What an import did, for the command line and for tests."""

    rows: int = 0
    cases: int = 0
    events_appended: int = 0
    events_already_present: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)


class ImportFileError(ValueError):
    """The file cannot be imported at all (unreadable, or not the expected format)."""


def _open_text(path: Path) -> tuple[IO[bytes], IO[str]]:
    raw = path.open("rb")
    stream: IO[bytes] = raw
    if path.suffix == ".gz":
        stream = gzip.GzipFile(fileobj=raw)  # type: ignore[assignment]
    # utf-8-sig drops a byte-order mark; csv needs newline="" to keep quoted newlines.
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="replace", newline="")
    return raw, text


def _read_chunks(
    path: Path, report: ImportReport, progress: ProgressCallback | None
) -> Iterator[list[tuple[int, list[str]]]]:
    raw, text = _open_text(path)
    total = os.fstat(raw.fileno()).st_size
    with raw, text:
        reader = csv.reader(text)
        try:
            header = next(reader)
        except StopIteration:
            raise ImportFileError(f"{path} is empty: expected a header row") from None
        except (csv.Error, OSError, EOFError) as error:
            raise ImportFileError(f"cannot read {path}: {error}") from error
        try:
            indexes = boston.column_indexes(header)
        except ValueError as error:
            raise ImportFileError(f"{path}: {error}") from error
        width = len(header)

        chunk: list[tuple[int, list[str]]] = []
        row_number = 1  # the header is row 1
        try:
            for values in reader:
                row_number += 1
                report.rows += 1
                if len(values) != width:
                    report.rejected.append(
                        (row_number, f"row has {len(values)} fields, the header has {width}")
                    )
                    continue
                chunk.append(
                    (row_number, [values[i] if i >= 0 else "" for i in indexes])
                )
                if len(chunk) >= CHUNK_ROWS:
                    yield chunk
                    chunk = []
                    if progress:
                        progress(raw.tell(), total)
        except (csv.Error, OSError, EOFError) as error:
            raise ImportFileError(f"cannot read {path} after row {row_number}: {error}") from error
        if chunk:
            yield chunk
        if progress:
            progress(total, total)


def import_boston(
    conn: psycopg.Connection[Any],
    path: Path,
    *,
    tenant_id: str,
    time_zone: str,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
) -> ImportReport:
    """Import a Boston 311 export (.csv or .csv.gz) into `tenant_id`.

    Bad rows are collected in the report with their row number and reason; good rows are
    imported. Raises ImportFileError when the file itself cannot be read.
    """
    report = ImportReport()
    workers = workers or os.cpu_count() or 1
    source_file = path.name
    context = multiprocessing.get_context("spawn")
    in_flight: deque[Future[tuple[list[ParsedCase], list[tuple[int, str]]]]] = deque()
    writer = CopyWriter(conn, tenant_id)
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        for chunk in _read_chunks(path, report, progress):
            in_flight.append(
                pool.submit(boston.parse_chunk, tenant_id, time_zone, source_file, chunk)
            )
            # Two chunks per worker keep the pool busy while the writer copies; more would
            # only hold rows in memory.
            if len(in_flight) >= 2 * workers:
                writer.write(in_flight.popleft().result(), report)
        while in_flight:
            writer.write(in_flight.popleft().result(), report)
    report.rejected.sort()
    logger.info(
        "imported %s into tenant %s: %d rows, %d events appended, %d already present, "
        "%d rejected",
        path, tenant_id, report.rows, report.events_appended, report.events_already_present,
        len(report.rejected),
    )
    return report


class CopyWriter:
    """Appends parsed cases in batches with COPY, one transaction per batch."""

    def __init__(self, conn: psycopg.Connection[Any], tenant_id: str) -> None:
        self.conn = conn
        self.tenant_id = tenant_id

    def write(
        self,
        parsed: tuple[list[ParsedCase], list[tuple[int, str]]],
        report: ImportReport,
    ) -> None:
        cases, rejects = parsed
        report.rejected.extend(rejects)
        report.cases += len(cases)
        if not cases:
            return
        # A concurrent import of the same cases can create one of these streams between our
        # check and our COPY; the unique index stops it and the batch is retried.
        for attempt in range(3):
            try:
                with self.conn.transaction():
                    appended, present = self._write_batch(cases, report)
                report.events_appended += appended
                report.events_already_present += present
                return
            except pg_errors.UniqueViolation as error:
                logger.warning(
                    "import batch for tenant %s collided with a concurrent append "
                    "(attempt %d): %s", self.tenant_id, attempt + 1, error,
                )
        raise RuntimeError(f"import batch for tenant {self.tenant_id} kept colliding; retry")

    def _write_batch(
        self, cases: list[ParsedCase], report: ImportReport
    ) -> tuple[int, int]:
        # The same case twice in one chunk: its events chain onto the first occurrence.
        by_stream: dict[str, list[EventRow]] = {}
        rows_of: dict[str, int] = {}
        for case in cases:
            events = list(case.events)
            stream_id = events[0].stream_id
            by_stream.setdefault(stream_id, []).extend(events)
            rows_of.setdefault(stream_id, case.row_number)

        heads = {
            row[0]: (row[1], row[2], bytes(row[3]) if row[3] is not None else None)
            for row in self.conn.execute(
                "SELECT stream_id, tenant_id, version, head_hash FROM streams "
                "WHERE stream_id = ANY(%s) FOR UPDATE",
                (list(by_stream),),
            )
        }
        known_ids: set[Any] = set()
        if heads:
            known_ids = {
                row[0]
                for row in self.conn.execute(
                    "SELECT event_id FROM events WHERE tenant_id = %s AND stream_id = ANY(%s)",
                    (self.tenant_id, list(heads)),
                )
            }

        to_copy: list[tuple[Any, ...]] = []
        new_heads: list[tuple[str, int, bytes]] = []
        moved_heads: list[tuple[int, bytes, str]] = []
        present = 0
        for stream_id, events in by_stream.items():
            head = heads.get(stream_id)
            duplicated = len({e.event_id for e in events}) != len(events)
            if head is None and not duplicated:
                chained = events
            else:
                if head is not None and head[0] != self.tenant_id:
                    report.rejected.append(
                        (rows_of[stream_id], f"stream {stream_id} belongs to another tenant")
                    )
                    continue
                fresh = []
                for event in events:
                    if event.event_id in known_ids:
                        present += 1
                    else:
                        known_ids.add(event.event_id)
                        fresh.append(event)
                version, head_hash = (head[1], head[2]) if head else (0, None)
                chained = self._rechain(stream_id, fresh, version, head_hash)
                if not chained:
                    continue
            for event in chained:
                to_copy.append(
                    (
                        self.tenant_id,
                        event.stream_id,
                        event.stream_version,
                        event.event_type,
                        1,
                        event.payload_json.decode(),
                        event.metadata_json.decode(),
                        event.occurred_at,
                        event.event_id,
                        event.hash,
                    )
                )
            last = chained[-1]
            if head is None:
                new_heads.append((stream_id, last.stream_version, last.hash))
            else:
                moved_heads.append((last.stream_version, last.hash, stream_id))

        with self.conn.cursor() as cur:
            with cur.copy(f"COPY events ({COPY_COLUMNS}) FROM STDIN") as copy:
                for row in to_copy:
                    copy.write_row(row)
            with cur.copy("COPY streams (stream_id, tenant_id, version, head_hash) FROM STDIN") as copy:
                for stream_id, version, digest in new_heads:
                    copy.write_row((stream_id, self.tenant_id, version, digest))
            if moved_heads:
                cur.executemany(
                    "UPDATE streams SET version = %s, head_hash = %s WHERE stream_id = %s",
                    moved_heads,
                )
        return len(to_copy), present

    def _rechain(
        self, stream_id: str, events: list[EventRow], version: int, head_hash: bytes | None
    ) -> list[EventRow]:
        """Renumber and rehash events that follow an existing stream head."""
        chained = []
        previous = head_hash
        for offset, event in enumerate(events, start=1):
            payload = orjson.loads(event.payload_json)
            metadata = orjson.loads(event.metadata_json)
            digest = event_hash(
                previous,
                tenant_id=self.tenant_id,
                stream_id=stream_id,
                stream_version=version + offset,
                event_type=event.event_type,
                schema_version=1,
                event_id=event.event_id,
                occurred_at=event.occurred_at,
                payload=payload,
                metadata=metadata,
            )
            chained.append(
                EventRow(
                    stream_id=stream_id,
                    stream_version=version + offset,
                    event_type=event.event_type,
                    payload_json=canonical_json(payload),
                    metadata_json=canonical_json(metadata),
                    occurred_at=event.occurred_at,
                    event_id=event.event_id,
                    hash=digest,
                )
            )
            previous = digest
        return chained
