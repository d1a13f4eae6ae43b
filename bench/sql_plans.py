"""Plans of the hot queries on a log of one million events, alone and under writers.

Fills a fresh database with 950,000 events of one tenant and 50,000 of another (streams
of four events), runs each hot query the way the product runs it, and prints each
statement's EXPLAIN (ANALYZE, BUFFERS). Then it starts `--writers` threads that append
events to new streams of the large tenant in transactions of 100 events, and prints the
execution time of every statement again while they write, with the writers' rate.

    python bench/sql_plans.py [--writers N] [--index NAME=DEFINITION ...]

`--index` creates an extra index on events after the fill (for example
`events_audit_occurred="(tenant_id, occurred_at)"`) and prints its size and build time.

DATABASE_URL selects the server; without it an embedded server is started.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _databases import drop, fresh_database, server  # noqa: E402

from ledger.database import Database, set_tenant  # noqa: E402
from ledger.events import NewEvent  # noqa: E402
from ledger.store import PostgresEventStore  # noqa: E402
from tests.ledger import test_sql_plans as plans  # noqa: E402
from tests.ledger.plan_helpers import (  # noqa: E402
    RecordingCursor,
    Statement,
    explain,
    fill_events,
    index_audit_log,
    is_explainable,
    sequential_scans,
    statement_text,
)


def recorded_statements(conn: psycopg.Connection[Any]) -> list[tuple[str, Statement]]:
    conn.cursor_factory = RecordingCursor
    store = PostgresEventStore(None)  # type: ignore[arg-type]
    found = []
    for name, run in plans.hot_queries(conn, store).items():
        RecordingCursor.statements.clear()
        run()
        for statement in list(RecordingCursor.statements):
            text = statement_text(conn, statement)
            if is_explainable(text) and ("events" in text or "incident_sla" in text):
                found.append((name, statement))
    conn.cursor_factory = psycopg.Cursor
    return found


def execution_ms(plan_text: str) -> float:
    for line in plan_text.splitlines():
        if line.startswith("Execution Time:"):
            return float(line.split()[2])
    return float("nan")


def write_load(database: Database, stop: threading.Event, counts: list[int]) -> None:
    with database.connect_owner() as conn:
        store = PostgresEventStore(None)  # type: ignore[arg-type]
        while not stop.is_set():
            with conn.transaction():
                set_tenant(conn, plans.BIG)
                for _ in range(100):
                    store.append(
                        plans.BIG,
                        f"incident-{uuid.uuid4()}",
                        [NewEvent("ReportSubmitted", {"category": "load"}, datetime.now(UTC))],
                        expected_version=0,
                        conn=conn,
                    )
            counts.append(100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--index", action="append", default=[], help="NAME=DEFINITION")
    args = parser.parse_args()

    conninfo = server()
    name, database = fresh_database(conninfo)
    try:
        with database.connect_owner() as conn:
            started = time.perf_counter()
            fill_events(conn, plans.BIG, plans.EVENTS - 50_000)
            fill_events(conn, plans.SMALL, 50_000)
            index_audit_log(database)
            print(f"filled {plans.EVENTS:,} events in {time.perf_counter() - started:.0f} s")
            for spec in args.index:
                index_name, definition = spec.split("=", 1)
                started = time.perf_counter()
                conn.execute(f"CREATE INDEX {index_name} ON events {definition}")
                conn.execute("ANALYZE events")
                conn.commit()
                size = conn.execute("SELECT pg_relation_size(%s::regclass)", (index_name,))
                row = size.fetchone()
                assert row is not None
                print(
                    f"index {index_name} {definition}: built in "
                    f"{time.perf_counter() - started:.1f} s, {row[0] / 2**20:.0f} MiB"
                )
            statements = recorded_statements(conn)
            alone: list[float] = []
            for query_name, statement in statements:
                text = explain(conn, statement, plans.BIG, text=True)
                scans = sequential_scans(explain(conn, statement, plans.BIG))
                alone.append(execution_ms(text))
                print(f"\n=== {query_name}: {statement_text(conn, statement).strip()[:300]}")
                print(f"sequential scans: {scans or 'none'}")
                print(text)

            stop = threading.Event()
            counts: list[int] = []
            writers = [
                threading.Thread(target=write_load, args=(database, stop, counts))
                for _ in range(args.writers)
            ]
            for writer in writers:
                writer.start()
            time.sleep(2)
            began, written = time.perf_counter(), sum(counts)
            print(f"\n=== under {args.writers} writers: execution ms alone -> while writing")
            for (query_name, statement), before in zip(statements, alone, strict=True):
                text = explain(conn, statement, plans.BIG, text=True)
                scans = sequential_scans(explain(conn, statement, plans.BIG))
                print(
                    f"{query_name:<24} {before:9.2f} -> {execution_ms(text):9.2f}  "
                    f"sequential scans: {scans or 'none'}"
                )
            rate = (sum(counts) - written) / (time.perf_counter() - began)
            stop.set()
            for writer in writers:
                writer.join()
            print(f"writers appended {rate:,.0f} events/s meanwhile")
    finally:
        drop(conninfo, name)


if __name__ == "__main__":
    main()
