"""The import pipeline: one reader, a process pool that parses rows, one COPY writer.

The reader streams the file and hands chunks of rows to the pool, keeping a bounded number
of chunks in flight so memory stays flat whatever the file size. The writer appends each
parsed chunk in one transaction with COPY. Event ids derive from the case id, so importing
the same file again appends nothing.
"""

from __future__ import annotations

import csv
import gzip
import logging
import multiprocessing
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import psycopg
from psycopg import errors as pg_errors

from ledger.events import event_hash_serialized, utc_text
from ledger.imports import boston
from ledger.imports.boston import ParsedCase, ParsedChunk
from ledger.imports.copytext import EVENT_COPY_COLUMNS, EventLine
from ledger.metrics import IMPORT_EVENTS, IMPORT_ROWS
from ledger.tenants import validate_tenant_id

logger = logging.getLogger(__name__)

# Bytes of the (decompressed) file per block handed to a parser process.
BLOCK_BYTES = 1 << 20

ProgressCallback = Callable[[int, int], None]


@dataclass
class ImportReport:
    """Counts and rejected rows of one import, for the command line and for tests."""

    rows: int = 0
    cases: int = 0
    events_appended: int = 0
    events_already_present: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)


class ImportFileError(ValueError):
    """The file cannot be imported at all (unreadable, or not the expected format)."""


@dataclass(frozen=True, slots=True)
class Layout:
    """Positions of the needed columns in the file's rows, and the row width."""

    indexes: tuple[int, ...]
    width: int


def _open_binary(path: Path) -> tuple[IO[bytes], IO[bytes]]:
    raw = path.open("rb")
    if path.suffix == ".gz":
        return raw, gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
    return raw, raw


def first_record_end(buffer: bytes) -> int:
    """Return the index just past the first complete CSV record in `buffer`, or -1."""
    position = buffer.find(b"\n")
    while position >= 0 and buffer.count(b'"', 0, position) % 2:
        position = buffer.find(b"\n", position + 1)
    return position + 1 if position >= 0 else -1


def record_end(buffer: bytes) -> int:
    """Return the index just past the last complete CSV record in `buffer`, or -1.

    `buffer` starts at a record boundary. A newline ends a record only outside quotes,
    which is where an even number of quote characters precedes it.
    """
    position = len(buffer)
    while True:
        position = buffer.rfind(b"\n", 0, position)
        if position < 0:
            return -1
        if buffer.count(b'"', 0, position) % 2 == 0:
            return position + 1


def _read_blocks(path: Path, progress: ProgressCallback | None) -> Iterator[tuple[Layout, bytes]]:
    """Yield the file in blocks of whole records, with the column layout from its header.

    The reader splits and decompresses but does not parse: CSV parsing runs in the pool.
    """
    raw, stream = _open_binary(path)
    total = os.fstat(raw.fileno()).st_size
    with raw, stream:
        buffer = b""
        layout: Layout | None = None
        while True:
            try:
                data = stream.read(BLOCK_BYTES)
            except (OSError, EOFError) as error:
                raise ImportFileError(f"cannot read {path}: {error}") from error
            buffer += data
            end = record_end(buffer) if data else len(buffer)
            if end <= 0:
                if not data:
                    break
                continue
            if layout is None:
                header_end = first_record_end(buffer)
                if header_end < 0:
                    header_end = len(buffer)
                layout = _layout(path, buffer[:header_end])
                buffer = buffer[header_end:]
                end -= header_end
            block, buffer = buffer[:end], buffer[end:]
            if block:
                yield layout, block
            if progress:
                progress(raw.tell(), total)
            if not data:
                break
        if layout is None:
            raise ImportFileError(f"{path} is empty: expected a header row")
        if progress:
            progress(total, total)


def read_layout(path: Path) -> Layout:
    """Read the header of an export; raise ImportFileError when it is not a Boston export."""
    raw, stream = _open_binary(path)
    with raw, stream:
        try:
            head = stream.read(BLOCK_BYTES)
        except (OSError, EOFError) as error:
            raise ImportFileError(f"cannot read {path}: {error}") from error
    if not head:
        raise ImportFileError(f"{path} is empty: expected a header row")
    end = first_record_end(head)
    return _layout(path, head[:end] if end > 0 else head)


