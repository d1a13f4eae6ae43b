"""Benchmark of the audit indexes that migration 0016 moved off `events`: what each would
cost the Boston import if it were still there.

In each round it imports the Boston export into fresh databases, one per variant, in
turn: with the schema as it is (no audit index on `events`), with all four indexes put
back on `events` as migrations 0005 to 0015 had them, and with each one alone. It prints
the import's events per second for each, and the medians.

    python bench/audit_index_cost.py [--file PATH] [--rounds N]

DATABASE_URL selects the server (required).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ledger.database import Database  # noqa: E402
from ledger.imports.pipeline import import_boston  # noqa: E402
from ledger.schema import migrate  # noqa: E402
from ledger.settings import Settings  # noqa: E402

DEFAULT_FILE = ROOT.parent / "shared" / "data" / "boston311_2015.csv.gz"


def moved_indexes() -> dict[str, str]:
    """Return the indexes migration 0016 dropped from events, name -> definition, read from
    its module."""
    path = ROOT / "migrations" / "versions" / "0016_audit_entries.py"
    spec = importlib.util.spec_from_file_location("audit_entries_migration", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.EVENT_INDEXES)


MOVED = moved_indexes()
# Variant name -> indexes created on events before the import.
VARIANTS = {
    "no audit index on events (now)": [],
    "all four on events (before 0016)": list(MOVED),
    **{f"only {name}": [name] for name in MOVED},
}


def import_rate(server: str, path: Path, created: list[str]) -> float:
    name = f"civicpulse_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        owner = make_conninfo(server, dbname=name)
        settings = Settings(database_url=owner)
        database = Database.for_owner(owner, settings)
        migrate(database, settings)
        with database.connect_owner(autocommit=True) as conn:
            for index in created:
                conn.execute(f"CREATE INDEX {index} ON events {MOVED[index]}")
        with database.connect_owner() as conn:
            started = time.perf_counter()
            report = import_boston(conn, path, tenant_id="boston", time_zone="America/New_York")
            seconds = time.perf_counter() - started
        return report.events_appended / seconds
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    server = os.environ.get("DATABASE_URL")
    if not server:
        raise SystemExit("set DATABASE_URL to the server to measure on")

    rates: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for round_number in range(1, args.rounds + 1):
        for variant, created in VARIANTS.items():
            rate = import_rate(server, args.file, created)
            rates[variant].append(rate)
            print(f"round {round_number} {variant}: {rate:,.0f} events/s", flush=True)
    for variant, values in rates.items():
        print(f"median {variant}: {statistics.median(values):,.0f} events/s")


if __name__ == "__main__":
    main()
