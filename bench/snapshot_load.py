"""Cost of loading one snapshot, in the column format and as a list of records, in one run.

    .venv/bin/python bench/snapshot_load.py --database NAME [--tenant boston-1]
                                            [--projection sla] [--repeat 5]

Reads a database kept by `time_travel.py --keep` (or `rebuild_scale.py --keep`) that has
snapshots of the tenant. It times, each `--repeat` times, and prints the medians of:

1. `nearest_snapshot` of the tenant's newest snapshot, as stored;
2. a replay as of now from it, and one without snapshots, whose states must be equal;
3. `nearest_snapshot` of the same rows rewritten as a list of records (the first
   snapshot format), in a transaction that is rolled back.

DATABASE_URL selects the server; without it an embedded server is started.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
import psycopg
from psycopg.conninfo import make_conninfo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._databases import server  # noqa: E402
from bench.rebuild_scale import load_average  # noqa: E402
from ledger.database import Database  # noqa: E402
from ledger.settings import Settings  # noqa: E402
from projections.runtime import projection_named  # noqa: E402
from replay.snapshots import LoadedSnapshot, nearest_snapshot  # noqa: E402
from replay.time_travel import replay  # noqa: E402

Result = TypeVar("Result")


def median_seconds(run: Callable[[], Result], repeat: int) -> tuple[float, Result]:
    """Run `run` `repeat` times and return the median seconds and the last result."""
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = run()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), result


def load_newest(conn: psycopg.Connection[Any], projection: Any, tenant: str) -> LoadedSnapshot:
    loaded = nearest_snapshot(conn, projection, tenant, as_of=None, known_at=None)
    if loaded is None:
        raise SystemExit(
            f"tenant {tenant} has no readable {projection.name} snapshot: keep a database "
            "of bench/time_travel.py with --keep and pass its name"
        )
    return loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", required=True, help="database kept by time_travel.py")
    parser.add_argument("--tenant", default="boston-1", help="tenant whose snapshot to load")
    parser.add_argument("--projection", default="sla", help="replayable projection")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each kind")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat {args.repeat}: give 1 or more")
    projection = projection_named(args.projection, replayable=True)
    owner = make_conninfo(server(), dbname=args.database)
    database = Database.for_owner(owner, Settings(database_url=owner))

    print(f"load before: {load_average()}", flush=True)
    with database.connect_owner() as conn:
        columns, loaded = median_seconds(
            lambda: load_newest(conn, projection, args.tenant), args.repeat
        )
        print(
            f"snapshot {loaded.info.snapshot_id}: {len(loaded.states):,} rows, "
            f"{loaded.info.compressed_bytes:,} bytes compressed"
        )
        from_snapshot, replayed = median_seconds(
            lambda: replay(conn, projection, args.tenant), args.repeat
        )
        from_nothing, full = median_seconds(
            lambda: replay(conn, projection, args.tenant, use_snapshots=False), args.repeat
        )
        if replayed.states != full.states:
            raise SystemExit("the replay from the snapshot returned other states than without")
        with conn.transaction():
            raw = orjson.dumps(projection.to_records(loaded.states), option=orjson.OPT_SORT_KEYS)
            conn.execute(
                "UPDATE projection_snapshots SET content = %s, sha256 = %s "
                "WHERE tenant_id = %s AND projection = %s AND snapshot_id = %s",
                (
                    zlib.compress(raw, 6),
                    hashlib.sha256(raw).digest(),
                    args.tenant,
                    projection.name,
                    loaded.info.snapshot_id,
                ),
            )
            records, old = median_seconds(
                lambda: load_newest(conn, projection, args.tenant), args.repeat
            )
            if old.states != loaded.states:
                raise SystemExit("the list of records read back other states than the columns")
            raise psycopg.Rollback()
    print(f"load after: {load_average()}")
    print(f"\nmedians of {args.repeat} runs")
    print(f"load, column format:         {columns:.3f} s")
    print(f"load, list of records:       {records:.3f} s ({records / columns:.1f} x the columns)")
    print(
        f"replay as of now, snapshot:  {from_snapshot:.3f} s, "
        f"{replayed.events_folded:,} events folded"
    )
    print(f"replay as of now, none:      {from_nothing:.3f} s, {full.events_folded:,} events")
    print(f"ratio snapshot / none:       {from_snapshot / from_nothing:.3f}")


if __name__ == "__main__":
    main()