def _layout(path: Path, header_line: bytes) -> Layout:
    try:
        header = next(csv.reader([header_line.decode("utf-8-sig", errors="replace")]))
    except (csv.Error, StopIteration) as error:
        raise ImportFileError(f"{path}: cannot read the header row: {error}") from error
    try:
        return Layout(boston.column_indexes(header), len(header))
    except ValueError as error:
        raise ImportFileError(f"{path}: {error}") from error


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

    `conn` must be the owner's connection: PostgreSQL rejects COPY FROM into a table with
    row-level security for every role the policies apply to. Bad rows are collected in the
    report with their row number and reason; good rows are imported. Raises ImportFileError
    when the file itself cannot be read.
    """
    validate_tenant_id(tenant_id)
    report = ImportReport()
    workers = workers or os.cpu_count() or 1
    source_file = path.name
    context = multiprocessing.get_context("spawn")
    # Two blocks per worker keep the pool busy while the writer copies; more would only
    # hold rows in memory. The writer runs in its own thread so that reading goes on while
    # a COPY waits on the server.
    in_flight: queue.Queue[Future[ParsedChunk] | None] = queue.Queue(maxsize=2 * workers)
    writer = CopyWriter(conn, tenant_id)
    failure: list[BaseException] = []

    def write_all() -> None:
        try:
            while (future := in_flight.get()) is not None:
                writer.write(future.result(), report)
        except BaseException as error:  # noqa: BLE001 - handed to the reading thread
            failure.append(error)
            # Drain the queue, so the reader does not block on a full queue after a failure.
            while in_flight.get() is not None:
                pass

    writer_thread = threading.Thread(target=write_all, name="import-writer")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        writer_thread.start()
        try:
            for layout, block in _read_blocks(path, progress):
                if failure:
                    break
                in_flight.put(
                    pool.submit(
                        boston.parse_block,
                        tenant_id,
                        time_zone,
                        source_file,
                        layout.indexes,
                        layout.width,
                        block,
                    )
                )
        finally:
            in_flight.put(None)
            writer_thread.join()
    if failure:
        raise failure[0]
    report.rejected.sort()
    IMPORT_ROWS.labels("accepted").inc(report.rows - len(report.rejected))
    IMPORT_ROWS.labels("rejected").inc(len(report.rejected))
    IMPORT_EVENTS.inc(report.events_appended)
    logger.info(
        "imported %s into tenant %s: %d rows, %d events appended, %d already present, %d rejected",
        path,
        tenant_id,
        report.rows,
        report.events_appended,
        report.events_already_present,
        len(report.rejected),
    )
    return report


class CopyWriter:
    """Appends parsed chunks with COPY, one transaction per chunk.

    The fast path streams a worker's COPY text unchanged. Cases whose stream exists already
    (a re-import, or the same case twice) take the slow path: events already stored are
    dropped and the rest are renumbered and rehashed after the stream's head.
    """

    def __init__(self, conn: psycopg.Connection[Any], tenant_id: str) -> None:
        self.conn = conn
        self.tenant_id = tenant_id
        # Workers number rows within their block; blocks arrive here in file order, so the
        # file's row number is this offset plus the block's. The header is row 1.
        self.row_offset = 1

    def write(self, chunk: ParsedChunk, report: ImportReport) -> None:
        offset = self.row_offset
        self.row_offset += chunk.records
        report.rows += chunk.records
        report.rejected.extend((offset + number, reason) for number, reason in chunk.rejects)
        report.cases += len(chunk.cases)
        if not chunk.cases:
            return
        # A concurrent import of the same cases can create one of these streams between our
        # check and our COPY; the unique index stops it and the chunk is retried.
        for attempt in range(1, 4):
            try:
                with self.conn.transaction():
                    appended, present, rejected = self._write_chunk(chunk)
            except pg_errors.UniqueViolation as error:
                logger.warning(
                    "import chunk for tenant %s collided with a concurrent append "
                    "(attempt %d of 3): %s",
                    self.tenant_id,
                    attempt,
                    error,
                )
                continue
            report.events_appended += appended
            report.events_already_present += present
            report.rejected.extend((offset + number, reason) for number, reason in rejected)
            return
        raise ImportFileError(
            f"import into tenant {self.tenant_id} collided with concurrent appends three "
            "times; run it again"
        )

    def _write_chunk(self, chunk: ParsedChunk) -> tuple[int, int, list[tuple[int, str]]]:
        stream_ids = [case.stream_id for case in chunk.cases]
        heads = {
            row[0]: (row[1], row[2], bytes(row[3]) if row[3] is not None else None)
            for row in self.conn.execute(
                "SELECT stream_id, tenant_id, version, head_hash FROM streams "
                "WHERE stream_id = ANY(%s) FOR UPDATE",
                (stream_ids,),
            )
        }
        if not heads and len(set(stream_ids)) == len(stream_ids):
            return self._copy(chunk.events_copy, chunk.streams_copy), 0, []
        return self._write_slow(chunk, heads)

    def _copy(self, events_copy: bytes, streams_copy: bytes) -> int:
        with self.conn.cursor() as cur:
            with cur.copy(f"COPY events ({EVENT_COPY_COLUMNS}) FROM STDIN") as copy:
                copy.write(events_copy)
            appended = cur.rowcount
            with cur.copy(
                "COPY streams (stream_id, tenant_id, version, head_hash) FROM STDIN"
            ) as copy:
                copy.write(streams_copy)
        return appended

    def _write_slow(
        self, chunk: ParsedChunk, heads: dict[str, tuple[str, int, bytes | None]]
    ) -> tuple[int, int, list[tuple[int, str]]]:
        known_ids: set[str] = set()
        if heads:
            known_ids = {
                str(row[0])
                for row in self.conn.execute(
                    "SELECT event_id FROM events WHERE tenant_id = %s AND stream_id = ANY(%s)",
                    (self.tenant_id, list(heads)),
                )
            }
        rejected: list[tuple[int, str]] = []
        fast_parts: list[bytes] = []
        fast_heads: list[ParsedCase] = []
        slow_lines: list[str] = []
        moved: dict[str, tuple[int, bytes]] = {}
        present = 0
        for case in chunk.cases:
            raw = chunk.events_copy[case.start : case.end]
            if case.stream_id not in heads and case.stream_id not in moved:
                fast_parts.append(raw)
                fast_heads.append(case)
                known_ids.update(
                    EventLine.decode(line).event_id for line in raw.decode().splitlines()
                )
                moved[case.stream_id] = (case.version, case.head_hash)
                continue
            owner = heads[case.stream_id][0] if case.stream_id in heads else self.tenant_id
            if owner != self.tenant_id:
                rejected.append(
                    (case.row_number, f"stream {case.stream_id} belongs to another tenant")
                )
                continue
            version, head_hash = moved.get(case.stream_id) or heads[case.stream_id][1:]
            for line in raw.decode().splitlines():
                event = EventLine.decode(line)
                if event.event_id in known_ids:
                    present += 1
                    continue
                known_ids.add(event.event_id)
                version += 1
                head_hash = event_hash_serialized(
                    head_hash,
                    tenant_id=self.tenant_id,
                    stream_id=case.stream_id,
                    stream_version=version,
                    event_type=event.event_type,
                    schema_version=event.schema_version,
                    event_id=event.event_id,
                    occurred_at_utc=utc_text(event.occurred_at),
                    payload_json=event.payload_json.encode(),
                    metadata_json=event.metadata_json.encode(),
                )
                slow_lines.append(replace(event, stream_version=version, hash=head_hash).encode())
            if head_hash is not None:
                moved[case.stream_id] = (version, head_hash)

        # Streams first created in this chunk get their final head, after any repeats.
        streams_copy = "".join(
            f"{case.stream_id}\t{self.tenant_id}\t{moved[case.stream_id][0]}\t"
            f"\\\\x{moved[case.stream_id][1].hex()}\n"
            for case in fast_heads
        ).encode()
        events_copy = b"".join(fast_parts) + "".join(slow_lines).encode()
        appended = self._copy(events_copy, streams_copy) if events_copy else 0
        updates = [
            (version, head_hash, stream_id)
            for stream_id, (version, head_hash) in moved.items()
            if stream_id in heads
        ]
        if updates:
            with self.conn.cursor() as cur:
                cur.executemany(
                    "UPDATE streams SET version = %s, head_hash = %s WHERE stream_id = %s",
                    updates,
                )
        return appended, present, rejected
