"""Group commit: many writers, one transaction per batch, each caller its own result."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from ledger.database import Database
from ledger.errors import (
    ConcurrencyError,
    IdempotencyKeyReused,
    StreamTenantMismatch,
    TenantNotFound,
)
from ledger.events import NewEvent
from ledger.group_commit import GroupCommitter, GroupCommitTimeout
from ledger.store import AppendResult, PostgresEventStore
from ledger.tenants import (
    cache_tenant_configs,
    config_versions_of_request,
    create_tenant,
    record_config_version,
    tenant_stream_id,
)
from ledger.verification import verify

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def noted(n: int, event_id: uuid.UUID | None = None) -> NewEvent:
    if event_id is None:
        return NewEvent("Noted", {"n": n}, T0)
    return NewEvent("Noted", {"n": n}, T0, event_id=event_id)


def new_tenant(store: PostgresEventStore) -> str:
    tenant_id = f"gc-{uuid.uuid4().hex[:10]}"
    create_tenant(store, tenant_id, name="Group commit", time_zone="UTC", occurred_at=T0)
    return tenant_id


@pytest.fixture
def committer(session_pool: ConnectionPool[Any]) -> Iterator[GroupCommitter]:
    """A committer with one worker, so that units queued while it is held form one batch."""
    committer = GroupCommitter(session_pool, workers=1, name="test-group-commit")
    yield committer
    committer.stop()


@pytest.fixture
def batched(session_pool: ConnectionPool[Any], committer: GroupCommitter) -> PostgresEventStore:
    return PostgresEventStore(session_pool, committer=committer)


def stored(database: Database, tenant_id: str) -> list[tuple[Any, ...]]:
    """Return (stream id, version, tx id, event id, payload n) of the tenant's events."""
    with database.connect_owner() as conn:
        return conn.execute(
            "SELECT stream_id, stream_version, tx_id::text, event_id, payload->>'n' "
            "FROM events WHERE tenant_id = %s AND event_type = 'Noted' ORDER BY position",
            (tenant_id,),
        ).fetchall()


def hold_worker(committer: GroupCommitter) -> tuple[threading.Event, threading.Thread]:
    """Occupy the committer's workers until the returned event is set, so that the units
    submitted meanwhile queue up and form one batch."""
    release = threading.Event()
    running = threading.Event()

    def wait(_: psycopg.Connection[Any]) -> None:
        running.set()
        assert release.wait(30)

    thread = threading.Thread(
        target=committer.run, args=("gc-hold", wait), kwargs={"lock_key": "hold"}
    )
    thread.start()
    assert running.wait(30), "the committer did not start the holding unit"
    return release, thread


def wait_for_queue(committer: GroupCommitter, size: int) -> None:
    deadline = time.monotonic() + 30
    while committer._queue.qsize() != size:
        assert time.monotonic() < deadline, f"queue never reached {size} units"
        time.sleep(0.01)


def run_batch(
    committer: GroupCommitter, calls: list[Callable[[], Any]]
) -> list[tuple[Any, BaseException | None]]:
    """Run `calls` in threads while the workers are held, so they commit as one batch."""
    release, _ = hold_worker(committer)
    outcomes: list[tuple[Any, BaseException | None]] = [(None, None)] * len(calls)

    def call(index: int) -> None:
        try:
            outcomes[index] = (calls[index](), None)
        except Exception as error:
            outcomes[index] = (None, error)

    threads = [threading.Thread(target=call, args=(index,)) for index in range(len(calls))]
    for thread in threads:
        thread.start()
    wait_for_queue(committer, len(calls))
    release.set()
    for thread in threads:
        thread.join(30)
    return outcomes


