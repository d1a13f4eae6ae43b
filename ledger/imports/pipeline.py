"""The import pipeline: one reader, a process pool that parses rows, one COPY writer.

The reader streams the file and hands blocks of whole records (or, for a JSON array, lists
of requests) to the pool, keeping a bounded number in flight so memory stays flat whatever
the file size. The writer appends each parsed chunk in one transaction with COPY and
streams rejected rows to the rejects file. Event ids derive from the request id and what
each event states, so importing the same file again appends nothing.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import ijson
import psycopg
from psycopg import errors as pg_errors

from ledger.events import event_hash_serialized, utc_text
from ledger.imports import formats
from ledger.imports.boston import ParsedCase, ParsedChunk
from ledger.imports.copytext import (
    BINARY_SIGNATURE,
    EVENT_COPY_COLUMNS,
    EventLine,
    binary_rows,
)
from ledger.imports.formats import FORMATS, ImportFormat, UnknownFormat
from ledger.lifecycle import (
    INCIDENT_CLOSED,
    INCIDENT_MARKED_DUPLICATE,
    INCIDENT_REJECTED,
    INCIDENT_REOPENED,
    REPORT_SUBMITTED,
)
from ledger.metrics import IMPORT_EVENTS, IMPORT_ROWS
from ledger.processes import worker_context
from ledger.tenants import validate_tenant_id

logger = logging.getLogger(__name__)

# Bytes of the (decompressed) file per block handed to a parser process.
BLOCK_BYTES = 1 << 20
# Requests of a JSON array per list handed to a parser process.
JSON_ITEMS = 2000
# Maximum size of one record. Without it, a quote that is never closed would make the rest
# of the file one record, held in memory.
MAX_RECORD_BYTES = 64 << 20
# Bytes read at most to find the end of the header row.
HEADER_LIMIT = 1 << 20
# Rejected rows kept in the report. All of them go to the rejects file.
KEPT_REJECTS = 1000

ProgressCallback = Callable[[int, int], None]

_CLOSING = frozenset({INCIDENT_CLOSED, INCIDENT_REJECTED, INCIDENT_MARKED_DUPLICATE})
_OPENING = frozenset({REPORT_SUBMITTED, INCIDENT_REOPENED})


@dataclass
class ImportReport:
    """Counts and rejected rows of one import, for the command line and for tests.

    `rejected` keeps the first KEPT_REJECTS rejected rows; `rejected_count` counts all.
    """

    format: str = ""
    rows: int = 0
    cases: int = 0
    events_appended: int = 0
    events_already_present: int = 0
    # Rows older than what their stream already records (an earlier snapshot of the
    # request listed after a later one): their events would undo the later state.
    versions_superseded: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)
    rejected_count: int = 0
    rejects_path: Path | None = None

    def add_rejects(self, rejects: list[tuple[int, str]]) -> None:
        room = KEPT_REJECTS - len(self.rejected)
        if room > 0:
            self.rejected.extend(rejects[:room])
        self.rejected_count += len(rejects)


class ImportFileError(ValueError):
    """The file cannot be imported at all (unreadable, or not the expected format)."""


@dataclass(frozen=True, slots=True)
class Layout:
    """The file's format and, for CSV, the positions of the format's columns, the row
    width and the field delimiter."""

    format: ImportFormat
    indexes: tuple[int, ...] = ()
    width: int = 0
    delimiter: str = ","
    json: bool = False


class RejectsFile:
    """Writes rejected rows to a CSV file, created with the first rejected row."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._file: IO[str] | None = None
        self._writer: Any = None

    def write(self, rejects: list[tuple[int, str]]) -> None:
        if self.path is None or not rejects:
            return
        if self._writer is None:
            try:
                self._file = self.path.open("w", newline="", encoding="utf-8")
            except OSError as error:
                raise ImportFileError(
                    f"cannot write the rejected rows to {self.path} ({error}); pass --rejects "
                    "with a writable path"
                ) from error
            self._writer = csv.writer(self._file)
            self._writer.writerow(["row_number", "reason"])
        self._writer.writerows(rejects)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


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


