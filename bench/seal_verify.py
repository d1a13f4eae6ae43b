"""Seal and verify benchmark on the Boston export: one tenant of 222,417 events.

Imports the export into a fresh database (no read models), then times:

- the first seal, over every event of the tenant;
- a seal run that finds nothing new;
- `verify` of the whole database, once per round.

    python bench/seal_verify.py [--file PATH] [--rounds N]

DATABASE_URL selects the server (required).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _databases import drop, fresh_database  # noqa: E402

from ledger.database import Database  # noqa: E402
from ledger.imports.pipeline import import_boston  # noqa: E402
from ledger.seals import seal_all, transaction_horizon  # noqa: E402
from ledger.verification import verify  # noqa: E402

DEFAULT_FILE = ROOT.parent / "shared" / "data" / "boston311_2015.csv.gz"
TENANT = "boston"


def timed_import(database: Database, path: Path) -> None:
    started = time.monotonic()
    with database.connect_owner() as conn:
        report = import_boston(conn, path, tenant_id=TENANT, time_zone="America/New_York")
    seconds = time.monotonic() - started
    print(f"import: {report.events_appended} events in {seconds:.1f} s")
    with database.connect_owner(autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE events")


def wait_for_horizon(database: Database) -> None:
    """Wait until the import's transactions are below the horizon, so a seal covers them.
    Other sessions on the same server may keep the horizon back for a while."""
    with database.connect_owner(autocommit=True) as conn:
        row = conn.execute("SELECT tx_id FROM events ORDER BY tx_id DESC LIMIT 1").fetchone()
        assert row is not None
        while transaction_horizon(conn) <= row[0]:
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    server = os.environ.get("DATABASE_URL")
    if not server:
        sys.exit("set DATABASE_URL to the server to run the benchmark on")

    name, database = fresh_database(server)
    try:
        timed_import(database, args.file)
        wait_for_horizon(database)

        started = time.monotonic()
        report = seal_all(database, tenant_id=TENANT)
        [seal] = report.sealed
        print(f"first seal: {seal.event_count} events in {time.monotonic() - started:.2f} s")

        started = time.monotonic()
        report = seal_all(database, tenant_id=TENANT)
        assert report.sealed == []
        print(f"seal run with nothing new: {time.monotonic() - started:.2f} s")

        rounds = []
        for _ in range(args.rounds):
            started = time.monotonic()
            result = verify(database)
            rounds.append(time.monotonic() - started)
            assert result.ok, result.mismatches[:3]
        print(
            f"verify: {result.events} events, {result.streams} streams, {result.seals} seals; "
            f"rounds {', '.join(f'{s:.1f}' for s in rounds)} s, median "
            f"{statistics.median(rounds):.1f} s"
        )
    finally:
        drop(server, name)


if __name__ == "__main__":
    main()
