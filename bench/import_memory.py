"""Import memory benchmark: peak resident memory of an import, children included.

Generates an NYC 311 export (display headers, times as "MM/DD/YYYY hh:mm:ss AM", about a
third of the requests closed, one in fifty listed twice) of `--rows` rows and of a tenth of
that, imports each into a fresh database, and prints, for each, the time, events per
second and the peak of the summed resident memory of the importing process and its parser
processes, sampled every 50 ms. The server's memory is not counted.

    python bench/import_memory.py [--rows N] [--workers N] [--dir PATH]

DATABASE_URL selects the server; without it an embedded server is started.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import random
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _databases import drop, fresh_database, server  # noqa: E402

from ledger.imports.pipeline import import_file  # noqa: E402

HEADER = [
    "Unique Key",
    "Created Date",
    "Closed Date",
    "Agency",
    "Agency Name",
    "Complaint Type",
    "Descriptor",
    "Location Type",
    "Incident Zip",
    "Incident Address",
    "City",
    "Status",
    "Due Date",
    "Resolution Description",
    "Resolution Action Updated Date",
    "Borough",
    "Open Data Channel Type",
    "Latitude",
    "Longitude",
]
COMPLAINTS = [
    ("DOT", "Street Condition", "Pothole"),
    ("NYPD", "Noise - Residential", "Loud Music/Party"),
    ("DSNY", "Dirty Conditions", "Trash"),
    ("HPD", "HEAT/HOT WATER", "ENTIRE BUILDING"),
    ("DEP", "Water System", "Hydrant Running"),
]
BOROUGHS = ["MANHATTAN", "BROOKLYN", "QUEENS", "BRONX", "STATEN ISLAND"]


def us_time(moment: datetime) -> str:
    return moment.strftime("%m/%d/%Y %I:%M:%S %p")


def write_export(path: Path, rows: int, seed: int = 311) -> None:
    """Write an NYC-style export of `rows` rows (a repeated request counts as a row)."""
    rng = random.Random(seed)
    start = datetime(2019, 1, 1)
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(HEADER)
        written = 0
        key = 40_000_000
        while written < rows:
            key += 1
            agency, complaint, descriptor = rng.choice(COMPLAINTS)
            created = start + timedelta(seconds=key % 31_000_000)
            closed = created + timedelta(hours=rng.randint(1, 400))
            is_closed = rng.random() < 0.35
            row = [
                str(key),
                us_time(created),
                us_time(closed) if is_closed else "",
                agency,
                f"Agency {agency}",
                complaint,
                descriptor,
                "Street",
                str(10000 + key % 400),
                f"{key % 900} BROADWAY",
                "NEW YORK",
                "Closed" if is_closed else "Open",
                us_time(created + timedelta(days=10)),
                "The agency resolved the complaint." if is_closed else "N/A",
                us_time(closed if is_closed else created),
                rng.choice(BOROUGHS),
                rng.choice(["PHONE", "ONLINE", "MOBILE", "UNKNOWN"]),
                f"{40.5 + rng.random() * 0.4:.6f}",
                f"{-74.2 + rng.random() * 0.5:.6f}",
            ]
            writer.writerow(row)
            written += 1
            if written < rows and rng.random() < 0.02:
                # A later snapshot of the same request, now closed.
                row[2] = row[14] = us_time(closed)
                row[11] = "Closed"
                writer.writerow(row)
                written += 1


class PeakMemory:
    """Samples the summed resident memory of this process and its descendants."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    total += process.memory_info().rss
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run(conninfo: str, path: Path, workers: int | None) -> None:
    name, database = fresh_database(conninfo)
    try:
        with database.connect_owner() as conn, PeakMemory() as memory:
            started = time.perf_counter()
            report = import_file(
                conn,
                path,
                tenant_id="bench",
                time_zone="America/New_York",
                workers=workers,
                now=datetime(2026, 1, 1, tzinfo=UTC),
            )
            seconds = time.perf_counter() - started
    finally:
        drop(conninfo, name)
    print(
        f"{report.rows:>9,} rows ({path.stat().st_size / 2**20:,.0f} MiB): "
        f"{report.events_appended:,} events in {seconds:.1f} s, "
        f"{report.events_appended / seconds:,.0f} events/s, "
        f"{report.versions_superseded} superseded, {report.rejected_count} rejected; "
        f"peak RSS {memory.peak / 2**20:,.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=None, help="parser processes")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the exports")
    args = parser.parse_args()

    conninfo = server()
    print(f"cpus: {os.cpu_count()}, workers: {args.workers or os.cpu_count()}")
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        for rows in (args.rows // 10, args.rows):
            path = Path(directory) / f"nyc-{rows}.csv"
            write_export(path, rows)
            run(conninfo, path, args.workers)
            path.unlink()


if __name__ == "__main__":
    main()
