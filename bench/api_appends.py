"""API append benchmark: reports per second through the real server, beside two baselines.

All runs happen in one process, one after the other, on the same PostgreSQL server:

- API: `civicpulse serve` (uvicorn, `--server-workers` processes) started by this script on
  a loopback port, and 32 clients each posting reports (POST /tenants/bench/incidents with
  an Idempotency-Key) over a keep-alive connection of its own: aiohttp tasks on one event
  loop, or with `--client requests` sessions on threads, which cost about five times the
  CPU per request. Run once with group commit and, with `--compare`, once more without it.
- raw INSERT: 8 threads, each with its own autocommit connection, inserting the same number
  of rows one INSERT (one transaction) at a time into a bare table with the events table's
  columns and no keys, indexes, defaults or triggers.
- eventsourcing: the `eventsourcing` library's PostgreSQL persistence, 8 threads each saving
  new aggregates, one event per aggregate, into a database of its own on the same server.

It prints the rate, the median and the 99th percentile latency of each run, the CPU time
per request of the server processes, of this script's clients and of the local PostgreSQL
processes, the machine's busy CPU time per request and the rate that allows with every CPU
busy, and the ratios against the targets. `--floor` adds a run against FastAPI alone
(bench/_floor_app.py): the same reports validated and answered 201, with nothing behind.
The API should reach 0.33 of the raw INSERT rate or better and 3 times the
`eventsourcing` rate or better, with a 99th percentile under 100 ms.

    python bench/api_appends.py [--requests N] [--compare] [--server-workers N]
                                [--client aiohttp|requests] [--floor]

DATABASE_URL selects the server; without it an embedded server is started.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import psycopg
import requests
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _databases import drop, fresh_database, server  # noqa: E402

from ledger.database import Database  # noqa: E402
from ledger.keys import Role, issue_key  # noqa: E402
from ledger.store import PostgresEventStore  # noqa: E402
from ledger.tenants import create_tenant  # noqa: E402

API_CLIENTS = 32
BASELINE_CLIENTS = 8
TENANT = "bench"
BARE_TABLE = """
CREATE TABLE bare_events (
    tenant_id text, stream_id text, stream_version integer, event_type text,
    schema_version smallint, payload jsonb, metadata jsonb, occurred_at timestamptz,
    event_id uuid, hash bytea
)
"""


@dataclass(frozen=True)
class Run:
    name: str
    count: int
    seconds: float
    latencies: list[float]
    server_cpu_seconds: float | None = None  # of the API processes, for API runs
    client_cpu_seconds: float | None = None  # of this script, for API runs
    database_cpu_seconds: float | None = None  # of the local PostgreSQL processes
    machine_cpu_seconds: float | None = None  # busy time of all CPUs, for API runs

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    @property
    def median_ms(self) -> float:
        return statistics.median(self.latencies) * 1000

    @property
    def p99_ms(self) -> float:
        return statistics.quantiles(self.latencies, n=100)[98] * 1000

    def line(self) -> str:
        text = (
            f"{self.name:<34} {self.count:>6} in {self.seconds:6.2f} s  "
            f"{self.rate:8.0f}/s  median {self.median_ms:6.1f} ms  p99 {self.p99_ms:6.1f} ms"
        )
        if self.server_cpu_seconds is not None:
            per_request = self.server_cpu_seconds / self.count * 1000
            text += f"  server CPU {per_request:.2f} ms/request"
        if self.client_cpu_seconds is not None:
            per_request = self.client_cpu_seconds / self.count * 1000
            text += f"  client CPU {per_request:.2f} ms/request"
        return text

    def budget(self) -> str | None:
        """Return where the machine's CPU went per request, and the rate it allows at most."""
        if self.machine_cpu_seconds is None:
            return None
        machine = self.machine_cpu_seconds / self.count * 1000
        cpus = os.cpu_count() or 1
        database = (self.database_cpu_seconds or 0.0) / self.count * 1000
        return (
            f"  {self.name}: database CPU {database:.2f} ms/request (0 when the server is "
            f"not on this machine), all {cpus} CPUs busy {machine:.2f} ms/request, "
            f"so at most {cpus / machine * 1000:,.0f}/s with every CPU busy"
        )


