"""Measure duplicate grouping on the Boston 2015 export: recall on the city's own duplicates,
placeholder handling, and a sample of groups to judge by reading.

    .venv/bin/python bench/grouping_quality.py ../shared/data/boston311_2015.csv.gz \
        --sample 50 --seed 2015 --groups-out /tmp/boston-groups.txt

Creates a database of its own (on DATABASE_URL's server or an embedded one), configures the
tenant's grouping settings with Boston's default point as a placeholder, imports the export,
projects the grouping read model and prints the figures. A case counts as found when it is
closed as a duplicate (its closure reason contains "duplicate") and its group holds a case
opened before it.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import random
import sys
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from psycopg_pool import ConnectionPool  # noqa: E402

from bench._databases import drop, fresh_database, server  # noqa: E402
from ledger.grouping import configure_grouping, distance_m  # noqa: E402
from ledger.imports.boston import case_ids  # noqa: E402
from ledger.imports.pipeline import import_boston  # noqa: E402
from ledger.store import PostgresEventStore  # noqa: E402
from ledger.tenants import create_tenant  # noqa: E402
from projections.grouping import grouping_projection  # noqa: E402
from projections.runtime import catch_up  # noqa: E402

TENANT = "boston"
# The point Boston's 311 system gives cases without a real location (17,070 cases of 2015).
DEFAULT_LATITUDE, DEFAULT_LONGITUDE = 42.3594, -71.0587
BOSTON_DEFAULT_POINT = {"latitude": DEFAULT_LATITUDE, "longitude": DEFAULT_LONGITUDE, "radius_m": 5}


def read_cases(path: Path) -> dict[str, dict[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8", newline="") as source:
        return {row["CASE_ENQUIRY_ID"]: row for row in csv.DictReader(source)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path, help="Boston 311 export (.csv or .csv.gz)")
    parser.add_argument("--sample", type=int, default=50, help="groups to print for reading")
    parser.add_argument("--seed", type=int, default=2015, help="seed of the group sample")
    parser.add_argument("--settings", default="{}", help="grouping settings as JSON")
    parser.add_argument("--groups-out", type=Path, help="file to write the sampled groups to")
    args = parser.parse_args()

    document = {**json.loads(args.settings), "placeholders": [BOSTON_DEFAULT_POINT]}
    cases = read_cases(args.file)
    by_incident = {case_ids(TENANT, case_id)[0]: case_id for case_id in cases}

    conninfo = server()
    name, database = fresh_database(conninfo)
    try:
        with ConnectionPool(database.app_conninfo, min_size=1, max_size=2) as pool:
            store = PostgresEventStore(pool)
            at = datetime(2014, 12, 31, tzinfo=UTC)
            create_tenant(
                store, TENANT, name="Boston", time_zone="America/New_York", occurred_at=at
            )
            settings = configure_grouping(store, TENANT, document, occurred_at=at)
        print("settings:", settings.to_payload())
        with database.connect_owner() as conn:
            import_boston(conn, args.file, tenant_id=TENANT, time_zone="America/New_York")
        started = time.perf_counter()
        applied, _ = catch_up(database, [grouping_projection()], batch_size=2000)
        seconds = time.perf_counter() - started
        print(f"grouping projection: {applied:,} events in {seconds:.1f} s")

        with database.connect_worker() as conn:
            rows = conn.execute(
                "SELECT incident_id::text, group_id::text, submitted_at, latitude, longitude "
                "FROM grouping_reports WHERE tenant_id = %s",
                (TENANT,),
            ).fetchall()
    finally:
        drop(conninfo, name)

    report_figures(rows, cases, by_incident, args)


def report_figures(
    rows: list[tuple[Any, ...]],
    cases: dict[str, dict[str, str]],
    by_incident: dict[str, str],
    args: argparse.Namespace,
) -> None:
    members: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for row in rows:
        members[row[1]].append(row)
    sizes = Counter(len(group) for group in members.values())
    groups = {group_id: group for group_id, group in members.items() if len(group) > 1}
    grouped = sum(len(group) for group in groups.values())
    print(f"reports: {len(rows):,}; groups of two or more: {len(groups):,} holding {grouped:,}")
    print("largest groups:", sorted(sizes, reverse=True)[:10])

    at_default = [
        row
        for row in rows
        if row[3] is not None
        and distance_m(row[3], row[4], DEFAULT_LATITUDE, DEFAULT_LONGITUDE)
        <= BOSTON_DEFAULT_POINT["radius_m"]
    ]
    default_grouped = [row for row in at_default if len(members[row[1]]) > 1]
    print(f"cases at the default point: {len(at_default):,}; in a group: {len(default_grouped)}")

    duplicates = [
        row for row in rows if "duplicate" in cases[by_incident[row[0]]]["CLOSURE_REASON"].lower()
    ]
    found = [row for row in duplicates if any(other[2] < row[2] for other in members[row[1]])]
    in_group = [row for row in duplicates if len(members[row[1]]) > 1]
    default_ids = {row[0] for row in at_default}
    located = [row for row in duplicates if row[3] is not None and row[0] not in default_ids]
    print(
        f"closed as duplicates: {len(duplicates):,}; in a group with an earlier case: "
        f"{len(found):,} (recall {len(found) / len(duplicates):.3f}); in any group: "
        f"{len(in_group):,}; with a real location: {len(located):,} (recall among them "
        f"{len(found) / len(located):.3f})"
    )

    sample = random.Random(args.seed).sample(sorted(groups), min(args.sample, len(groups)))
    lines = []
    for number, group_id in enumerate(sample, start=1):
        group = sorted(groups[group_id], key=lambda row: row[2])
        lines.append(f"## group {number}: {len(group)} cases")
        first = group[0]
        for row in group:
            case = cases[by_incident[row[0]]]
            away = distance_m(first[3], first[4], row[3], row[4])
            lines.append(
                f"  {case['CASE_ENQUIRY_ID']} {case['OPEN_DT']} | {case['TYPE']} | "
                f"{case['CASE_TITLE']} | {case['Location']} | {away:.0f} m | "
                f"{case['CLOSURE_REASON'][:90]}"
            )
    text = "\n".join(lines)
    if args.groups_out:
        args.groups_out.write_text(text + "\n", encoding="utf-8")
        print(f"{len(sample)} sampled groups written to {args.groups_out}")
    else:
        print(text)


if __name__ == "__main__":
    main()
