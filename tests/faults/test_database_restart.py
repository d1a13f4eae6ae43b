"""PostgreSQL restarted while clients keep submitting reports.

The tests run a PostgreSQL server of their own in a temporary directory, reachable only
through a unix socket, and stop it (fast shutdown) and start it again. The main test starts
`civicpulse serve` and `civicpulse project` against it as separate processes. Client threads
submit reports, each with its own Idempotency-Key, and retry on connection errors and 5xx
responses. The server restarts twice while they run and once more when no request is in
flight. Neither CivicPulse process is restarted.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ledger.database import checked_pool
from projections.runtime import default_projections

TENANT = "fault-city"
CLIENTS = 6
# Reports that must be stored before the first restart and after each one.
REPORTS_BETWEEN_RESTARTS = 15
# How long the server stays down between its fast shutdown and the next start, in seconds.
OUTAGE_SECONDS = 1.0
RESTARTS = 2
REQUEST_TIMEOUT_SECONDS = 10.0
# A client gives up on a key after this long. Every key is expected to be stored well before.
KEY_DEADLINE_SECONDS = 30.0
RETRY_BACKOFF_SECONDS = 0.2
PROJECTOR_CATCH_UP_SECONDS = 30.0
# Maximum time for the first response after a restart during which no request was in flight.
IDLE_RESTART_RESPONSE_SECONDS = 3.0


class PrivateServer:
    """A PostgreSQL server that belongs to this test, so the test may stop and start it.

    pgserver runs initdb and the first start. As root it runs the server as a system user
    of its own, since PostgreSQL refuses to run as root. The server listens on a unix socket
    only (`-h ""`), never on a TCP address.
    """

    def __init__(self, directory: Path) -> None:
        import pgserver

        self.pgdata = directory / "pgdata"
        server = pgserver.get_server(self.pgdata, cleanup_mode=None)
        self.pg_ctl = pgserver.pg_ctl
        self.system_user: str | None = server.system_user
        self.socket_dir = server.get_postmaster_info().socket_dir
        self.owner_url: str = server.get_uri()

    def stop(self) -> None:
        """Stop the server with a fast shutdown: open transactions roll back, sessions end."""
        self.pg_ctl(
            ["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=self.system_user, timeout=60
        )

    def start(self) -> None:
        self.pg_ctl(
            ["-w", "-o", f'-h "" -k {self.socket_dir}', "-l", str(self.pgdata / "log"), "start"],
            pgdata=self.pgdata,
            user=self.system_user,
            timeout=60,
        )

    def close(self) -> None:
        # A server that is running, or that a failed start may have left running, has its
        # postmaster.pid; a clean shutdown removes it.
        if (self.pgdata / "postmaster.pid").exists():
            self.stop()

    def postmaster_pid(self) -> int:
        return int((self.pgdata / "postmaster.pid").read_text().split()[0])


@pytest.fixture
def private_server() -> Iterator[PrivateServer]:
    # NOTE: not under tmp_path. pgserver opens the directories above the data directory to
    # the server's system user, and a pytest run that starts meanwhile makes its
    # pytest-of-<user> directory private again, which locks the running server out of its
    # own data directory.
    with tempfile.TemporaryDirectory(prefix="civicpulse-restart-") as directory:
        server = PrivateServer(Path(directory))
        try:
            yield server
        finally:
            server.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cli_env(database_url: str, data_dir: Path) -> dict[str, str]:
    """Return an environment that points every CivicPulse connection at `database_url`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key != "DATABASE_URL" and not key.startswith("CIVICPULSE_")
    }
    env["DATABASE_URL"] = database_url
    env["CIVICPULSE_DATA_DIR"] = str(data_dir)
    env["CIVICPULSE_LOG_LEVEL"] = "INFO"
    env["CIVICPULSE_PROJECTOR_POLL_SECONDS"] = "0.5"
    return env


def civicpulse(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def start_process(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "api.cli", *args],
            env=env,
            stdout=output,
            stderr=output,
        )


def wait_for(condition: Callable[[], bool], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"{message} within {timeout:.0f} s")


@dataclass(frozen=True)
class Response:
    """An HTTP response: status, the headers the checks read, and the JSON body."""

    status: int
    content_type: str
    retry_after: str | None
    body: Any