def test_concurrent_writers_lose_nothing(
    session_pool: ConnectionPool[Any], database: Database
) -> None:
    committer = GroupCommitter(session_pool, workers=2, name="test-many-writers")
    batched = PostgresEventStore(session_pool, committer=committer)
    tenant_id = new_tenant(batched)
    shared = [f"incident-{uuid.uuid4()}" for _ in range(4)]

    def write(n: int) -> tuple[str, AppendResult | ConcurrencyError]:
        # Every third writer races on a shared stream with the version it read: some lose.
        if n % 3 == 0:
            stream = shared[n % len(shared)]
            version = batched.stream_version(tenant_id, stream)
            try:
                return stream, batched.append(
                    tenant_id, stream, [noted(n)], expected_version=version
                )
            except ConcurrencyError as error:
                return stream, error
        stream = f"incident-{uuid.uuid4()}"
        return stream, batched.append(tenant_id, stream, [noted(n)], expected_version=0)

    try:
        with ThreadPoolExecutor(max_workers=32) as pool:
            outcomes = list(pool.map(write, range(600)))
    finally:
        committer.stop()

    appended = [(stream, result) for stream, result in outcomes if isinstance(result, AppendResult)]
    conflicts = [result for _, result in outcomes if isinstance(result, ConcurrencyError)]
    rows = stored(database, tenant_id)
    positions = [position for _, result in appended for position in result.positions]
    tx_ids = Counter(row[2] for row in rows)

    assert len(appended) + len(conflicts) == 600
    assert conflicts, "no writer lost a race on the shared streams"
    assert len(rows) == len(appended)
    assert len(set(positions)) == len(positions)
    # Each stored event is one whose writer got an AppendResult, and no other.
    assert sorted(int(row[4]) for row in rows) == [
        n for n, (_, result) in enumerate(outcomes) if isinstance(result, AppendResult)
    ]
    for stream in shared:
        versions = [row[1] for row in rows if row[0] == stream]
        assert versions == list(range(1, len(versions) + 1))
    # Fewer transactions than appends: batches formed.
    assert len(tx_ids) < len(rows)
    assert verify(database, tenant_id).ok


def test_one_broken_append_fails_alone(
    batched: PostgresEventStore, committer: GroupCommitter, database: Database
) -> None:
    tenant_id = new_tenant(batched)
    streams = [f"incident-{uuid.uuid4()}" for _ in range(3)]

    def broken(conn: psycopg.Connection[Any]) -> None:
        batched.append(tenant_id, streams[1], [noted(1)], expected_version=0, conn=conn)
        conn.execute("SELECT 1 / 0")

    outcomes = run_batch(
        committer,
        [
            lambda: batched.append(tenant_id, streams[0], [noted(0)], expected_version=0),
            lambda: committer.run(tenant_id, broken, lock_key=streams[1]),
            lambda: batched.append(tenant_id, streams[2], [noted(2)], expected_version=0),
        ],
    )
    rows = stored(database, tenant_id)

    assert isinstance(outcomes[0][0], AppendResult)
    assert isinstance(outcomes[1][1], psycopg.errors.DivisionByZero)
    assert isinstance(outcomes[2][0], AppendResult)
    assert sorted(row[0] for row in rows) == sorted([streams[0], streams[2]])
    assert rows[0][2] == rows[1][2], "the neighbours were not committed together"
    assert verify(database, tenant_id).ok


def test_conflicts_and_mismatches_fail_alone(
    batched: PostgresEventStore, committer: GroupCommitter, database: Database
) -> None:
    tenant_id = new_tenant(batched)
    other_tenant = new_tenant(batched)
    theirs = f"incident-{uuid.uuid4()}"
    batched.append(other_tenant, theirs, [noted(0)], expected_version=0)
    existing = f"incident-{uuid.uuid4()}"
    batched.append(tenant_id, existing, [noted(0)], expected_version=0)
    fresh = f"incident-{uuid.uuid4()}"
    reused = uuid.uuid4()
    batched.append(tenant_id, f"incident-{uuid.uuid4()}", [noted(5, reused)], expected_version=0)

    outcomes = run_batch(
        committer,
        [
            lambda: batched.append(tenant_id, existing, [noted(1)], expected_version=5),
            lambda: batched.append(tenant_id, theirs, [noted(2)], expected_version=None),
            lambda: batched.append(tenant_id, fresh, [noted(3)], expected_version=0),
            lambda: batched.append(other_tenant, theirs, [noted(4)], expected_version=1),
            lambda: batched.append(tenant_id, fresh, [noted(6, reused)], expected_version=None),
        ],
    )

    assert isinstance(outcomes[0][1], ConcurrencyError)
    assert outcomes[0][1].actual == 1
    assert isinstance(outcomes[1][1], StreamTenantMismatch)
    assert outcomes[2][0].stream_version == 1
    # Each unit runs with its own tenant set, so a batch may mix tenants.
    assert outcomes[3][0].stream_version == 2
    assert isinstance(outcomes[4][1], IdempotencyKeyReused)
    assert [row[4] for row in stored(database, tenant_id) if row[0] == fresh] == ["3"]
    assert [row[4] for row in stored(database, other_tenant)] == ["0", "4"]
    assert verify(database, tenant_id).ok
    assert verify(database, other_tenant).ok


