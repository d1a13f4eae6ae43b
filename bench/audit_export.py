"""Audit export benchmark: memory and speed of exporting a large tenant.

Into a fresh database it copies N events (one million by default) for one tenant, then
exports all of them twice, each time read and discarded by this process:

- through the API: `civicpulse serve` in a child process, GET .../audit/events?format=F
  over the loopback;
- through the command line: `civicpulse audit events --format F` to standard output.

It prints events per second, megabytes per second and the peak resident memory of each
child process. For the server it also prints the peak before the export, after one small
warm-up export, so the growth due to the export shows. An export that held its result in
memory would grow by more than the size of the result, estimated at several hundred
megabytes for a million events. One that streams grows by a few megabytes.

    python bench/audit_export.py [--events N] [--format csv|jsonl]

DATABASE_URL selects the server; without it an embedded server is started.
"""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from psycopg_pool import ConnectionPool

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _databases import drop, fresh_database, server  # noqa: E402

from ledger.database import Database  # noqa: E402
from ledger.imports.copytext import EVENT_COPY_COLUMNS  # noqa: E402
from ledger.keys import Role, issue_key  # noqa: E402
from ledger.store import PostgresEventStore  # noqa: E402
from ledger.tenants import create_tenant  # noqa: E402

TENANT = "bench-audit"
MIB = 1024 * 1024


def fill(database: Database, count: int) -> str:
    """Create the tenant and an officer key, and COPY `count` reports; return the key."""
    with ConnectionPool(database.app_conninfo, min_size=1, max_size=2) as pool:
        store = PostgresEventStore(pool)
        create_tenant(
            store,
            TENANT,
            name="Bench",
            time_zone="UTC",
            occurred_at=datetime(2015, 1, 1, tzinfo=UTC),
        )
        _, token = issue_key(store, TENANT, role=Role.OFFICER, name="bench", issued_by="bench")

    metadata = orjson.dumps({"actor": "import", "channel": "import", "role": "system"}).decode()
    start = datetime(2015, 1, 1, tzinfo=UTC)
    with (
        database.connect_owner() as conn,
        conn.cursor() as cur,
        cur.copy(f"COPY events ({EVENT_COPY_COLUMNS}) FROM STDIN") as copy,
    ):
        lines = []
        for number in range(count):
            incident = uuid.uuid4()
            payload = orjson.dumps(
                {
                    "incident_id": str(incident),
                    "category": ("Pothole", "Graffiti", "Streetlight")[number % 3],
                    "description": f"Report {number}: a streetlight out at the corner",
                    "source_id": str(number),
                }
            ).decode()
            occurred = (start + timedelta(seconds=number)).isoformat()
            lines.append(
                f"{TENANT}\tincident-{incident}\t1\tReportSubmitted\t1\t{payload}\t"
                f"{metadata}\t{occurred}\t{uuid.uuid4()}\t\\\\x{'00' * 32}\n"
            )
            if len(lines) == 10_000:
                copy.write("".join(lines))
                lines = []
        copy.write("".join(lines))
    with database.connect_owner(autocommit=True) as conn:
        conn.execute("ANALYZE events")
    return token


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def child_env(database: Database) -> dict[str, str]:
    env = dict(os.environ)
    env["DATABASE_URL"] = database.owner_conninfo
    env["CIVICPULSE_LOG_LEVEL"] = "WARNING"
    return env


def civicpulse(*args: str) -> list[str]:
    return [sys.executable, "-m", "api.cli", *args]


def peak_rss_mib(pid: int) -> float:
    """Peak resident memory of a running process so far, from /proc (Linux only)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def download(port: int, path: str, token: str) -> tuple[int, int, float]:
    """GET `path` and discard the body; return (lines, bytes, seconds)."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"GET {path} returned {response.status}: {response.read()[:500]!r}")
    lines = size = 0
    while chunk := response.read(MIB):
        lines += chunk.count(b"\n")
        size += len(chunk)
    conn.close()
    return lines, size, time.perf_counter() - started


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


def bench_api(database: Database, token: str, export_format: str, count: int) -> None:
    port = free_port()
    process = subprocess.Popen(
        civicpulse("serve", "--port", str(port)), env=child_env(database), cwd=ROOT
    )
    try:
        wait_for_port(port, process)
        path = f"/tenants/{TENANT}/audit/events?format={export_format}"
        download(port, path + "&event_type=TenantCreated", token)
        before = peak_rss_mib(process.pid)
        lines, size, seconds = download(port, path, token)
        after = peak_rss_mib(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    events = lines - 1 if export_format == "csv" else lines
    print(
        f"API {export_format}: {events:,} events, {size / MIB:,.0f} MiB in {seconds:.1f} s: "
        f"{events / seconds:,.0f} events/s, {size / MIB / seconds:,.1f} MiB/s; server peak "
        f"RSS {before:,.0f} MiB before, {after:,.0f} MiB after (+{after - before:,.0f} MiB)"
    )
    if events != count + 2:
        print(f"  expected {count + 2:,} events (the reports, TenantCreated, ApiKeyIssued)")


def bench_cli(database: Database, export_format: str) -> None:
    started = time.perf_counter()
    process = subprocess.Popen(
        civicpulse("audit", "events", "--tenant", TENANT, "--format", export_format),
        env=child_env(database),
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    lines = size = 0
    while chunk := process.stdout.read(MIB):
        lines += chunk.count(b"\n")
        size += len(chunk)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if status != 0:
        raise RuntimeError(f"civicpulse audit events exited with status {status}")
    events = lines - 1 if export_format == "csv" else lines
    print(
        f"CLI {export_format}: {events:,} events, {size / MIB:,.0f} MiB in {seconds:.1f} s "
        f"(with start-up): {events / seconds:,.0f} events/s; peak RSS "
        f"{usage.ru_maxrss / 1024:,.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="reports to export")
    parser.add_argument("--format", choices=["csv", "jsonl"], default="csv")
    args = parser.parse_args()

    conninfo = server()
    name, database = fresh_database(conninfo)
    try:
        started = time.perf_counter()
        token = fill(database, args.events)
        print(f"copied {args.events:,} events in {time.perf_counter() - started:.1f} s")
        bench_api(database, token, args.format, args.events)
        bench_cli(database, args.format)
    finally:
        drop(conninfo, name)


if __name__ == "__main__":
    main()