def post_report(base: str, token: str, key: str) -> Response:
    # The body depends on the key only, so every retry of a key sends the same request.
    body = json.dumps({"description": f"Streetlight out, report {key}", "category": "Lighting"})
    request = urllib.request.Request(
        f"{base}/tenants/{TENANT}/incidents",
        data=body.encode(),
        method="POST",
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "Idempotency-Key": key,
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_SECONDS) as http_response:
            return _parse_response(
                http_response.status, http_response.headers, http_response.read()
            )
    except urllib.error.HTTPError as error:
        with error:
            return _parse_response(error.code, error.headers, error.read())


def _parse_response(status: int, headers: Any, raw: bytes) -> Response:
    try:
        body = json.loads(raw)
    except ValueError:
        body = raw.decode(errors="replace")
    return Response(status, headers.get("Content-Type", ""), headers.get("Retry-After"), body)


@dataclass
class Attempt:
    started: float
    ended: float
    outcome: str  # the HTTP status, or the name of the connection error


@dataclass
class KeyRecord:
    """Every attempt one client made with one Idempotency-Key, in order."""

    key: str
    attempts: list[Attempt] = field(default_factory=list)
    incident_ids: list[str] = field(default_factory=list)
    replayed: list[bool] = field(default_factory=list)
    server_errors: list[Response] = field(default_factory=list)
    client_errors: list[Response] = field(default_factory=list)