def _read_blocks(path: Path, layout: Layout, progress: ProgressCallback | None) -> Iterator[bytes]:
    """Yield the file's records after the header in blocks of whole records.

    The reader splits and decompresses but does not parse: CSV parsing runs in the pool.
    """
    raw, stream = _open_binary(path)
    total = os.fstat(raw.fileno()).st_size
    with raw, stream:
        buffer = b""
        done = 0  # bytes of the decompressed file handed on, header included
        header_seen = False
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
                if len(buffer) > MAX_RECORD_BYTES:
                    raise ImportFileError(
                        f"{path}: no record ends within {MAX_RECORD_BYTES} bytes after "
                        f"byte {done} of the (decompressed) file; a quoted "
                        "field is probably never closed. The records before it were imported"
                    )
                continue
            if not header_seen:
                header_end = first_record_end(buffer)
                if header_end < 0:
                    header_end = len(buffer)
                buffer = buffer[header_end:]
                end -= header_end
                done += header_end
                header_seen = True
            block, buffer = buffer[:end], buffer[end:]
            done += len(block)
            if block:
                yield block
            if progress:
                progress(raw.tell(), total)
            if not data:
                break
        if progress:
            progress(total, total)


def _read_json(
    path: Path, layout: Layout, progress: ProgressCallback | None
) -> Iterator[list[Any]]:
    """Yield the requests of a JSON array in lists of JSON_ITEMS, parsed incrementally."""
    raw, stream = _open_binary(path)
    total = os.fstat(raw.fileno()).st_size
    with raw, stream:
        buffered = io.BufferedReader(stream)  # type: ignore[type-var]
        if buffered.peek(3)[:3] == b"\xef\xbb\xbf":
            buffered.read(3)
        items: list[Any] = []
        try:
            for item in ijson.items(buffered, "item", use_float=True):
                items.append(item)
                if len(items) >= JSON_ITEMS:
                    yield items
                    items = []
                    if progress:
                        progress(raw.tell(), total)
        except ijson.JSONError as error:
            if items:
                yield items  # the requests read before the error are imported
            raise ImportFileError(
                f"{path} is not valid JSON ({error}); the requests before the error that "
                "were read are imported"
            ) from error
        except (OSError, EOFError) as error:
            raise ImportFileError(f"cannot read {path}: {error}") from error
        if items:
            yield items
        if progress:
            progress(total, total)


def read_layout(path: Path, format_name: str | None = None) -> Layout:
    """Read the start of an export and return its layout.

    The format is `format_name` when given, else detected from the header. Raises
    ImportFileError when the file is empty, unreadable or of no known format.
    """
    if format_name is not None and format_name not in FORMATS:
        raise ImportFileError(f"unknown format {format_name!r}: use one of {', '.join(FORMATS)}")
    raw, stream = _open_binary(path)
    head = b""
    with raw, stream:
        # Read until the header record is complete, however small the blocks.
        while first_record_end(head) < 0 and len(head) < HEADER_LIMIT:
            try:
                data = stream.read(BLOCK_BYTES)
            except (OSError, EOFError) as error:
                raise ImportFileError(f"cannot read {path}: {error}") from error
            if not data:
                break
            head += data
    start = head[3:] if head.startswith(b"\xef\xbb\xbf") else head
    if not start.strip():
        raise ImportFileError(f"{path} is empty: expected a header row")
    first = start.lstrip()[:1]
    if first in (b"[", b"{"):
        return _json_layout(path, first, format_name)
    end = first_record_end(head)
    return _csv_layout(path, head[:end] if end > 0 else head, format_name)


def _json_layout(path: Path, first: bytes, format_name: str | None) -> Layout:
    if first == b"{":
        raise ImportFileError(
            f"{path} contains a JSON object: expected the JSON array of requests that an "
            "Open311 GeoReport v2 server returns from GET requests.json"
        )
    if format_name not in (None, "open311"):
        raise ImportFileError(
            f"{path} is a JSON array, which only the open311 format reads; drop --format "
            f"{format_name} or pass a CSV file"
        )
    return Layout(formats.OPEN311, json=True)


def _csv_layout(path: Path, header_line: bytes, format_name: str | None) -> Layout:
    text = header_line.decode("utf-8-sig", errors="replace")
    delimiter = "\t" if text.count("\t") > text.count(",") else ","
    try:
        header = next(csv.reader([text.rstrip("\r\n")], delimiter=delimiter))
    except (csv.Error, StopIteration) as error:
        raise ImportFileError(f"{path}: cannot read the header row: {error}") from error
    try:
        fmt = FORMATS[format_name] if format_name else formats.detect(header)
        indexes = formats.column_indexes(fmt, header)
    except UnknownFormat as error:
        raise ImportFileError(f"{path}: {error}") from error
    return Layout(fmt, indexes, len(header), delimiter)


