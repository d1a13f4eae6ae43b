"""Import benchmark: the Boston export through the import pipeline against raw COPYs.

All runs happen in one process on the same server, one after the other, each into a
fresh database:

- raw COPY: the same events, already formatted as COPY text, into a bare table with the
  events table's columns and no keys, indexes, defaults or triggers;
- raw binary COPY: the same events, already in binary COPY format, into the bare table.
  The import writes this format, which spares the server parsing times, ids and hashes;
- raw COPY of Python rows: the same events as Python values (dicts, datetimes, UUIDs),
  formatted by psycopg while they are copied into the bare table, as an application that
  already has its rows in memory would do;
- import: the whole pipeline from the .csv.gz file (reading, parsing in a process pool,
  hashing, binary COPY into the real events table with its indexes, stream heads).

It prints rows or events per second for each and the import's ratio to each raw COPY.
The target (0.5) was set against the first, the raw COPY of text; the binary one is the
strictest reference.

    python bench/import_vs_copy.py [--file PATH] [--workers N] [--rounds N]

DATABASE_URL selects the server; without it an embedded server is started.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import os
import resource
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import psutil
from psycopg import Copy
from psycopg.types.json import Jsonb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _databases import drop, fresh_database, server  # noqa: E402

from ledger.database import Database  # noqa: E402
from ledger.imports import boston  # noqa: E402
from ledger.imports.copytext import BINARY_SIGNATURE, EventLine, binary_rows  # noqa: E402
from ledger.imports.pipeline import import_boston  # noqa: E402

DEFAULT_FILE = ROOT.parent / "shared" / "data" / "boston311_2015.csv.gz"
TIME_ZONE = "America/New_York"

BARE_TABLE = """
CREATE TABLE bare_events (
    tenant_id text, stream_id text, stream_version integer, event_type text,
    schema_version smallint, payload jsonb, metadata jsonb, occurred_at timestamptz,
    event_id uuid, hash bytea
)
"""


def events_of(path: Path) -> list[EventLine]:
    """Parse the file's events as the import does, before any timing starts."""
    with gzip.open(path, "rt", encoding="utf-8-sig", newline="") as text:
        reader = csv.reader(text)
        indexes = boston.column_indexes(next(reader))
        rows = [(n, [v[i] if i >= 0 else "" for i in indexes]) for n, v in enumerate(reader, 2)]
    copied = boston.parse_chunk("bench", TIME_ZONE, path.name, rows).events_copy
    return [EventLine.decode_binary(row) for row in binary_rows(copied)]


def timed_copy(
    database: Database, write: Callable[[Copy], None], *, binary: bool = False
) -> tuple[int, float]:
    """Create the bare table, then time one COPY into it; return rows and seconds."""
    with database.connect_owner() as conn:
        conn.execute(BARE_TABLE)
        conn.commit()
        started = time.perf_counter()
        with conn.cursor() as cur:
            with cur.copy(
                "COPY bare_events (tenant_id, stream_id, stream_version, event_type, "
                "schema_version, payload, metadata, occurred_at, event_id, hash) FROM STDIN"
                + (" (FORMAT binary)" if binary else "")
            ) as copy:
                write(copy)
            rows = cur.rowcount
        conn.commit()
        return rows, time.perf_counter() - started


def raw_copy(database: Database, events_copy: bytes) -> tuple[int, float]:
    return timed_copy(database, lambda copy: copy.write(events_copy))


def raw_binary_copy(database: Database, events_copy: bytes) -> tuple[int, float]:
    def write(copy: Copy) -> None:
        copy.write(BINARY_SIGNATURE)
        copy.write(events_copy)

    return timed_copy(database, write, binary=True)


def row_tuples(events: list[EventLine]) -> list[tuple[Any, ...]]:
    """Return the events as Python values, as an application has rows before a COPY."""
    rows = []
    for event in events:
        rows.append(
            (
                event.tenant_id,
                event.stream_id,
                event.stream_version,
                event.event_type,
                event.schema_version,
                Jsonb(orjson.loads(event.payload_json)),
                Jsonb(orjson.loads(event.metadata_json)),
                event.occurred_at,
                uuid.UUID(event.event_id),
                event.hash,
            )
        )
    return rows


def raw_copy_rows(database: Database, rows: list[tuple[Any, ...]]) -> tuple[int, float]:
    """COPY the rows into the bare table, formatted by psycopg as they are written."""

    def write(copy: Copy) -> None:
        for row in rows:
            copy.write_row(row)

    return timed_copy(database, write)


def cpu_seconds(process_group: int) -> float:
    usage = resource.getrusage(process_group)
    return usage.ru_utime + usage.ru_stime


def machine_busy_seconds() -> float:
    """Return the CPU time the whole machine has spent busy, over all CPUs."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def pipeline_import(database: Database, path: Path, workers: int | None) -> tuple[int, float]:
    with database.connect_owner() as conn:
        own, busy = cpu_seconds(resource.RUSAGE_SELF), machine_busy_seconds()
        started = time.perf_counter()
        report = import_boston(conn, path, tenant_id="bench", time_zone=TIME_ZONE, workers=workers)
        elapsed = time.perf_counter() - started
        # The parsers are children of a fork server, which this process does not reap, so
        # their CPU time shows only in the machine's.
        print(
            f"  CPU: reader and writer {cpu_seconds(resource.RUSAGE_SELF) - own:.1f} s, "
            f"machine {machine_busy_seconds() - busy:.1f} s of {os.cpu_count()} x "
            f"{elapsed:.1f} s (parsers, server and anything else running)"
        )
    if report.rejected:
        print(f"  {len(report.rejected)} rows rejected", file=sys.stderr)
    return report.events_appended, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--workers", type=int, default=None, help="parser processes")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each, alternating")
    args = parser.parse_args()

    conninfo = server()
    print(f"file: {args.file}")
    print(f"cpus: {os.cpu_count()}, workers: {args.workers or os.cpu_count()}")
    events = events_of(args.file)
    copy_text = "".join(event.encode() for event in events).encode()
    copy_binary = b"".join(event.encode_binary() for event in events)
    tuples = row_tuples(events)

    # Each run loads into a fresh database and returns what it loaded and its seconds.
    runs: dict[str, Callable[[Database], tuple[int, float]]] = {
        "raw COPY": lambda database: raw_copy(database, copy_text),
        "raw binary COPY": lambda database: raw_binary_copy(database, copy_binary),
        "raw COPY of Python rows": lambda database: raw_copy_rows(database, tuples),
        "import": lambda database: pipeline_import(database, args.file, args.workers),
    }
    rates: dict[str, list[float]] = {label: [] for label in runs}
    for round_number in range(1, args.rounds + 1):
        for label, run in runs.items():
            name, database = fresh_database(conninfo)
            try:
                count, seconds = run(database)
            finally:
                drop(conninfo, name)
            rates[label].append(count / seconds)
            unit = "events" if label == "import" else "rows"
            print(
                f"round {round_number} {label}: {count} {unit} in {seconds:.2f} s, "
                f"{count / seconds:,.0f} {unit}/s"
            )

    medians = {label: statistics.median(values) for label, values in rates.items()}
    for label, median in medians.items():
        unit = "events" if label == "import" else "rows"
        print(f"median {label + ':':<32} {median:,.0f} {unit}/s")
    imported = medians.pop("import")
    for label, median in medians.items():
        target = "  (the target is 0.5)" if label == "raw COPY" else ""
        print(f"ratio import / {label}: {imported / median:.2f}{target}")


if __name__ == "__main__":
    main()
