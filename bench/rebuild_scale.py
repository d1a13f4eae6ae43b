"""Rebuild every replayable read model on 1 and on 2 workers over N copies of the Boston log.

    .venv/bin/python bench/rebuild_scale.py --copies 5 [--rounds 1] [--workers 2]
                                            [--database NAME] [--keep]

Fills a fresh database with the Boston 2015 export imported N times, each copy into a
tenant of its own (5 copies: about 1.1 million events). Then, round by round, it rebuilds
each projection of `replayable_projections()` on 1 worker and on `--workers` workers,
alternating which goes first. It prints each rebuild's seconds and events per second, and
the speed-up (1-worker seconds over N-worker seconds) per projection and in total. The
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
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._boston import DEFAULT_FILE, boston_database  # noqa: E402
from bench._databases import drop, server  # noqa: E402
from projections.runtime import replayable_projections  # noqa: E402
from replay.rebuild import MIN_PARTITION_EVENTS, rebuild  # noqa: E402

TARGET_SPEED_UP = 1.6


def load_average() -> str:
    """Return the output of `uptime`, the machine's load when a figure was taken."""
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


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
    try:
        for round_number in range(args.rounds):
            # Alternate the order, so a load that rises or falls during a round is shared.
            order = (1, args.workers) if round_number % 2 == 0 else (args.workers, 1)
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
                    print(
                        f"round {round_number + 1} {projection.name:<10} {workers} workers: "
                        f"{report.total_seconds:7.1f} s, {folded / report.total_seconds:8,.0f} "
                        f"events/s ({folded:,} events, {report.partitions} partitions, "
                        f"fold {report.fold_seconds:.1f} s, swap {report.swap_seconds:.1f} s)",
                        flush=True,
                    )
            print(f"load after round {round_number + 1}: {load_average()}", flush=True)

        print(f"\nmedians over {args.rounds} round(s), {args.workers} workers against 1")
        print(
            f"{'projection':<12} {'events':>10} {'1 worker s':>11} {'events/s':>9} "
            f"{'N workers s':>12} {'events/s':>9} {'speed-up':>9}"
        )
        totals = {1: 0.0, args.workers: 0.0}
        total_events = 0
        for projection_name, by_workers in seconds.items():
            one = statistics.median(by_workers[1])
            many = statistics.median(by_workers[args.workers])
            totals[1] += one
            totals[args.workers] += many
            count = events[projection_name]
            total_events += count
            print(
                f"{projection_name:<12} {count:>10,} {one:>11.1f} {count / one:>9,.0f} "
                f"{many:>12.1f} {count / many:>9,.0f} {one / many:>9.2f}"
            )
        speed_up = totals[1] / totals[args.workers]
        print(
            f"{'all':<12} {total_events:>10,} {totals[1]:>11.1f} "
            f"{total_events / totals[1]:>9,.0f} {totals[args.workers]:>12.1f} "
            f"{total_events / totals[args.workers]:>9,.0f} {speed_up:>9.2f}  "
            f"target {TARGET_SPEED_UP}: {'met' if speed_up >= TARGET_SPEED_UP else 'missed'}"
        )
    finally:
        if args.keep or args.database:
            print(f"kept database {name}")
        else:
            drop(conninfo, name)


if __name__ == "__main__":
    main()