def cpu_seconds(pid: int) -> float:
    """Return the user and system CPU time of a process and of its live child processes
    (the uvicorn workers), from /proc/PID/stat on Linux."""
    total = 0.0
    for process in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime and stime
        total += ticks / os.sysconf("SC_CLK_TCK")
    return total


def database_cpu_times() -> dict[int, float]:
    """Return the CPU time of each PostgreSQL process on this machine: backends, the WAL
    writer, the checkpointer. Those of another user may be unreadable and are left out."""
    times: dict[int, float] = {}
    for process in psutil.process_iter(["name"]):
        if (process.info["name"] or "").startswith("postgres"):
            try:
                cpu = process.cpu_times()
            except (psutil.AccessDenied, psutil.NoSuchProcess):
                continue
            times[process.pid] = cpu.user + cpu.system
    return times


def cpu_since(before: dict[int, float], after: dict[int, float]) -> float:
    """Return the CPU time the processes alive at the end used since `before`. A process
    that ended in between is left out, and one that started counts from zero."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def busy_cpu_seconds() -> float:
    """Return the time all CPUs of the machine spent on anything but idling and waiting."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def timed_calls(clients: int, calls: list[Callable[[], None]], name: str) -> Run:
    """Run `calls` on `clients` threads; return the wall time and each call's latency."""
    latencies: list[float] = []
    lock = threading.Lock()

    def timed(call: Callable[[], None]) -> None:
        started = time.perf_counter()
        call()
        elapsed = time.perf_counter() - started
        with lock:
            latencies.append(elapsed)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        for future in [pool.submit(timed, call) for call in calls]:
            future.result()
    return Run(name, len(calls), time.perf_counter() - started, latencies)