def test_same_request_twice_in_one_batch(
    batched: PostgresEventStore, committer: GroupCommitter, database: Database
) -> None:
    tenant_id = new_tenant(batched)
    stream = f"incident-{uuid.uuid4()}"
    event = noted(7, uuid.uuid4())

    outcomes = run_batch(
        committer,
        [lambda: batched.append(tenant_id, stream, [event], expected_version=0)] * 3,
    )

    results = [result for result, _ in outcomes]
    assert all(isinstance(result, AppendResult) for result in results)
    assert sorted(result.replayed for result in results) == [False, True, True]
    assert {result.positions for result in results} == {results[0].positions}
    assert len(stored(database, tenant_id)) == 1


def test_killed_connection_fails_whole_batch(
    batched: PostgresEventStore, committer: GroupCommitter, database: Database
) -> None:
    tenant_id = new_tenant(batched)
    streams = [f"incident-{uuid.uuid4()}" for _ in range(3)]

    def killed(conn: psycopg.Connection[Any]) -> None:
        batched.append(tenant_id, streams[1], [noted(1)], expected_version=0, conn=conn)
        conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")

    outcomes = run_batch(
        committer,
        [
            lambda: batched.append(tenant_id, streams[0], [noted(0)], expected_version=0),
            lambda: committer.run(tenant_id, killed, lock_key=streams[1]),
            lambda: batched.append(tenant_id, streams[2], [noted(2)], expected_version=0),
        ],
    )
    after = batched.append(tenant_id, streams[0], [noted(3)], expected_version=0)

    # The batch's transaction died with its connection: no caller may think it committed.
    assert all(isinstance(error, psycopg.OperationalError) for _, error in outcomes)
    assert after.stream_version == 1
    assert [row[0] for row in stored(database, tenant_id)] == [streams[0]]


def test_tenant_is_set_per_unit(committer: GroupCommitter, store: PostgresEventStore) -> None:
    tenants = [new_tenant(store) for _ in range(3)]

    def current(conn: psycopg.Connection[Any]) -> str:
        row = conn.execute("SELECT current_setting('civicpulse.tenant_id')").fetchone()
        assert row is not None
        return str(row[0])

    outcomes = run_batch(
        committer,
        [
            (lambda tenant=tenant: committer.run(tenant, current, lock_key=tenant))
            for tenant in tenants
        ],
    )

    assert [result for result, _ in outcomes] == tenants


def test_submits_with_contact_batch(
    batched: PostgresEventStore, committer: GroupCommitter, database: Database
) -> None:
    from ledger.commands import Actor, IncidentCommands

    tenant_id = new_tenant(batched)
    commands = IncidentCommands(batched)
    actor = Actor("resident app", "reporter")

    def submit(n: int, key: str) -> Any:
        return commands.submit(
            tenant_id,
            {"description": f"Broken bench {n}"},
            actor=actor,
            idempotency_key=key,
            reporter={"email": f"person{n}@example.org"},
        )

    outcomes = run_batch(
        committer,
        [
            lambda: submit(1, "k-1"),
            lambda: submit(1, "k-1"),
            lambda: submit(2, "k-2"),
            lambda: submit(3, "k-2"),
        ],
    )

    first, again, *same_key = outcomes
    assert first[0].incident_id == again[0].incident_id
    assert sorted([first[0].append.replayed, again[0].append.replayed]) == [False, True]
    # Two bodies under one key: whichever ran first is stored, and the other is rejected.
    stored_once = [result for result, _ in same_key if result is not None]
    rejected = [error for _, error in same_key if error is not None]
    assert len(stored_once) == 1
    assert stored_once[0].append.replayed is False
    assert len(rejected) == 1
    assert isinstance(rejected[0], IdempotencyKeyReused)
    with database.connect_owner() as conn:
        reporters = conn.execute(
            "SELECT count(*) FROM reporter_keys WHERE tenant_id = %s", (tenant_id,)
        ).fetchone()
    assert reporters is not None and reporters[0] == 2


