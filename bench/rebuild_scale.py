"""Rebuild every replayable read model on 1 and on 2 workers over N copies of the Boston log.

    .venv/bin/python bench/rebuild_scale.py --copies 5 [--rounds 1] [--workers 2]
                                            [--mode both] [--database NAME] [--keep]

Fills a fresh database with the Boston 2015 export imported N times, each copy into a
tenant of its own (5 copies: about 1.1 million events). Then, round by round, it rebuilds
on 1 worker and on `--workers` workers, alternating which goes first. `--mode each` rebuilds
each projection of `replayable_projections()` alone (`rebuild`), `--mode together` rebuilds
them all in one call on one process pool (`rebuild_many`, what `civicpulse rebuild` does),
and `both` does each then together. It prints each rebuild's seconds and events per second,
and the speed-up (1-worker seconds over N-worker seconds) per projection and in total. The
target is a speed-up of 1.6 or more on 2 workers. `--database NAME` reuses a database kept
by an earlier run with `--keep`. DATABASE_URL selects the server; without it an embedded
server is started.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._boston import DEFAULT_FILE, boston_database, release  # noqa: E402
from bench._databases import server  # noqa: E402
from projections.runtime import replayable_projections  # noqa: E402
from replay.rebuild import (  # noqa: E402
    MIN_PARTITION_EVENTS,
    RebuildReport,
    rebuild,
    rebuild_many,
)

TARGET_SPEED_UP = 1.6


def load_average() -> str:
    """Return the output of `uptime`, the machine's load when a figure was taken."""
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def describe(report: RebuildReport, folded: int) -> str:
    """Return one line with a rebuild's figures."""
    return (
        f"{report.projection:<10} {report.workers} workers: {report.total_seconds:7.1f} s, "
        f"{folded / report.total_seconds:8,.0f} events/s ({folded:,} events, "
        f"{report.partitions} partitions, folded at {report.fold_seconds:.1f} s, "
        f"swap {report.swap_seconds:.1f} s, worker CPU {report.worker_cpu_seconds:.1f} s)"
    )


def row(label: str, count: int, one: float, many: float, *, verdict: bool = False) -> str:
    """Return a line of the summary table: seconds and events/s on 1 and on N workers."""
    line = (
        f"{label:<12} {count:>10,} {one:>11.1f} {count / one:>9,.0f} "
        f"{many:>12.1f} {count / many:>9,.0f} {one / many:>9.2f}"
    )
    if verdict:
        met = "met" if one / many >= TARGET_SPEED_UP else "missed"
        line += f"  target {TARGET_SPEED_UP}: {met}"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE, help="Boston 311 export")
    parser.add_argument("--copies", type=int, default=5, help="imports of the file (tenants)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="rebuilds of each projection on each worker count"
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes of run N")
    parser.add_argument(
        "--projection",
        action="append",
        help="rebuild only this projection (repeatable); default: every replayable one",
    )
    parser.add_argument(
        "--min-partition-events",
        type=int,
        default=MIN_PARTITION_EVENTS,
        help="split a tenant by stream hash only from twice this many events",
    )
    parser.add_argument(
        "--mode",
        choices=("each", "together", "both"),
        default="both",
        help="rebuild each projection alone, all of them in one call, or both",
    )
    parser.add_argument("--database", help="reuse this database, kept by a run with --keep")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    args = parser.parse_args()
    if args.copies < 1 or args.rounds < 1 or args.workers < 2:
        parser.error("--copies and --rounds must be 1 or more, and --workers 2 or more")

    projections = [
        projection
        for projection in replayable_projections()
        if not args.projection or projection.name in args.projection
    ]
    if not projections:
        names = ", ".join(projection.name for projection in replayable_projections())
        parser.error(f"--projection names none of the replayable projections: {names}")

    print(f"load before: {load_average()}; {os.cpu_count()} CPUs", flush=True)
    conninfo = server()
    name, database = boston_database(
        conninfo, name=args.database, path=args.file, copies=args.copies
    )
    # seconds[projection][workers] contains one figure per round.
    seconds: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    events: dict[str, int] = {}
    # together[workers] contains the seconds of one rebuild_many call per round.
    together: dict[int, list[float]] = defaultdict(list)
    together_events = 0
    try:
        for round_number in range(args.rounds):
            # Alternate the order, so a load that rises or falls during a round is shared.
            order = (1, args.workers) if round_number % 2 == 0 else (args.workers, 1)
            if args.mode in ("each", "both"):
                for projection in projections:
                    for workers in order:
                        report = rebuild(
                            database,
                            projection,
                            workers=workers,
                            min_partition_events=args.min_partition_events,
                        )
                        folded = report.events_folded + report.events_caught_up
                        seconds[projection.name][workers].append(report.total_seconds)
                        events[projection.name] = folded
                        print(f"round {round_number + 1} {describe(report, folded)}", flush=True)
            if args.mode in ("together", "both"):
                for workers in order:
                    started = time.monotonic()
                    reports = rebuild_many(
                        database,
                        projections,
                        workers=workers,
                        min_partition_events=args.min_partition_events,
                    )
                    elapsed = time.monotonic() - started
                    together[workers].append(elapsed)
                    together_events = sum(
                        report.events_folded + report.events_caught_up for report in reports
                    )
                    cpu = sum(report.worker_cpu_seconds for report in reports)
                    print(
                        f"round {round_number + 1} together, {workers} workers: {elapsed:7.1f} s, "
                        f"{together_events / elapsed:8,.0f} events/s, worker CPU {cpu:.1f} s",
                        flush=True,
                    )
                    for report in reports:
                        folded = report.events_folded + report.events_caught_up
                        print(f"    {describe(report, folded)}", flush=True)
            print(f"load after round {round_number + 1}: {load_average()}", flush=True)

        print(f"\nmedians over {args.rounds} round(s), {args.workers} workers against 1")
        print(
            f"{'projection':<12} {'events':>10} {'1 worker s':>11} {'events/s':>9} "
            f"{'N workers s':>12} {'events/s':>9} {'speed-up':>9}"
        )
        if seconds:
            totals = {1: 0.0, args.workers: 0.0}
            total_events = 0
            for projection_name, by_workers in seconds.items():
                single = statistics.median(by_workers[1])
                many = statistics.median(by_workers[args.workers])
                totals[1] += single
                totals[args.workers] += many
                total_events += events[projection_name]
                print(row(projection_name, events[projection_name], single, many))
            print(row("each, sum", total_events, totals[1], totals[args.workers], verdict=True))
        if together:
            single = statistics.median(together[1])
            many = statistics.median(together[args.workers])
            print(row("together", together_events, single, many, verdict=True))
    finally:
        release(conninfo, name, keep=args.keep or bool(args.database))


if __name__ == "__main__":
    main()
