"""Rebuild the read models of the Boston import on 1 and N workers, beside streaming.

Prints, per projection: the streaming projector's time to fold the whole log from an empty
table, the rebuild's time on 1 and on N worker processes, how long each rebuild's swap held
the apply lock (the time streaming batches wait), and the slowest reader query seen while
the rebuild ran (readers are not blocked by the swap, so this stays near a normal query).

    .venv/bin/python bench/rebuild_swap.py --workers 2
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._databases import drop, fresh_database, server  # noqa: E402
from ledger.database import Database, set_tenant  # noqa: E402
from ledger.imports.pipeline import import_boston  # noqa: E402
from projections.runtime import catch_up, projection_named  # noqa: E402
from replay.rebuild import RebuildReport, rebuild  # noqa: E402

DEFAULT_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "boston311_2015.csv.gz"


def stream_from_scratch(database: Database, name: str) -> float:
    """Empty the projection's table and checkpoint, then time a streaming catch-up."""
    projection = projection_named(name)
    with database.connect_owner() as conn:
        for table in projection.tables:
            conn.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(table)))
        conn.execute("DELETE FROM projection_checkpoints WHERE projection = %s", (name,))
        conn.commit()
    started = time.monotonic()
    catch_up(database, [projection], batch_size=5000)
    return time.monotonic() - started


def slowest_read_during(database: Database, table: str, work: threading.Thread) -> float:
    """Run a reader query in a loop while `work` runs; return its slowest run, in seconds."""
    slowest = 0.0
    with database.connect() as conn:
        while work.is_alive():
            started = time.monotonic()
            with conn.transaction():
                set_tenant(conn, "boston")
                conn.execute(
                    sql.SQL("SELECT count(*) FROM {} WHERE tenant_id = 'boston'").format(
                        sql.Identifier(table)
                    )
                ).fetchone()
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.01)
    return slowest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE, help="Boston 311 export")
    parser.add_argument("--workers", type=int, default=2, help="worker processes for run N")
    args = parser.parse_args()

    conninfo = server()
    name, database = fresh_database(conninfo)
    try:
        with database.connect_owner() as conn:
            report = import_boston(
                conn, args.file, tenant_id="boston", time_zone="America/New_York"
            )
        print(f"imported {report.events_appended} events")
        for projection_name in ("incidents", "sla"):
            streaming = stream_from_scratch(database, projection_name)
            print(f"{projection_name}: streaming from scratch {streaming:.1f} s")
            for workers in (1, args.workers):
                outcome: dict[str, RebuildReport] = {}

                projection = projection_named(projection_name)
                work = threading.Thread(
                    target=lambda p=projection, w=workers, o=outcome: o.update(
                        report=rebuild(database, p, workers=w)
                    )
                )
                work.start()
                table = projection.tables[0]
                slowest = slowest_read_during(database, table, work)
                work.join()
                result = outcome["report"]
                print(
                    f"{projection_name}: rebuild on {workers} workers "
                    f"{result.total_seconds:.1f} s (fold {result.fold_seconds:.1f} s, "
                    f"{result.partitions} partitions), "
                    f"apply lock held {result.swap_seconds * 1000:.0f} ms for "
                    f"{result.rows} rows, slowest read meanwhile {slowest * 1000:.0f} ms, "
                    f"streaming / rebuild = {streaming / result.total_seconds:.2f}"
                )
    finally:
        drop(conninfo, name)


if __name__ == "__main__":
    main()