def test_race_with_other_writer_falls_back(
    batched: PostgresEventStore, committer: GroupCommitter, database: Database
) -> None:
    tenant_id = new_tenant(batched)
    contested = f"incident-{uuid.uuid4()}"
    neighbours = [f"incident-{uuid.uuid4()}" for _ in range(2)]
    # Another transaction creates the contested stream and commits while the batch runs.
    other = psycopg.connect(database.app_conninfo)  # not autocommit: a transaction opens
    other_store = PostgresEventStore(batched.pool)
    other_store.append(tenant_id, contested, [noted(9)], expected_version=0, conn=other)
    timer = threading.Timer(1.0, other.commit)
    timer.start()
    outcomes = run_batch(
        committer,
        [
            lambda: batched.append(tenant_id, neighbours[0], [noted(0)], expected_version=0),
            lambda: batched.append(tenant_id, contested, [noted(1)], expected_version=0),
            lambda: batched.append(tenant_id, neighbours[1], [noted(2)], expected_version=0),
        ],
    )
    timer.join()
    other.close()
    rows = stored(database, tenant_id)

    assert isinstance(outcomes[0][0], AppendResult)
    assert isinstance(outcomes[1][1], ConcurrencyError)
    assert outcomes[1][1].actual == 1
    assert isinstance(outcomes[2][0], AppendResult)
    assert sorted((row[0], row[4]) for row in rows) == sorted(
        [(neighbours[0], "0"), (contested, "9"), (neighbours[1], "2")]
    )
    assert verify(database, tenant_id).ok


def test_batch_creating_stream_waits_without_deadlock(
    session_pool: ConnectionPool[Any],
    committer: GroupCommitter,
    batched: PostgresEventStore,
    database: Database,
) -> None:
    # An append outside the batch creates stream `a` and then wants stream `b`, which the
    # batch also writes. Locking in stream order, the batch waits for `a` before it locks
    # `b`, so the other append gets `b` and both finish.
    plain = PostgresEventStore(session_pool)
    tenant_id = new_tenant(plain)
    first, second = f"incident-a-{uuid.uuid4()}", f"incident-b-{uuid.uuid4()}"
    plain.append(tenant_id, second, [noted(0)], expected_version=0)

    release, holder = hold_worker(committer)
    outcomes: list[Any] = [None, None]

    def call(index: int, stream_id: str, expected: int) -> None:
        try:
            outcomes[index] = batched.append(
                tenant_id, stream_id, [noted(10 + index)], expected_version=expected
            )
        except Exception as error:
            outcomes[index] = error

    threads = [
        threading.Thread(target=call, args=(0, first, 0)),
        threading.Thread(target=call, args=(1, second, 1)),
    ]
    with session_pool.connection() as conn, conn.transaction():
        plain.append(tenant_id, first, [noted(1)], expected_version=0, conn=conn)
        for thread in threads:
            thread.start()
        wait_for_queue(committer, 2)
        release.set()
        time.sleep(1.5)  # the batch runs now, and would lock `b` out of order if it could
        plain.append(tenant_id, second, [noted(2)], expected_version=1, conn=conn)
    for thread in [*threads, holder]:
        thread.join(30)

    assert not any(isinstance(outcome, psycopg.errors.DeadlockDetected) for outcome in outcomes)
    assert isinstance(outcomes[0], ConcurrencyError)
    assert isinstance(outcomes[1], ConcurrencyError)
    assert [row[4] for row in stored(database, tenant_id)] == ["0", "1", "2"]


def test_async_writers_on_one_loop_lose_nothing(
    session_pool: ConnectionPool[Any], database: Database
) -> None:
    committer = GroupCommitter(session_pool, workers=2, name="test-async-writers")
    batched = PostgresEventStore(session_pool, committer=committer)
    tenant_id = new_tenant(batched)
    shared = [f"incident-{uuid.uuid4()}" for _ in range(4)]

    async def write(n: int) -> tuple[str, AppendResult | ConcurrencyError]:
        # Every third writer races on a shared stream with the version it read: some lose.
        stream = shared[n % len(shared)] if n % 3 == 0 else f"incident-{uuid.uuid4()}"
        version = await asyncio.to_thread(batched.stream_version, tenant_id, stream)
        try:
            return stream, await batched.append_async(
                tenant_id, stream, [noted(n)], expected_version=version
            )
        except ConcurrencyError as error:
            return stream, error

    async def write_all() -> list[tuple[str, AppendResult | ConcurrencyError]]:
        return await asyncio.gather(*(write(n) for n in range(300)))

    try:
        outcomes = asyncio.run(write_all())
    finally:
        committer.stop()

    appended = [result for _, result in outcomes if isinstance(result, AppendResult)]
    rows = stored(database, tenant_id)
    assert any(isinstance(result, ConcurrencyError) for _, result in outcomes)
    assert sorted(int(row[4]) for row in rows) == [
        n for n, (_, result) in enumerate(outcomes) if isinstance(result, AppendResult)
    ]
    assert len({position for result in appended for position in result.positions}) == len(rows)
    for stream in shared:
        versions = [row[1] for row in rows if row[0] == stream]
        assert versions == list(range(1, len(versions) + 1))
    assert len(Counter(row[2] for row in rows)) < len(rows), "no batch formed"
    assert verify(database, tenant_id).ok