def report_body(n: int) -> dict[str, Any]:
    return {
        "description": f"Streetlight out in front of number {n}",
        "category": "Street Light Outages",
        "latitude": 42.35,
        "longitude": -71.06,
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def start_api(
    database: Database, *, group_commit: bool, workers: int
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database.owner_conninfo,
        "CIVICPULSE_API_HOST": "127.0.0.1",
        "CIVICPULSE_API_PORT": str(port),
        "CIVICPULSE_API_POOL_SIZE": "20",
        "CIVICPULSE_GROUP_COMMIT": "true" if group_commit else "false",
        "CIVICPULSE_LOG_LEVEL": "WARNING",
        "CIVICPULSE_API_WORKERS": str(workers),
    }
    process = subprocess.Popen([str(ROOT / ".venv" / "bin" / "civicpulse"), "serve"], env=env)
    base = f"http://127.0.0.1:{port}"
    wait_until_healthy(process, base, "civicpulse serve", 60)
    return process, base


def wait_until_healthy(
    process: subprocess.Popen[bytes], base: str, name: str, seconds: float
) -> None:
    """Wait until GET /health returns 200; kill the process and raise if it exits or
    `seconds` pass first."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if requests.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"{name} failed to start at {base}; see its output above")
        time.sleep(0.2)


def measured_run(
    process: subprocess.Popen[bytes],
    post_reports: Callable[[int, str], Run],
    count: int,
    label: str,
) -> Run:
    """Warm up, then post `count` reports and return the run with the CPU time that the
    server process, this script, the local PostgreSQL and the whole machine used for it."""
    post_reports(API_CLIENTS * 4, "warm-up")
    server_before = cpu_seconds(process.pid)
    client_before = time.process_time()
    database_before = database_cpu_times()
    machine_before = busy_cpu_seconds()
    run = post_reports(count, label)
    return replace(
        run,
        server_cpu_seconds=cpu_seconds(process.pid) - server_before,
        client_cpu_seconds=time.process_time() - client_before,
        database_cpu_seconds=cpu_since(database_before, database_cpu_times()),
        machine_cpu_seconds=busy_cpu_seconds() - machine_before,
    )


def run_floor(count: int) -> Run:
    """Post the reports to the framework alone (bench/_floor_app.py): FastAPI on uvicorn
    that validates the body and returns 201, with nothing else behind it."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "_floor_app:app", "--port", str(port)]
    command += ["--log-level", "warning", "--no-access-log"]
    process = subprocess.Popen(command, cwd=Path(__file__).parent)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(process, base, "the floor app", 30)
        label = "FastAPI floor, no key, no database"
        return measured_run(process, _aiohttp_poster(base, "unused"), count, label)
    finally:
        process.terminate()
        process.wait(30)


def run_api(
    database: Database,
    token: str,
    count: int,
    *,
    group_commit: bool,
    workers: int,
    client: str = "aiohttp",
) -> Run:
    process, base = start_api(database, group_commit=group_commit, workers=workers)
    label = "API, group commit" if group_commit else "API, one commit per request"
    label += f", {workers} worker" + ("s" if workers > 1 else "")
    post_reports = (
        _aiohttp_poster(base, token) if client == "aiohttp" else _requests_poster(base, token)
    )
    try:
        return measured_run(process, post_reports, count, label)
    finally:
        process.terminate()
        process.wait(30)


def _requests_poster(base: str, token: str) -> Callable[[int, str], Run]:
    """Return a function that posts reports from API_CLIENTS threads, each with a requests
    session of its own, and returns the run."""
    local = threading.local()

    def session() -> requests.Session:
        if not hasattr(local, "session"):
            local.session = requests.Session()
            local.session.headers["Authorization"] = f"Bearer {token}"
        http: requests.Session = local.session
        return http

    def post(run_id: str, n: int) -> Callable[[], None]:
        def call() -> None:
            response = session().post(
                f"{base}/tenants/{TENANT}/incidents",
                json=report_body(n),
                headers={"Idempotency-Key": f"{run_id}-{n}"},
                timeout=60,
            )
            if response.status_code != 201:
                raise RuntimeError(f"POST failed with {response.status_code}: {response.text}")

        return call

    def post_reports(count: int, name: str) -> Run:
        # A key of its own per run, so that no report replays an earlier run's.
        run_id = uuid.uuid4().hex[:8]
        return timed_calls(API_CLIENTS, [post(run_id, n) for n in range(count)], name)

    return post_reports


def _aiohttp_poster(base: str, token: str) -> Callable[[int, str], Run]:
    """Return a function that posts reports from aiohttp tasks on one event loop and
    returns the run."""
    return lambda count, name: asyncio.run(_post_reports(base, token, count, name))


async def _post_reports(base: str, token: str, count: int, name: str) -> Run:
    """Post `count` reports from API_CLIENTS concurrent clients, each on a keep-alive
    connection of its own, and return the wall time and each request's latency."""
    import aiohttp

    run_id = uuid.uuid4().hex[:8]
    numbers = iter(range(count))
    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {token}"}
    url = f"{base}/tenants/{TENANT}/incidents"

    async def client(session: aiohttp.ClientSession) -> None:
        for n in numbers:
            started = time.perf_counter()
            async with session.post(
                url, json=report_body(n), headers={"Idempotency-Key": f"{run_id}-{n}"}
            ) as response:
                body = await response.read()
                if response.status != 201:
                    raise RuntimeError(f"POST failed with {response.status}: {body!r}")
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=API_CLIENTS)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(
        connector=connector, headers=headers, timeout=timeout
    ) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(API_CLIENTS)))
        seconds = time.perf_counter() - started
    return Run(name, count, seconds, latencies)


def run_raw_insert(database: Database, count: int) -> Run:
    with database.connect_owner(autocommit=True) as conn:
        conn.execute(BARE_TABLE)
    connections = threading.local()
    opened: list[psycopg.Connection[Any]] = []
    now = datetime.now(UTC)

    def insert(n: int) -> Callable[[], None]:
        row = (
            TENANT,
            f"incident-{uuid.uuid4()}",
            1,
            "ReportSubmitted",
            1,
            Jsonb(report_body(n)),
            Jsonb({"actor": "bench", "role": "staff", "channel": "api"}),
            now,
            uuid.uuid4(),
            os.urandom(32),
        )

        def call() -> None:
            if not hasattr(connections, "conn"):
                connections.conn = database.connect_owner(autocommit=True)
                opened.append(connections.conn)
            connections.conn.execute(
                "INSERT INTO bare_events VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", row
            )

        return call

    try:
        return timed_calls(BASELINE_CLIENTS, [insert(n) for n in range(count)], "raw INSERT")
    finally:
        for conn in opened:
            conn.close()