class Clients:
    """Client threads that submit reports until stopped, each key until it gets a 2xx."""

    def __init__(self, base: str, token: str) -> None:
        self.base = base
        self.token = token
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.records: list[KeyRecord] = []
        self.stored = 0
        self.threads = [
            threading.Thread(target=self._run, args=(number,), name=f"client-{number}")
            for number in range(CLIENTS)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(KEY_DEADLINE_SECONDS + REQUEST_TIMEOUT_SECONDS + 5)
            assert not thread.is_alive(), f"{thread.name} did not stop"

    def stored_count(self) -> int:
        with self.lock:
            return self.stored

    def _run(self, number: int) -> None:
        sequence = 0
        while not self.stop_event.is_set():
            sequence += 1
            record = KeyRecord(f"restart-{number}-{sequence:04d}")
            with self.lock:
                self.records.append(record)
            self._submit_with_retries(record)
            if record.incident_ids:
                with self.lock:
                    self.stored += 1

    def _submit_with_retries(self, record: KeyRecord) -> None:
        """Send the key's request until a 2xx or a 4xx, or until the key's deadline."""
        deadline = time.monotonic() + KEY_DEADLINE_SECONDS
        while True:
            started = time.monotonic()
            try:
                response = post_report(self.base, self.token, record.key)
            except (OSError, http.client.HTTPException) as error:
                # Connection refused or reset, or no response in time: the request may or may
                # not have been stored, so it is sent again with the same key.
                record.attempts.append(Attempt(started, time.monotonic(), type(error).__name__))
            else:
                record.attempts.append(Attempt(started, time.monotonic(), str(response.status)))
                if 200 <= response.status < 300:
                    record.incident_ids.append(response.body["incident_id"])
                    record.replayed.append(response.body["replayed"])
                    return
                if response.status < 500:
                    record.client_errors.append(response)
                    return
                record.server_errors.append(response)
            if time.monotonic() > deadline:
                return
            time.sleep(RETRY_BACKOFF_SECONDS)


def stored_reports(owner_url: str) -> dict[str, list[str]]:
    """Return the incident ids of the tenant's ReportSubmitted events, by idempotency key."""
    with psycopg.connect(owner_url) as conn:
        rows = conn.execute(
            """
            SELECT metadata->>'idempotency_key', payload->>'incident_id'
            FROM events WHERE tenant_id = %s AND event_type = 'ReportSubmitted'
            ORDER BY position
            """,
            (TENANT,),
        ).fetchall()
    stored: dict[str, list[str]] = {}
    for key, incident_id in rows:
        stored.setdefault(key, []).append(incident_id)
    return stored


def projected_incidents(owner_url: str) -> set[str]:
    with psycopg.connect(owner_url) as conn:
        rows = conn.execute(
            "SELECT incident_id::text FROM incidents WHERE tenant_id = %s", (TENANT,)
        ).fetchall()
    return {row[0] for row in rows}


def get_status(base: str, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"{base}{path}", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()
    except (OSError, http.client.HTTPException):
        return 0, None


def projections_caught_up(base: str) -> bool:
    status, body = get_status(base, "/status")
    if status != 200:
        return False
    projections = body["projections"]
    return len(projections) == len(default_projections()) and all(
        item["caught_up"] for item in projections
    )


def test_checked_pool_replaces_dead_idle_connections(private_server: PrivateServer) -> None:
    pool = checked_pool(private_server.owner_url, min_size=1, max_size=8, name="restart-test")
    with pool:
        # Fill the pool with idle connections, all of which the restart ends.
        held = [pool.getconn() for _ in range(8)]
        for conn in held:
            pool.putconn(conn)
        private_server.stop()
        private_server.start()

        started = time.monotonic()
        with pool.connection(timeout=10) as conn:
            row = conn.execute("SELECT 1").fetchone()
        elapsed = time.monotonic() - started

    assert row == (1,)
    # Checked one by one, eight dead connections would wait out psycopg_pool's backoff of
    # 0, 1, 2, 4, 8 s and more between checks, past the 10 s timeout.
    assert elapsed < IDLE_RESTART_RESPONSE_SECONDS


def wait_for_more_reports(clients: Clients, count: int) -> None:
    target = clients.stored_count() + count
    wait_for(
        lambda: clients.stored_count() >= target,
        60,
        f"the clients did not store {count} more reports",
    )


def restart_under_load(
    server: PrivateServer, clients: Clients, processes: list[subprocess.Popen[bytes]]
) -> list[tuple[float, float]]:
    """Restart the server RESTARTS times while the clients submit, and return each outage.

    Before each restart and after the last one, the clients must store new reports, which
    shows that the API works again after a restart without being restarted itself.
    """
    outages = []
    for _ in range(RESTARTS):
        wait_for_more_reports(clients, REPORTS_BETWEEN_RESTARTS)
        assert [process.poll() for process in processes] == [None] * len(processes)
        stopping = time.monotonic()
        server.stop()
        time.sleep(OUTAGE_SECONDS)
        server.start()
        outages.append((stopping, time.monotonic()))
    wait_for_more_reports(clients, REPORTS_BETWEEN_RESTARTS)
    return outages


def overlaps(attempt: Attempt, outage: tuple[float, float]) -> bool:
    stopping, started = outage
    return attempt.started <= started and attempt.ended >= stopping


@pytest.mark.slow
def test_reports_survive_database_restarts(private_server: PrivateServer, tmp_path: Path) -> None:
    env = cli_env(private_server.owner_url, tmp_path / "unused-embedded-data")
    migrated = civicpulse("migrate", env=env)
    assert migrated.returncode == 0, migrated.stderr
    created = civicpulse("tenant", "create", TENANT, env=env)
    assert created.returncode == 0, created.stderr
    issued = civicpulse(
        "key", "issue", "--tenant", TENANT, "--role", "staff", "--name", "restart-test", env=env
    )
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    api_log = tmp_path / "serve.log"
    projector_log = tmp_path / "project.log"
    api = start_process(["serve", "--port", str(port)], env, api_log)
    projector = start_process(["project"], env, projector_log)
    try:
        first_pid = private_server.postmaster_pid()
        wait_for(lambda: get_status(base, "/health")[0] == 200, 60, "the API did not start")
        clients = Clients(base, token)
        clients.start()
        try:
            outages = restart_under_load(private_server, clients, [api, projector])
        finally:
            clients.stop()
        last_pid = private_server.postmaster_pid()

        records = {record.key: record for record in clients.records}
        acknowledged = {key: record for key, record in records.items() if record.incident_ids}
        attempts = [attempt for record in records.values() for attempt in record.attempts]
        server_errors = [error for record in records.values() for error in record.server_errors]
        stored = stored_reports(private_server.owner_url)
        # Shown when the test fails, or with -s.
        failed = Counter(a.outcome for a in attempts if not a.outcome.startswith("2"))
        retried = sum(len(record.attempts) > 1 for record in records.values())
        replayed = sum(any(record.replayed) for record in records.values())
        print(
            f"keys {len(records)}, attempts {len(attempts)}, keys retried {retried}, "
            f"keys replayed {replayed}, failed attempts {sorted(failed.items())}"
        )

        # The server really restarted, and clients were submitting while it was down.
        assert len(outages) == RESTARTS
        assert last_pid != first_pid
        for outage in outages:
            assert any(overlaps(attempt, outage) for attempt in attempts), outage

        # Only requests that overlapped an outage failed. A request sent after the server was
        # back gets a working connection: the pool replaces the sessions the restart ended.
        failed_later = [
            (record.key, attempt)
            for record in records.values()
            for attempt in record.attempts
            if not attempt.outcome.startswith("2")
            and not any(overlaps(attempt, outage) for outage in outages)
        ]
        assert failed_later == []

        # Every key was stored within its deadline, and nothing was refused as invalid.
        assert [key for key, record in records.items() if record.client_errors] == []
        assert sorted(set(records) - set(acknowledged)) == []

        # A 5xx is a 503 problem document with Retry-After, never a 500.
        assert sorted({error.status for error in server_errors} - {503}) == []
        for error in server_errors:
            assert error.content_type == "application/problem+json", error
            assert error.retry_after is not None, error
            assert error.body["status"] == 503, error

        # Each key that got a 2xx is stored exactly once, as the incident every response named.
        for key, record in acknowledged.items():
            assert len(set(record.incident_ids)) == 1, (key, record.incident_ids)
            assert stored.get(key) == record.incident_ids[:1], (key, stored.get(key))
        # No report was stored under a key that no client sent.
        assert sorted(set(stored) - set(records)) == []
        # A key that never got a 2xx is stored at most once: its request may have committed
        # and lost its response. The assertions above expect no such key in this run.
        for key in set(records) - set(acknowledged):
            assert len(stored.get(key, [])) <= 1, (key, stored.get(key))

        # A response marked replayed means an earlier attempt of the same key was stored, so it
        # must follow a failed attempt: each key is sent by one client, one attempt at a time.
        for key, record in acknowledged.items():
            if record.replayed[0]:
                assert len(record.attempts) > 1, (key, record.attempts)

        # Restart once more with no request in flight, so that every pooled connection of the
        # API is idle and dead afterwards. The first request must still succeed at once.
        private_server.stop()
        private_server.start()
        assert private_server.postmaster_pid() != last_pid
        sent = time.monotonic()
        assert get_status(base, "/health")[0] == 200
        assert time.monotonic() - sent < IDLE_RESTART_RESPONSE_SECONDS

        # Sending every key again returns the stored incident and stores nothing new.
        for key, record in records.items():
            response = post_report(base, token, key)
            # A replay repeats the first response, status included.
            assert response.status == 201, (key, response)
            assert response.body["replayed"] is True, (key, response)
            expected = record.incident_ids[0] if record.incident_ids else stored[key][0]
            assert response.body["incident_id"] == expected, (key, response)
        assert stored_reports(private_server.owner_url) == stored

        # The projector reconnects and catches up by itself, without being restarted.
        stored_incidents = {ids[0] for ids in stored.values()}
        wait_for(
            lambda: projected_incidents(private_server.owner_url) >= stored_incidents,
            PROJECTOR_CATCH_UP_SECONDS,
            "the incidents read model did not get every stored report",
        )
        wait_for(
            lambda: projections_caught_up(base),
            PROJECTOR_CATCH_UP_SECONDS,
            "GET /status did not report every projection caught up",
        )
        assert projected_incidents(private_server.owner_url) == stored_incidents
        assert api.poll() is None, api_log.read_text()
        assert projector.poll() is None, projector_log.read_text()

        # Both processes stop cleanly.
        api.send_signal(signal.SIGTERM)
        projector.send_signal(signal.SIGTERM)
        assert api.wait(30) == 0, api_log.read_text()
        assert projector.wait(30) == 0, projector_log.read_text()
    finally:
        for process in (api, projector):
            if process.poll() is None:
                process.kill()
                process.wait()

    # Each projection worker logged losing its connection and getting it back.
    projector_output = projector_log.read_text()
    for name in ("incidents", "sla"):
        assert f"projection worker {name} lost its database connection" in projector_output
        assert f"projection worker {name} reconnected" in projector_output
    # The API logged every 503 it returned. A client that timed out saw fewer.
    logged = api_log.read_text().count(f"database unavailable on POST /tenants/{TENANT}/incidents")
    assert logged >= len(server_errors)