def test_abandoned_async_wait_still_commits(
    session_pool: ConnectionPool[Any], database: Database
) -> None:
    committer = GroupCommitter(session_pool, workers=1, name="test-async-timeout")
    batched = PostgresEventStore(session_pool, committer=committer)
    tenant_id = new_tenant(batched)
    timed_out, cancelled, later = (f"incident-{uuid.uuid4()}" for _ in range(3))

    async def scenario() -> AppendResult:
        release, holder = hold_worker(committer)
        # Short waits from here on; the holding unit waits with the default.
        committer.timeout_seconds = 0.2
        with pytest.raises(GroupCommitTimeout, match=timed_out):
            await batched.append_async(tenant_id, timed_out, [noted(1)], expected_version=0)
        waiting = asyncio.create_task(
            batched.append_async(tenant_id, cancelled, [noted(2)], expected_version=0)
        )
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        release.set()
        await asyncio.to_thread(holder.join, 30)
        return await batched.append_async(tenant_id, later, [noted(3)], expected_version=0)

    try:
        result = asyncio.run(scenario())
    finally:
        committer.stop()

    # Both callers stopped waiting, yet their appends were in the queue and committed.
    assert result.stream_version == 1
    assert sorted(row[0] for row in stored(database, tenant_id)) == sorted(
        [timed_out, cancelled, later]
    )


def test_async_submit_of_cached_tenant_on_loop(
    batched: PostgresEventStore, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ledger.commands import Actor, IncidentCommands

    cache_tenant_configs(batched)
    tenant_id = new_tenant(batched)
    commands = IncidentCommands(batched)
    actor = Actor("resident app", "reporter")
    report = {"description": "Broken bench", "category": "Parks"}
    threads: list[str] = []
    to_thread = asyncio.to_thread

    async def counted_to_thread(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        threads.append(getattr(function, "__name__", "?"))
        return await to_thread(function, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counted_to_thread)

    async def submit(key: str, body: dict[str, Any], **kwargs: Any) -> Any:
        # As an API request does: authentication records the configuration's version.
        with config_versions_of_request():
            version = await to_thread(
                batched.stream_version, tenant_id, tenant_stream_id(tenant_id)
            )
            record_config_version(tenant_id, version)
            return await commands.submit_async(
                tenant_id, body, actor=actor, idempotency_key=key, **kwargs
            )

    async def scenario() -> list[Any]:
        # The first submit folds the configuration in a thread; it is cached after that.
        first = await submit("k-1", report)
        threads.clear()
        again = await submit("k-1", report)
        fresh = await submit("k-2", report)
        on_loop = list(threads)
        with pytest.raises(IdempotencyKeyReused):
            await submit("k-1", {**report, "description": "Another bench"})
        contact = await submit("k-3", report, reporter={"email": "ana@example.org"})
        with pytest.raises(TenantNotFound):
            await commands.submit_async("no-such-tenant", report, actor=actor)
        return [first, again, fresh, on_loop, contact]

    first, again, fresh, on_loop, contact = asyncio.run(scenario())

    assert on_loop == [], "a cached tenant's submit went through a thread"
    assert threads == ["submit", "submit"], "the contact and the unknown tenant need threads"
    assert again.incident_id == first.incident_id
    assert again.append.replayed
    assert not fresh.append.replayed
    assert fresh.incident_id != first.incident_id
    with database.connect_owner() as conn:
        payloads = dict(
            conn.execute(
                "SELECT payload->>'incident_id', payload FROM events "
                "WHERE tenant_id = %s AND event_type = 'ReportSubmitted'",
                (tenant_id,),
            ).fetchall()
        )
    assert set(payloads) == {
        str(first.incident_id),
        str(fresh.incident_id),
        str(contact.incident_id),
    }
    assert payloads[str(fresh.incident_id)]["description"] == "Broken bench"
    assert "contact" in payloads[str(contact.incident_id)]
    assert verify(database, tenant_id).ok
