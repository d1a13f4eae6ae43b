"""Public dashboard page benchmark: render time of a large tenant's public page.

Into a fresh database it writes a tenant with N events (one million by default) in streams
of four. It also writes the read-model rows (SLA, trends and grouping) of those N / 4
incidents, spread over the two years before today, 90 % of them resolved. The rows are
written in SQL rather than projected, so that a run takes minutes, not hours: the page
reads only the read models, the seal stream and the projection checkpoints.

It configures one dashboard with a public widget of each kind, starts `civicpulse serve`
in a child process and requests the public page over the loopback, sequentially: as of
now (the read models as they stand) and as of the end of past days chosen at random (the
date picker), which refolds the incidents whose events straddle that moment. It prints
p50 and p95 of each.

    python bench/public_page.py [--events N] [--requests N]

DATABASE_URL selects the server; without it an embedded server is started.
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from psycopg_pool import ConnectionPool

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _databases import drop, fresh_database, server  # noqa: E402

from ledger.config_sections import apply_config  # noqa: E402
from ledger.database import Database  # noqa: E402
from ledger.seals import seal_all  # noqa: E402
from ledger.store import PostgresEventStore  # noqa: E402
from ledger.tenants import create_tenant  # noqa: E402
from projections.runtime import default_projections  # noqa: E402
from tests.ledger.plan_helpers import fill_events  # noqa: E402

TENANT = "bench-public"
TIME_ZONE = "America/New_York"
SPAN_DAYS = 730
DASHBOARD = {
    "name": "accountability",
    "widgets": [
        {"id": "on-time", "kind": "on_time_rate", "by": "department", "public": True},
        {"id": "backlog", "kind": "backlog", "period": "week", "periods": 26, "public": True},
        {"id": "closing", "kind": "time_to_close", "span_days": 90, "public": True},
        {"id": "ranking", "kind": "ranking", "by": "area", "min_cases": 20, "public": True},
        {"id": "map", "kind": "open_map", "limit": 1000, "public": True},
        {"id": "seals", "kind": "recent_seals", "public": True},
    ],
}

# One row per generated incident; n is the incident's number, as in fill_events.
FACTS = """
    WITH numbered AS (
        SELECT n, md5(%(tenant)s || '/' || n::text)::uuid AS incident_id,
               %(start)s::timestamptz + n * %(step)s::interval AS submitted_at,
               (n * 2654435761) %% 1000 AS h
        FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS n
    ), facts AS (
        SELECT *, CASE WHEN h < 900 AND submitted_at + ((h * 7) %% 480 + 1) * interval '1 hour'
                                      < now()
                       THEN submitted_at + ((h * 7) %% 480 + 1) * interval '1 hour' END
                  AS resolved_at
        FROM numbered
    )
"""
SLA_COLUMNS = """
    %(tenant)s, incident_id, 'category-' || n %% 40, 'department-' || n %% 12,
    CASE WHEN resolved_at IS NULL THEN 'open' ELSE 'closed' END, submitted_at,
    submitted_at + interval '24 hours', submitted_at + interval '1 hour',
    submitted_at + (1 + n %% 3) * interval '72 hours', resolved_at, resolved_at,
    submitted_at, greatest(submitted_at + interval '1 hour', resolved_at), now(), now()