# At most this many parser processes unless more are asked for. Each holds an interpreter
# and its blocks in flight, about 110 MiB, beside 130 to 160 MiB in the reading process
# (docs/benchmarks.md, import memory), so three stay under the 500 MB memory target.
MAX_DEFAULT_WORKERS = 3


def default_workers() -> int:
    """Parser processes when none are asked for: one per CPU, at most MAX_DEFAULT_WORKERS."""
    return max(1, min(os.cpu_count() or 1, MAX_DEFAULT_WORKERS))


def import_file(
    conn: psycopg.Connection[Any],
    path: Path,
    *,
    tenant_id: str,
    time_zone: str,
    format_name: str | None = None,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
    rejects_path: Path | None = None,
    now: datetime | None = None,
) -> ImportReport:
    """Import a city export (.csv, .tsv or .json, or any of them gzipped) into `tenant_id`.

    `conn` must be the owner's connection: PostgreSQL rejects COPY FROM into a table with
    row-level security for every role the policies apply to. The format is `format_name`
    (a key of FORMATS) or detected from the header. Bad rows go to `rejects_path` with their
    row number and reason, and the first of them to the report; good rows are imported.
    Times after `now` (default: the start of the import) are flagged as in the future.
    Raises ImportFileError when the file itself cannot be read.
    """
    validate_tenant_id(tenant_id)
    layout = read_layout(path, format_name)
    report = ImportReport(format=layout.format.name, rejects_path=rejects_path)
    workers = workers or default_workers()
    source_file = path.name
    now_text = utc_text(now or datetime.now(UTC))
    context = worker_context("ledger.imports.formats")
    # Two blocks per worker keep the pool busy while the writer copies; more would only
    # hold rows in memory. The writer runs in its own thread so that reading goes on while
    # a COPY waits on the server.
    in_flight: queue.Queue[Future[ParsedChunk] | None] = queue.Queue(maxsize=2 * workers)
    rejects = RejectsFile(rejects_path)
    # CSV row numbers count the header as row 1; JSON requests count from 1.
    writer = CopyWriter(conn, tenant_id, rejects, row_offset=0 if layout.json else 1)
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

    common = (layout.format.name, tenant_id, time_zone, source_file, now_text)
    writer_thread = threading.Thread(target=write_all, name="import-writer")
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            parse = _WarmStart(pool, workers)
            writer_thread.start()
            try:
                if layout.json:
                    for items in _read_json(path, layout, progress):
                        if failure:
                            break
                        in_flight.put(parse(formats.parse_json_items, *common, items))
                else:
                    for block in _read_blocks(path, layout, progress):
                        if failure:
                            break
                        in_flight.put(
                            parse(
                                formats.parse_csv_block,
                                *common,
                                layout.indexes,
                                layout.width,
                                layout.delimiter,
                                block,
                            )
                        )
            finally:
                in_flight.put(None)
                writer_thread.join()
    finally:
        rejects.close()
    if failure:
        raise failure[0]
    report.rejected.sort()
    IMPORT_ROWS.labels("accepted").inc(report.rows - report.rejected_count)
    IMPORT_ROWS.labels("rejected").inc(report.rejected_count)
    IMPORT_EVENTS.inc(report.events_appended)
    logger.info(
        "imported %s (%s) into tenant %s: %d rows, %d events appended, %d already present, "
        "%d superseded rows, %d rejected",
        path,
        layout.format.name,
        tenant_id,
        report.rows,
        report.events_appended,
        report.events_already_present,
        report.versions_superseded,
        report.rejected_count,
    )
    return report


class _WarmStart:
    """A parser of blocks that hands them to the pool once a worker process runs, and parses
    them in the calling thread until then.

    A spawned worker imports its modules before it parses anything, about half a second
    in which the writer would have nothing to copy. The first blocks are parsed here in
    the meantime, so the COPY starts at once. Every worker is started at the outset.
    """

    def __init__(self, pool: ProcessPoolExecutor, workers: int) -> None:
        self.pool = pool
        # One empty task per worker: each submit starts a process, as none is idle yet.
        self._started = [pool.submit(os.getpid) for _ in range(workers)]
        self._warm = False

    def __call__(self, function: Callable[..., ParsedChunk], *args: Any) -> Future[ParsedChunk]:
        if self._warm or any(started.done() for started in self._started):
            self._warm = True
            return self.pool.submit(function, *args)
        parsed: Future[ParsedChunk] = Future()
        try:
            parsed.set_result(function(*args))
        except Exception as error:  # noqa: BLE001 - raised by the writer, as a worker's is
            parsed.set_exception(error)
        return parsed


