"""Time-travel latency with and without snapshots, against a full replay, in one run.

    .venv/bin/python bench/time_travel.py --copies 5 [--projection sla] [--rounds 20]
                                          [--snapshots 10] [--database NAME] [--keep]

Fills a fresh database with the Boston 2015 export imported N times, each copy into a
tenant of its own (or reuses one kept by `rebuild_scale.py --keep` or by this script).
For one tenant and one projection it then:

1. streams the projection from an empty model and checkpoint. Each time the checkpoint
   passes another 1/K of the tenant's events, it takes a snapshot of the tenant the way
   the scheduler's snapshot job does (`take_snapshot` on the live model at its
   checkpoint). So K snapshots sit at evenly spaced positions of the tenant's log. Only
   the events up to the tenant's last one are streamed;
2. runs R rounds. Each round picks a random valid time, between the first and last
   `occurred_at` of the tenant's incident events, and a random transaction time, between
   their first and last `recorded_at`. In a random order, it times `replay` as of the one
   and as known at the other, each with the snapshots present and with none, and a full
   replay as of now. The replays without snapshots run in a transaction that deletes the
   tenant's snapshots and is rolled back afterwards. The answers with and without
   snapshots are compared, because snapshots must change no answer.

For the `sla` projection each round also times the SLA summary as of the random valid
time, as `GET /tenants/{t}/sla/summary?as_of=T` computes it: from the live rows and, for
the incidents with events on both sides of T, their row versions (docs/replay.md), and
checks it against the summary of the full fold as of T. It also times the
summary as known at the random transaction time, as `?known_at=T` computes it: from the
rows known by T, with only the incidents changed after T folded again. That result is
checked against the summary of the full fold as known at T.

It prints the median and 95th percentile of each kind and their ratio to the full replay.
Targets: the snapshot path at 1/50 of a full replay or less, and under 200 ms at the 95th
percentile. `--profile` adds a cProfile of one snapshot-path replay at a random time of each axis.
DATABASE_URL selects the server; without it an embedded server is started.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import statistics
import sys
import time
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._boston import DEFAULT_FILE, boston_database, release  # noqa: E402
from bench._databases import server  # noqa: E402
from bench.rebuild_scale import load_average  # noqa: E402
from ledger.database import Database  # noqa: E402
from ledger.store import Checkpoint  # noqa: E402
from projections.base import Projection  # noqa: E402
from projections.runtime import load_checkpoint, project_batch, projection_named  # noqa: E402
from projections.sla_queries import (  # noqa: E402
    sla_summary,
    sla_summary_known_at,
    summarize_states,
)
from replay.snapshots import take_snapshot  # noqa: E402
from replay.time_travel import Replayed, replay  # noqa: E402

TARGET_RATIO = 1 / 50
TARGET_P95_SECONDS = 0.2
KINDS = ("as_of, snapshots", "as_of, none", "known_at, snapshots", "known_at, none")
# What GET /tenants/{t}/sla/summary?as_of=T runs: aggregates over the live rows and the
# row versions of the incidents with events on both sides of T (sla only).
SUMMARY = "as_of, SLA summary"
# What GET /tenants/{t}/sla/summary?known_at=T runs: aggregates over the rows known by T,
# plus the incidents with events recorded on both sides of T folded again (sla only).
KNOWN_SUMMARY = "known_at, SLA summary"


def snapshot_as_scheduled(
    database: Database, projection: Projection, tenant: str, count: int, batch_size: int
) -> int:
    """Stream `projection` from nothing and snapshot `tenant` at `count` evenly spaced
    places of its log. Return how many snapshots the tenant has."""
    with database.connect_owner() as conn:
        for table in projection.tables:
            conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(table)))
        conn.execute("DELETE FROM projection_checkpoints WHERE projection = %s", (projection.name,))
        conn.execute("DELETE FROM projection_snapshots WHERE projection = %s", (projection.name,))
        conn.commit()
    with database.connect_worker() as conn:
        with conn.transaction():
            places = [
                Checkpoint(int(tx_id), int(position))
                for tx_id, position in conn.execute(
                    # ORDER BY events.tx_id: a bare tx_id would name the text column above,
                    # which puts transaction 999 after transaction 1000.
                    "SELECT tx_id::text, position FROM events WHERE tenant_id = %s "
                    "ORDER BY events.tx_id, position",
                    (tenant,),
                )
            ]
        marks = [places[len(places) * step // count - 1] for step in range(1, count + 1)]
        started = time.perf_counter()
        for mark in marks:
            while True:
                with conn.transaction():
                    reached = load_checkpoint(conn, projection.name)
                if (reached.tx_id, reached.position) >= (mark.tx_id, mark.position):
                    break
                if not project_batch(conn, projection, batch_size):
                    break
            take_snapshot(conn, projection, tenant)
        with conn.transaction():
            taken = conn.execute(
                "SELECT count(*) FROM projection_snapshots "
                "WHERE tenant_id = %s AND projection = %s",
                (tenant, projection.name),
            ).fetchone()
    assert taken is not None
    print(
        f"streamed {projection.name} through {len(places):,} events of {tenant} and took "
        f"{taken[0]} snapshots in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return int(taken[0])


def timed_replay(
    conn: psycopg.Connection[Any],
    projection: Projection,
    tenant: str,
    *,
    snapshots: bool,
    as_of: datetime | None = None,
    known_at: datetime | None = None,
) -> tuple[float, Replayed]:
    """Time one replay. Without `snapshots`, it deletes the tenant's snapshots in a
    transaction that it rolls back after the replay."""
    if snapshots:
        started = time.perf_counter()
        result = replay(conn, projection, tenant, as_of=as_of, known_at=known_at)
        return time.perf_counter() - started, result
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.execute(
            "DELETE FROM projection_snapshots WHERE tenant_id = %s AND projection = %s",
            (tenant, projection.name),
        )
        started = time.perf_counter()
        result = replay(conn, projection, tenant, as_of=as_of, known_at=known_at)
        seconds = time.perf_counter() - started
        raise psycopg.Rollback()
    return seconds, result


def time_range(
    conn: psycopg.Connection[Any], column: str, tenant: str
) -> tuple[datetime, datetime]:
    """Return the first and last value of `column` among the tenant's incident events."""
    with conn.transaction():
        row = conn.execute(
            sql.SQL(
                "SELECT min({0}), max({0}) FROM events "
                "WHERE tenant_id = %s AND starts_with(stream_id, 'incident-')"
            ).format(sql.Identifier(column)),
            (tenant,),
        ).fetchone()
    assert row is not None and row[0] is not None
    return row[0], row[1]


