"""Projection catch-up benchmark: each projection's rate against the raw rate of reading the
same events, measured side by side in one run.

    python bench/projection_catchup.py [--file PATH] [--copies N] [--batch-size N]
                                       [--database NAME] [--keep] [--only NAME ...]

Fills a fresh database with the Boston export imported N times (default 5, about 1.1
million events), each copy into a tenant of its own whose grouping settings mark Boston's
default point as a placeholder. Then, with the same batch size:

- raw read: reads every event below the transaction horizon and decodes it into
  RecordedEvent objects, as the projector does, but applies nothing. It runs twice, once
  batch after batch and once with the projector's read-ahead (the next batch read on a
  second connection), before and after the projections. The faster of the two means is
  the reference;
- each projection of `default_projections()`, from an empty read model and checkpoint,
  through `catch_up`, which reads (with read-ahead), applies and checkpoints batch by
  batch.

It prints events per second for each and each projection's ratio to the raw read rate,
and the CPU seconds this process spent on each (the database server's work is not in
them, so they move less with other load on the machine than the wall-clock rates). The
targets are 30,000 events per second and a ratio of 0.3. `--database NAME` reuses a
database filled by an earlier run with `--keep`, and `--only NAME` measures only the named
projections. DATABASE_URL selects the server; without it an embedded server is started.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._boston import DEFAULT_FILE, boston_database, release  # noqa: E402
from bench._databases import server  # noqa: E402
from ledger.database import Database  # noqa: E402
from ledger.store import Checkpoint, read_after  # noqa: E402
from projections.runtime import ReadAhead, catch_up, default_projections  # noqa: E402

TARGET_RATE = 30_000
TARGET_RATIO = 0.3


def raw_read(database: Database, batch_size: int, *, ahead: bool) -> tuple[int, float]:
    """Read and decode every event in batches, as a projector does; return count and seconds.

    With `ahead`, the next batch is read on a second connection while the current one is
    taken, as the projector's read-ahead does during a catch-up.
    """
    count = 0
    started = time.perf_counter()
    with (
        database.connect_worker() as conn,
        ReadAhead(database, "raw-read", batch_size) as read_ahead,
    ):
        checkpoint = Checkpoint()
        while True:
            with conn.transaction():
                if ahead:
                    events = read_ahead.next_batch(conn, checkpoint)
                else:
                    events = read_after(conn, checkpoint, batch_size)
            if not events:
                break
            count += len(events)
            checkpoint = Checkpoint(events[-1].tx_id, events[-1].position)
    return count, time.perf_counter() - started


def read_raw(database: Database, batch_size: int, rates: dict[str, list[float]], when: str) -> None:
    """Time both raw reads, add their rates to `rates` and print them."""
    for kind in rates:
        count, seconds = raw_read(database, batch_size, ahead=kind == "read-ahead")
        rates[kind].append(count / seconds)
        print(f"raw read {when}, {kind}: {count:,} events in {seconds:.1f} s", flush=True)


def reset(database: Database) -> None:
    """Empty every read model and checkpoint, so each projection starts from nothing."""
    with database.connect_owner() as conn:
        for projection in default_projections():
            for table in projection.tables:
                conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(table)))
        conn.execute("DELETE FROM projection_checkpoints")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--copies", type=int, default=5, help="imports of the file (tenants)")
    parser.add_argument("--batch-size", type=int, default=2000, help="events per batch")
    parser.add_argument("--database", help="reuse this database, filled by a run with --keep")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="measure only this projection (repeatable; default: every projection)",
    )
    args = parser.parse_args()
    projections = default_projections()
    if args.only:
        unknown = sorted(set(args.only) - {projection.name for projection in projections})
        if unknown:
            parser.error(
                f"unknown projection {', '.join(unknown)}: choose from "
                + ", ".join(projection.name for projection in projections)
            )
        projections = [projection for projection in projections if projection.name in args.only]

    conninfo = server()
    name, database = boston_database(
        conninfo, name=args.database, path=args.file, copies=args.copies
    )
    try:
        reset(database)
        # Each raw read, serial and with read-ahead, runs before and after the projections,
        # and the mean of its two rates is its reference.
        raw_rates: dict[str, list[float]] = {"serial": [], "read-ahead": []}
        read_raw(database, args.batch_size, raw_rates, "before")
        rates = {}
        cpu_seconds = {}
        for projection in projections:
            started = time.perf_counter()
            cpu_started = time.process_time()
            applied, _ = catch_up(database, [projection], batch_size=args.batch_size)
            seconds = time.perf_counter() - started
            cpu_seconds[projection.name] = time.process_time() - cpu_started
            rates[projection.name] = applied / seconds
            print(
                f"{projection.name}: {applied:,} events in {seconds:.1f} s "
                f"({cpu_seconds[projection.name]:.1f} s of this process's CPU)",
                flush=True,
            )
        read_raw(database, args.batch_size, raw_rates, "again")
        means = {kind: statistics.mean(found) for kind, found in raw_rates.items()}
        # The faster raw read is the reference, so the ratio is not flattered by a slow one.
        raw_rate = max(means.values())
        print(
            f"\nbatch size {args.batch_size}; raw read {means['serial']:,.0f} events/s serial, "
            f"{means['read-ahead']:,.0f} with read-ahead (means of two); reference {raw_rate:,.0f}"
        )
        print(f"{'projection':<12} {'events/s':>10} {'ratio':>7} {'CPU s':>7}  target")
        for projection_name, rate in rates.items():
            ratio = rate / raw_rate
            met = rate >= TARGET_RATE and ratio >= TARGET_RATIO
            print(
                f"{projection_name:<12} {rate:>10,.0f} {ratio:>7.2f} "
                f"{cpu_seconds[projection_name]:>7.1f}  "
                f"{'met' if met else 'missed'} ({TARGET_RATE:,}/s and {TARGET_RATIO})"
            )
    finally:
        release(conninfo, name, keep=args.keep or bool(args.database))


if __name__ == "__main__":
    main()