def run_eventsourcing(server_conninfo: str, count: int) -> Run:
    from eventsourcing.application import Application
    from eventsourcing.domain import Aggregate, event

    class Report(Aggregate):
        @event("Submitted")
        def __init__(self, description: str, category: str) -> None:
            self.description = description
            self.category = category

    name, _ = fresh_database(server_conninfo)
    params = conninfo_to_dict(make_conninfo(server_conninfo, dbname=name))
    env = {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": str(params["dbname"]),
        "POSTGRES_HOST": str(params.get("host") or "127.0.0.1"),
        "POSTGRES_PORT": str(params.get("port") or "5432"),
        "POSTGRES_USER": str(params.get("user") or "postgres"),
        "POSTGRES_PASSWORD": str(params.get("password") or ""),
        "POSTGRES_POOL_SIZE": str(BASELINE_CLIENTS),
    }
    app: Application[Any] = Application(env=env)

    def save(n: int) -> Callable[[], None]:
        body = report_body(n)

        def call() -> None:
            app.save(Report(body["description"], body["category"]))

        return call

    try:
        timed_calls(BASELINE_CLIENTS, [save(n) for n in range(200)], "warm-up")
        return timed_calls(BASELINE_CLIENTS, [save(n) for n in range(count)], "eventsourcing")
    finally:
        app.close()
        drop(server_conninfo, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=5000, help="appends per run")
    parser.add_argument(
        "--compare", action="store_true", help="also run the API without group commit"
    )
    parser.add_argument(
        "--server-workers",
        type=int,
        default=1,
        metavar="N",
        help="uvicorn worker processes of the API server (CIVICPULSE_API_WORKERS)",
    )
    parser.add_argument(
        "--client",
        choices=("aiohttp", "requests"),
        default="aiohttp",
        help="the API clients: aiohttp tasks on one event loop (the default, about a "
        "fifth of the CPU per request) or requests sessions on threads",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also post the reports to FastAPI alone (bench/_floor_app.py), which shows "
        "the framework's share of the CPU per report",
    )
    args = parser.parse_args()
    if args.server_workers < 1:
        parser.error(f"invalid --server-workers {args.server_workers}: use 1 or more")

    server_conninfo = server()
    name, database = fresh_database(server_conninfo)
    try:
        store_pool = psycopg_pool(database)
        store = PostgresEventStore(store_pool)
        create_tenant(store, TENANT, name="Bench", time_zone="UTC", occurred_at=datetime.now(UTC))
        _, token = issue_key(store, TENANT, role=Role.STAFF, name="bench", issued_by="bench")
        store_pool.close()

        workers = args.server_workers
        runs = [
            run_api(
                database,
                token,
                args.requests,
                group_commit=True,
                workers=workers,
                client=args.client,
            )
        ]
        if args.compare:
            runs.append(
                run_api(
                    database,
                    token,
                    args.requests,
                    group_commit=False,
                    workers=workers,
                    client=args.client,
                )
            )
        floors = [run_floor(args.requests)] if args.floor else []
        raw = run_raw_insert(database, args.requests)
        library = run_eventsourcing(server_conninfo, args.requests)
    finally:
        drop(server_conninfo, name)

    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end")
    for run in [*runs, *floors, raw, library]:
        print(run.line())
    for run in runs:
        if (budget := run.budget()) is not None:
            print(budget)
    api = runs[0]
    print(f"API / raw INSERT:    {api.rate / raw.rate:5.2f}  (target 0.33 or more)")
    print(f"API / eventsourcing: {api.rate / library.rate:5.2f}  (target 3 or more)")
    print(f"API p99:             {api.p99_ms:5.1f} ms (target under 100 ms)")


def psycopg_pool(database: Database) -> Any:
    from psycopg_pool import ConnectionPool

    return ConnectionPool(database.app_conninfo, min_size=1, max_size=2, open=True)


if __name__ == "__main__":
    main()