"""


def fill_read_models(database: Database, incidents: int) -> None:
    """Write the SLA, trends and grouping rows of `incidents` generated incidents."""
    start = datetime.now(UTC) - timedelta(days=SPAN_DAYS)
    step = timedelta(days=SPAN_DAYS) / incidents
    columns = (
        "tenant_id, incident_id, category, department, status, submitted_at, "
        "first_response_due_at, first_response_at, resolution_due_at, resolved_at, closed_at, "
        "earliest_occurred_at, latest_occurred_at, earliest_recorded_at, known_since"
    )
    batch = 100_000
    with database.connect_owner() as conn:
        for first in range(0, incidents, batch):
            params = {
                "tenant": TENANT,
                "start": start,
                "step": step,
                "first": first,
                "last": min(first + batch, incidents) - 1,
            }
            conn.execute(
                f"{FACTS} INSERT INTO incident_sla ({columns}) SELECT {SLA_COLUMNS} FROM facts",
                params,
            )
            conn.execute(
                f"""{FACTS} INSERT INTO incident_trends ({columns}, report_area,
                    first_response_business_seconds, resolution_business_seconds)
                SELECT {SLA_COLUMNS}, 'area-' || n %% 20, 3600,
                       extract(epoch FROM resolved_at - submitted_at)
                FROM facts""",
                params,
            )
            # Every tenth incident joins the group of the one before it.
            conn.execute(
                f"""{FACTS} INSERT INTO grouping_reports (tenant_id, incident_id, submitted_at,
                    category, text, latitude, longitude, group_id)
                SELECT %(tenant)s, incident_id, submitted_at, 'category-' || n %% 40, '',
                       42.25 + ((n * 7919) %% 10000) / 80000.0,
                       -71.15 + ((n * 104729) %% 10000) / 60000.0,
                       md5(%(tenant)s || '/' || (CASE WHEN n %% 10 = 1 THEN n - 1 ELSE n END)
                           ::text)::uuid
                FROM facts""",
                params,
            )
            conn.commit()
        # The read models are as far as the log: every projection is caught up.
        for projection in default_projections():
            conn.execute(
                """
                INSERT INTO projection_checkpoints (projection, tx_id, position)
                SELECT %(name)s, tx_id, position FROM events ORDER BY tx_id DESC, position DESC
                LIMIT 1
                ON CONFLICT (projection) DO UPDATE
                SET tx_id = excluded.tx_id, position = excluded.position
                """,
                {"name": projection.name},
            )
        for table in ("incident_sla", "incident_trends", "grouping_reports"):
            conn.execute(f"ANALYZE {table}")
        conn.commit()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the API process exited before it listened")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the API did not listen on port {port} within 120 s")


def get(port: int, path: str) -> tuple[float, int]:
    """GET `path`; return seconds until the whole body arrived, and its size."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"GET {path} returned {response.status}: {body[:500]!r}")
    return time.perf_counter() - started, len(body)


def percentiles(label: str, seconds: list[float], sizes: list[int]) -> None:
    quantiles = statistics.quantiles(seconds, n=20, method="inclusive")
    print(
        f"{label}: {len(seconds)} requests, p50 {statistics.median(seconds) * 1000:.0f} ms, "
        f"p95 {quantiles[18] * 1000:.0f} ms, max {max(seconds) * 1000:.0f} ms, "
        f"page {statistics.mean(sizes) / 1024:.0f} KiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events in the tenant")
    parser.add_argument("--requests", type=int, default=40, help="requests of each kind")
    args = parser.parse_args()
    if args.events < 4 or args.requests < 2:
        parser.error("use at least 4 events and 2 requests")

    conninfo = server()
    name, database = fresh_database(conninfo)
    try:
        started = time.perf_counter()
        # First: fill_events writes the stream heads of every stream the tenant has.
        with database.connect_owner() as conn:
            fill_events(conn, TENANT, args.events)
        with ConnectionPool(database.app_conninfo, min_size=1, max_size=2) as pool:
            store = PostgresEventStore(pool)
            at = datetime.now(UTC) - timedelta(days=SPAN_DAYS + 1)
            create_tenant(store, TENANT, name="Bench City", time_zone=TIME_ZONE, occurred_at=at)
            apply_config(store, TENANT, {"dashboards": [DASHBOARD]}, occurred_at=at)
        fill_read_models(database, args.events // 4)
        sealed = seal_all(database, tenant_id=TENANT, actor="bench")
        print(
            f"wrote {args.events:,} events and {args.events // 4:,} incidents' read-model rows "
            f"and sealed {sum(seal.event_count for seal in sealed.sealed):,} events "
            f"in {time.perf_counter() - started:.0f} s"
        )

        port = free_port()
        env = {**os.environ, "DATABASE_URL": database.owner_conninfo}
        env["CIVICPULSE_LOG_LEVEL"] = "WARNING"
        process = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "serve", "--port", str(port)], env=env, cwd=ROOT
        )
        try:
            wait_for_port(port, process)
            page = f"/public/tenants/{TENANT}"
            for _ in range(3):
                get(port, page)
            now = [get(port, page) for _ in range(args.requests)]
            randomizer = random.Random(7)
            today = date.today()
            days = [
                today - timedelta(days=randomizer.randint(2, SPAN_DAYS - 30))
                for _ in range(args.requests)
            ]
            past = [get(port, f"{page}?day={day.isoformat()}") for day in days]
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
        percentiles("as of now", [item[0] for item in now], [item[1] for item in now])
        percentiles("as of past days", [item[0] for item in past], [item[1] for item in past])
        both = now + past
        percentiles("all", [item[0] for item in both], [item[1] for item in both])
    finally:
        drop(conninfo, name)


if __name__ == "__main__":
    main()