def import_boston(
    conn: psycopg.Connection[Any],
    path: Path,
    *,
    tenant_id: str,
    time_zone: str,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
    rejects_path: Path | None = None,
) -> ImportReport:
    """Import a Boston 311 export (.csv or .csv.gz) into `tenant_id`; see `import_file`."""
    return import_file(
        conn,
        path,
        tenant_id=tenant_id,
        time_zone=time_zone,
        format_name="boston",
        workers=workers,
        progress=progress,
        rejects_path=rejects_path,
    )


@dataclass
class _StreamState:
    """A stream's state as the writer tracks it within one chunk: whether its latest status
    event closed it, and the latest snapshot time its events record."""

    closed: bool = False
    updated_at: str | None = None


class CopyWriter:
    """Appends parsed chunks with COPY, one transaction per chunk.

    The fast path streams a worker's COPY text unchanged. Cases whose stream exists already
    (a re-import, a later export, or the same request twice) take the slow path: events
    already stored are dropped, a row older than the stream's latest snapshot is skipped,
    a row that lists a closed request as open again reopens it, and the rest are
    renumbered and rehashed after the stream's head.
    """

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        tenant_id: str,
        rejects: RejectsFile | None = None,
        *,
        row_offset: int = 1,
    ) -> None:
        self.conn = conn
        self.tenant_id = tenant_id
        self.rejects = rejects or RejectsFile(None)
        # Workers number rows within their block; blocks arrive here in file order, so the
        # file's row number is this offset plus the block's.
        self.row_offset = row_offset

    def write(self, chunk: ParsedChunk, report: ImportReport) -> None:
        offset = self.row_offset
        self.row_offset += chunk.records
        report.rows += chunk.records
        report.cases += len(chunk.cases)
        rejected = [(offset + number, reason) for number, reason in chunk.rejects]
        if not chunk.cases:
            self._reject(rejected, report)
            return
        # A concurrent import of the same cases can create one of these streams between our
        # check and our COPY; the unique index stops it and the chunk is retried.
        for attempt in range(1, 4):
            try:
                with self.conn.transaction():
                    outcome = self._write_chunk(chunk)
            except pg_errors.UniqueViolation as error:
                logger.warning(
                    "import chunk for tenant %s collided with a concurrent append "
                    "(attempt %d of 3): %s",
                    self.tenant_id,
                    attempt,
                    error,
                )
                continue
            report.events_appended += outcome.appended
            report.events_already_present += outcome.present
            report.versions_superseded += outcome.superseded
            rejected.extend((offset + number, reason) for number, reason in outcome.rejected)
            self._reject(sorted(rejected), report)
            return
        raise ImportFileError(
            f"import into tenant {self.tenant_id} collided with concurrent appends three "
            "times; run it again"
        )

    def _reject(self, rejected: list[tuple[int, str]], report: ImportReport) -> None:
        report.add_rejects(rejected)
        self.rejects.write(rejected)

    def _write_chunk(self, chunk: ParsedChunk) -> _Outcome:
        stream_ids = [case.stream_id for case in chunk.cases]
        unique = len(set(stream_ids)) == len(stream_ids)
        if unique:
            # Most chunks of an import create streams that do not exist yet. Copy them
            # without looking their heads up first: if one exists, a unique index rejects
            # the COPY, the savepoint undoes it, and the chunk takes the checked path.
            try:
                with self.conn.transaction():
                    return _Outcome(appended=self._copy(chunk.events_copy, chunk.streams_copy))
            except pg_errors.UniqueViolation:
                pass
        heads = {
            row[0]: (row[1], row[2], bytes(row[3]) if row[3] is not None else None)
            for row in self.conn.execute(
                "SELECT stream_id, tenant_id, version, head_hash FROM streams "
                "WHERE stream_id = ANY(%s) FOR UPDATE",
                (stream_ids,),
            )
        }
        if not heads and unique:
            return _Outcome(appended=self._copy(chunk.events_copy, chunk.streams_copy))
        return self._write_slow(chunk, heads)

    def _copy(self, events_copy: bytes, streams_copy: bytes) -> int:
        """Copy binary events rows and text stream heads, and return how many events it
        appended."""
        with self.conn.cursor() as cur:
            with cur.copy(f"COPY events ({EVENT_COPY_COLUMNS}) FROM STDIN (FORMAT binary)") as copy:
                # psycopg ends the data with the trailer.
                copy.write(BINARY_SIGNATURE)
                copy.write(events_copy)
            appended = cur.rowcount
            with cur.copy(
                "COPY streams (stream_id, tenant_id, version, head_hash) FROM STDIN"
            ) as copy:
                copy.write(streams_copy)
        return appended

    def _stored_history(self, stream_ids: list[str]) -> tuple[set[str], dict[str, _StreamState]]:
        """Return the ids of the events stored in these streams, and each stream's state."""
        known_ids: set[str] = set()
        states: dict[str, _StreamState] = {}
        rows = self.conn.execute(
            "SELECT stream_id, event_id, event_type, payload->>'source_updated_at' "
            "FROM events WHERE tenant_id = %s AND stream_id = ANY(%s) "
            "ORDER BY stream_id, stream_version",
            (self.tenant_id, stream_ids),
        )
        for stream_id, event_id, event_type, updated_at in rows:
            known_ids.add(str(event_id))
            state = states.setdefault(stream_id, _StreamState())
            if event_type in _CLOSING:
                state.closed = True
            elif event_type in _OPENING:
                state.closed = False
            if updated_at is not None and (
                state.updated_at is None or updated_at > state.updated_at
            ):
                state.updated_at = updated_at
        return known_ids, states

    def _write_slow(
        self, chunk: ParsedChunk, heads: dict[str, tuple[str, int, bytes | None]]
    ) -> _Outcome:
        known_ids: set[str] = set()
        states: dict[str, _StreamState] = {}
        if heads:
            known_ids, states = self._stored_history(list(heads))
        outcome = _Outcome()
        fast_parts: list[bytes] = []
        fast_heads: list[ParsedCase] = []
        slow_rows: list[bytes] = []
        moved: dict[str, tuple[int, bytes]] = {}
        # COPY rows of streams first created in this chunk, whose event ids are read only
        # when the same stream comes again.
        created: dict[str, bytes] = {}
        for case in chunk.cases:
            raw = chunk.events_copy[case.start : case.end]
            if case.stream_id not in heads and case.stream_id not in moved:
                fast_parts.append(raw)
                fast_heads.append(case)
                created[case.stream_id] = raw
                moved[case.stream_id] = (case.version, case.head_hash)
                states[case.stream_id] = _StreamState(bool(case.closed), case.updated_at)
                continue
            if (first := created.pop(case.stream_id, None)) is not None:
                known_ids.update(
                    EventLine.decode_binary(row).event_id for row in binary_rows(first)
                )
            owner = heads[case.stream_id][0] if case.stream_id in heads else self.tenant_id
            if owner != self.tenant_id:
                outcome.rejected.append(
                    (case.row_number, f"stream {case.stream_id} belongs to another tenant")
                )
                continue
            state = states.setdefault(case.stream_id, _StreamState())
            if case.updated_at and state.updated_at and case.updated_at < state.updated_at:
                outcome.superseded += 1
                continue
            events = [EventLine.decode_binary(row) for row in binary_rows(raw)]
            reopens = case.closed is False and state.closed and case.reopen_line is not None
            if reopens:
                assert case.reopen_line is not None
                # After ReportSubmitted, which the stream has, and before any WorkStarted.
                events.insert(1, EventLine.decode_binary(case.reopen_line))
            version, head_hash = moved.get(case.stream_id) or heads[case.stream_id][1:]
            for event in events:
                if event.event_id in known_ids:
                    outcome.present += 1
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
                slow_rows.append(
                    replace(event, stream_version=version, hash=head_hash).encode_binary()
                )
            if head_hash is not None:
                moved[case.stream_id] = (version, head_hash)
            if case.closed:
                state.closed = True
            elif reopens:
                state.closed = False
            if case.updated_at and (state.updated_at is None or case.updated_at > state.updated_at):
                state.updated_at = case.updated_at

        # Streams first created in this chunk get their final head, after any repeats.
        streams_copy = "".join(
            f"{case.stream_id}\t{self.tenant_id}\t{moved[case.stream_id][0]}\t"
            f"\\\\x{moved[case.stream_id][1].hex()}\n"
            for case in fast_heads
        ).encode()
        events_copy = b"".join(fast_parts) + b"".join(slow_rows)
        outcome.appended = self._copy(events_copy, streams_copy) if events_copy else 0
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
        return outcome


@dataclass
class _Outcome:
    """Counts and rejects of one chunk's write."""

    appended: int = 0
    present: int = 0
    superseded: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)
