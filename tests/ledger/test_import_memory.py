"""Resident memory of an import, parser processes included, against the file's size."""

from __future__ import annotations

import contextlib
import csv
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest

from ledger.database import Database
from ledger.imports.pipeline import import_file


def write_nyc_export(path: Path, rows: int) -> None:
    start = datetime(2019, 1, 1)
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(
            ["Unique Key", "Created Date", "Closed Date", "Complaint Type", "Descriptor"]
            + ["Incident Address", "Status", "Resolution Description", "Latitude", "Longitude"]
        )
        for n in range(rows):
            created = start + timedelta(minutes=n)
            closed = n % 3 == 0
            writer.writerow(
                [
                    str(50_000_000 + n),
                    created.strftime("%m/%d/%Y %I:%M:%S %p"),
                    (created + timedelta(hours=5)).strftime("%m/%d/%Y %I:%M:%S %p")
                    if closed
                    else "",
                    "Noise - Residential",
                    "Loud Music/Party",
                    f"{n % 977} BROADWAY",
                    "Closed" if closed else "Open",
                    "The Police Department responded to the complaint. " * 3,
                    "40.7128",
                    "-74.0060",
                ]
            )


def peak_import_memory(database: Database, path: Path) -> tuple[int, int]:
    """Import `path` into a new tenant; return the events appended and the peak of the
    resident memory this process and its children used above this process's memory before."""
    me = psutil.Process()
    baseline = me.memory_info().rss
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    total += process.memory_info().rss
            peak = max(peak, total)
            stop.wait(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with database.connect_owner() as conn:
            report = import_file(
                conn,
                path,
                tenant_id=f"m-{uuid.uuid4().hex[:10]}",
                time_zone="America/New_York",
                workers=2,
                now=datetime(2026, 1, 1, tzinfo=UTC),
            )
    finally:
        stop.set()
        sampler.join()
    return report.events_appended, peak - baseline


@pytest.mark.slow
def test_memory_does_not_grow_with_file(
    fresh_database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ledger.imports.pipeline as pipeline

    # Small blocks, so that both files are many times what the pipeline holds in flight.
    monkeypatch.setattr(pipeline, "BLOCK_BYTES", 64 << 10)
    small, large = tmp_path / "small.csv", tmp_path / "large.csv"
    write_nyc_export(small, 10_000)
    write_nyc_export(large, 60_000)

    # A first import warms this process up (imports, caches, connection buffers).
    peak_import_memory(fresh_database, small)
    small_events, small_peak = peak_import_memory(fresh_database, small)
    large_events, large_peak = peak_import_memory(fresh_database, large)

    # A request in three is closed: two events for those, one for the others.
    assert small_events == 10_000 + 3_334
    assert large_events == 60_000 + 20_000
    assert large.stat().st_size > 5 * small.stat().st_size
    # Six times the rows; the peak may vary by what the sampler catches, not by the rows.
    assert large_peak < small_peak + 40 * 2**20, (small_peak >> 20, large_peak >> 20)
    assert large_peak < 500 * 2**20