def random_between(rng: random.Random, first: datetime, last: datetime) -> datetime:
    return first + timedelta(seconds=rng.uniform(0, (last - first).total_seconds()))


def p95(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=20, method="inclusive")[18]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE, help="Boston 311 export")
    parser.add_argument("--copies", type=int, default=5, help="imports of the file (tenants)")
    parser.add_argument("--tenant", default="boston-1", help="tenant to replay")
    parser.add_argument("--projection", default="sla", help="replayable projection to replay")
    parser.add_argument("--rounds", type=int, default=20, help="random times of each kind (R)")
    parser.add_argument("--snapshots", type=int, default=10, help="snapshots to take (K)")
    parser.add_argument("--batch-size", type=int, default=5000, help="events per streaming batch")
    parser.add_argument("--seed", type=int, default=5, help="seed of the random times")
    parser.add_argument(
        "--profile", action="store_true", help="profile a snapshot replay of each axis"
    )
    parser.add_argument("--database", help="reuse this database, kept by a run with --keep")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    args = parser.parse_args()
    if args.copies < 1 or args.rounds < 1 or args.snapshots < 1:
        parser.error("--copies, --rounds and --snapshots must be 1 or more")
    projection = projection_named(args.projection, replayable=True)

    print(f"load before: {load_average()}", flush=True)
    conninfo = server()
    name, database = boston_database(
        conninfo, name=args.database, path=args.file, copies=args.copies
    )
    try:
        with database.connect_owner() as conn:
            row = conn.execute("SELECT count(*) FROM events").fetchone()
        assert row is not None
        print(f"database {name}: {row[0]:,} events", flush=True)
        snapshot_count = snapshot_as_scheduled(
            database, projection, args.tenant, args.snapshots, args.batch_size
        )
        print(f"load after snapshots: {load_average()}", flush=True)
        rng = random.Random(args.seed)
        seconds: dict[str, list[float]] = defaultdict(list)
        folded: dict[str, list[int]] = defaultdict(list)
        with database.connect_worker() as conn:
            occurred = time_range(conn, "occurred_at", args.tenant)
            recorded = time_range(conn, "recorded_at", args.tenant)
            print(f"as_of between {occurred[0]} and {occurred[1]}")
            print(f"known_at between {recorded[0]} and {recorded[1]}", flush=True)
            for round_number in range(1, args.rounds + 1):
                as_of = random_between(rng, *occurred)
                known_at = random_between(rng, *recorded)
                runs: list[tuple[str, bool, dict[str, datetime]]] = [
                    ("full replay", False, {}),
                    ("as_of, snapshots", True, {"as_of": as_of}),
                    ("as_of, none", False, {"as_of": as_of}),
                    ("known_at, snapshots", True, {"known_at": known_at}),
                    ("known_at, none", False, {"known_at": known_at}),
                ]
                rng.shuffle(runs)
                states: dict[str, Any] = {}
                for kind, snapshots, times in runs:
                    took, result = timed_replay(
                        conn,
                        projection,
                        args.tenant,
                        snapshots=snapshots,
                        as_of=times.get("as_of"),
                        known_at=times.get("known_at"),
                    )
                    seconds[kind].append(took)
                    folded[kind].append(result.events_folded)
                    states[kind] = result.states
                if projection.name == "sla":
                    started = time.perf_counter()
                    past = sla_summary(conn, args.tenant, as_of)
                    seconds[SUMMARY].append(time.perf_counter() - started)
                    folded[SUMMARY].append(0)
                    if past != summarize_states(states["as_of, none"].values(), as_of):
                        raise SystemExit(
                            f"round {round_number}: the SLA summary as of {as_of} differs "
                            "from the fold of the events that happened by then"
                        )
                    started = time.perf_counter()
                    answer = sla_summary_known_at(conn, args.tenant, known_at)
                    seconds[KNOWN_SUMMARY].append(time.perf_counter() - started)
                    folded[KNOWN_SUMMARY].append(0)
                    folded_answer = summarize_states(states["known_at, none"].values(), known_at)
                    if answer != folded_answer:
                        raise SystemExit(
                            f"round {round_number}: the SLA summary as known at {known_at} "
                            + (
                                "was left to a fold"
                                if answer is None
                                else "differs from the fold of the events recorded by then"
                            )
                        )
                for axis in ("as_of", "known_at"):
                    if states[f"{axis}, snapshots"] != states[f"{axis}, none"]:
                        raise SystemExit(
                            f"round {round_number}: the replay at the random {axis} returned "
                            "other states with snapshots than without; snapshots are broken"
                        )
                print(
                    f"round {round_number}: as_of {as_of:%Y-%m-%d %H:%M}, known_at "
                    f"{known_at:%H:%M:%S.%f}: "
                    + ", ".join(f"{kind} {seconds[kind][-1]:.2f} s" for kind, _, _ in runs)
                    + "".join(
                        f", {kind} {seconds[kind][-1]:.3f} s"
                        for kind in (SUMMARY, KNOWN_SUMMARY)
                        if kind in seconds
                    ),
                    flush=True,
                )
            profiles: dict[str, cProfile.Profile] = {}
            if args.profile:
                for axis, moments in (("as_of", occurred), ("known_at", recorded)):
                    profiles[axis] = cProfile.Profile()
                    profiles[axis].enable()
                    moment = random_between(rng, *moments)
                    replay(
                        conn,
                        projection,
                        args.tenant,
                        as_of=moment if axis == "as_of" else None,
                        known_at=moment if axis == "known_at" else None,
                    )
                    profiles[axis].disable()
        print(f"load after replays: {load_average()}")

        full = statistics.median(seconds["full replay"])
        print(
            f"\n{projection.name} of {args.tenant}, {args.rounds} rounds, {snapshot_count} "
            f"snapshots; full replay as of now: median {full:.3f} s, "
            f"{statistics.median(folded['full replay']):,.0f} events"
        )
        print(
            f"{'kind':<20} {'median s':>9} {'p95 s':>8} {'events (median)':>16} "
            f"{'median / full':>14} {'p95 / full':>11}"
        )
        for kind in (*KINDS, SUMMARY, KNOWN_SUMMARY) if SUMMARY in seconds else KINDS:
            median, high = statistics.median(seconds[kind]), p95(seconds[kind])
            print(
                f"{kind:<20} {median:>9.3f} {high:>8.3f} "
                f"{statistics.median(folded[kind]):>16,.0f} {median / full:>14.3f} "
                f"{high / full:>11.3f}"
            )
        print(
            f"targets: snapshot path median / full <= {TARGET_RATIO:.3f}, "
            f"p95 <= {TARGET_P95_SECONDS * 1000:.0f} ms"
        )
        for axis, profile in profiles.items():
            print(f"\nprofile of one snapshot replay at a random {axis}:")
            pstats.Stats(profile).sort_stats("cumulative").print_stats(18)
    finally:
        release(conninfo, name, keep=args.keep or bool(args.database))


if __name__ == "__main__":
    main()
