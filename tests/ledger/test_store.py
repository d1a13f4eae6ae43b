from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.database import Database, set_tenant
from ledger.errors import (
    ConcurrencyError,
    IdempotencyKeyReused,
    InvalidEventData,
    StreamTenantMismatch,
)
from ledger.events import NewEvent, recorded_event_hash
from ledger.store import Checkpoint, PostgresEventStore, read_after

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def new_stream() -> str:
    return f"incident-{uuid.uuid4()}"


def event(n: int = 0, **payload: Any) -> NewEvent:
    return NewEvent("Noted", {"n": n, **payload}, T0 + timedelta(minutes=n))


def count_events(store: PostgresEventStore, stream_id: str, tenant_id: str = "acme") -> int:
    with store.pool.connection() as conn:
        set_tenant(conn, tenant_id)
        row = conn.execute(
            "SELECT count(*) FROM events WHERE stream_id = %s", (stream_id,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_append_then_read_stream(store: PostgresEventStore) -> None:
    stream = new_stream()
    first = store.append("acme", stream, [event(1), event(2)], expected_version=0)
    second = store.append("acme", stream, [event(3)], expected_version=2)

    events = store.read_stream("acme", stream)
    assert [e.stream_version for e in events] == [1, 2, 3]
    assert [e.payload["n"] for e in events] == [1, 2, 3]
    assert first.stream_version == 2
    assert second.stream_version == 3
    assert second.positions[0] > first.positions[-1]
    assert all(e.tenant_id == "acme" for e in events)
    assert all(e.recorded_at >= e.occurred_at for e in events)


def test_hash_chain_links_stream(store: PostgresEventStore) -> None:
    stream = new_stream()
    store.append("acme", stream, [event(1), event(2)], expected_version=0)
    store.append(
        "acme",
        stream,
        [event(3, text="ünïcode ✓", nested={"b": [1, 2.5], "a": None})],
        expected_version=2,
    )

    previous = None
    for recorded in store.read_stream("acme", stream):
        assert recorded.hash == recorded_event_hash(recorded, previous)
        previous = recorded.hash


def test_wrong_expected_version_stores_nothing(store: PostgresEventStore) -> None:
    stream = new_stream()
    store.append("acme", stream, [event(1)], expected_version=0)

    with pytest.raises(ConcurrencyError) as raised:
        store.append("acme", stream, [event(2)], expected_version=0)

    assert raised.value.actual == 1
    assert "version 1" in str(raised.value)
    assert count_events(store, stream) == 1


def test_new_stream_with_nonzero_expected_version(store: PostgresEventStore) -> None:
    with pytest.raises(ConcurrencyError):
        store.append("acme", new_stream(), [event(1)], expected_version=3)


def test_concurrent_appends_store_exactly_one(store: PostgresEventStore) -> None:
    stream = new_stream()
    store.append("acme", stream, [event(0)], expected_version=0)
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def attempt(n: int) -> None:
        barrier.wait()
        try:
            store.append("acme", stream, [event(n)], expected_version=1)
            outcomes.append("stored")
        except ConcurrencyError:
            outcomes.append("conflict")

    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(1, 9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert outcomes.count("stored") == 1
    assert outcomes.count("conflict") == 7
    assert count_events(store, stream) == 2


def test_repeated_event_id_returns_first_result(store: PostgresEventStore) -> None:
    stream = new_stream()
    original = event(1)
    first = store.append("acme", stream, [original], expected_version=0)
    again = store.append("acme", stream, [original], expected_version=0)

    assert again.replayed
    assert again.positions == first.positions
    assert again.stream_version == first.stream_version
    assert count_events(store, stream) == 1


def test_repeated_event_id_with_other_body_rejected(store: PostgresEventStore) -> None:
    stream = new_stream()
    original = event(1)
    store.append("acme", stream, [original], expected_version=0)
    changed = NewEvent("Noted", {"n": 99}, original.occurred_at, event_id=original.event_id)

    with pytest.raises(IdempotencyKeyReused):
        store.append("acme", stream, [changed], expected_version=1)
    assert count_events(store, stream) == 1


def test_concurrent_retries_store_once(store: PostgresEventStore) -> None:
    stream = new_stream()
    original = event(1)
    barrier = threading.Barrier(6)
    results = []

    def attempt() -> None:
        barrier.wait()
        results.append(store.append("acme", stream, [original], expected_version=0))

    threads = [threading.Thread(target=attempt) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(results) == 6
    assert len({r.positions for r in results}) == 1
    assert sum(not r.replayed for r in results) == 1
    assert count_events(store, stream) == 1


def test_stream_of_other_tenant_rejected(store: PostgresEventStore) -> None:
    stream = new_stream()
    store.append("acme", stream, [event(1)], expected_version=0)

    with pytest.raises(StreamTenantMismatch):
        store.append("globex", stream, [event(2)], expected_version=None)
    assert count_events(store, stream) == 1
    assert store.read_stream("globex", stream) == []


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"text": "a\x00b"}, "NUL"),
        ({"a\x00": 1}, "NUL"),
        ({"value": float("nan")}, "finite"),
        ({"value": float("inf")}, "finite"),
        ({"value": 2**70}, "64-bit"),
        ({"value": {1, 2}}, "JSON types"),
    ],
)
def test_payload_that_jsonb_would_change_rejected(
    store: PostgresEventStore, payload: dict[str, Any], message: str
) -> None:
    stream = new_stream()
    with pytest.raises(InvalidEventData, match=message):
        store.append("acme", stream, [NewEvent("Noted", payload, T0)], expected_version=0)
    assert count_events(store, stream) == 0


def test_naive_occurred_at_rejected(store: PostgresEventStore) -> None:
    with pytest.raises(InvalidEventData, match="time zone"):
        store.append(
            "acme", new_stream(), [NewEvent("Noted", {}, datetime(2026, 1, 1))], expected_version=0
        )


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(
                alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
                max_size=8,
            ),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    payload=st.dictionaries(
        st.text(
            alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
            min_size=1,
            max_size=6,
        ),
        json_values,
        max_size=5,
    )
)
def test_hash_survives_jsonb_round_trip(store: PostgresEventStore, payload: dict[str, Any]) -> None:
    stream = new_stream()
    store.append("acme", stream, [NewEvent("Noted", payload, T0)], expected_version=0)

    (recorded,) = store.read_stream("acme", stream)
    assert recorded.hash == recorded_event_hash(recorded, None)


@pytest.mark.parametrize("role", ["app", "worker"])
def test_roles_cannot_update_or_delete(
    database: Database, store: PostgresEventStore, role: str
) -> None:
    stream = new_stream()
    store.append("acme", stream, [event(1)], expected_version=0)
    connect = database.connect if role == "app" else database.connect_worker

    for statement in (
        "UPDATE events SET payload = '{}' WHERE stream_id = %s",
        "DELETE FROM events WHERE stream_id = %s",
    ):
        with connect() as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
            set_tenant(conn, "acme")
            conn.execute(statement, (stream,))
    with connect() as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("TRUNCATE events")
    assert count_events(store, stream) == 1


def test_trigger_stops_even_the_owner(database: Database, store: PostgresEventStore) -> None:
    stream = new_stream()
    store.append("acme", stream, [event(1)], expected_version=0)

    for statement in (
        "UPDATE events SET payload = '{}' WHERE stream_id = %s",
        "DELETE FROM events WHERE stream_id = %s",
    ):
        with (
            database.connect_owner() as conn,
            pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"),
        ):
            conn.execute(statement, (stream,))
    with (
        database.connect_owner() as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"),
    ):
        conn.execute("TRUNCATE events")
    assert count_events(store, stream) == 1


@pytest.mark.parametrize("role", ["app", "worker"])
def test_roles_own_nothing(database: Database, role: str) -> None:
    connect = database.connect if role == "app" else database.connect_worker
    with connect() as conn:
        owned = conn.execute(
            "SELECT count(*) FROM pg_class WHERE relowner = (SELECT oid FROM pg_roles "
            "WHERE rolname = current_user)"
        ).fetchone()
        flags = conn.execute(
            "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
    assert owned == (0,)
    assert flags == (False, False)


def test_reader_waits_for_earlier_open_transaction(
    fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    early_stream, late_stream = new_stream(), new_stream()

    # The early transaction takes its position first and stays open.
    early = fresh_database.connect_worker()
    early.execute(
        """
        INSERT INTO events (tenant_id, stream_id, stream_version, event_type, schema_version,
            payload, metadata, occurred_at, event_id, hash)
        VALUES ('acme', %s, 1, 'Noted', 1, '{"n": 1}', '{}', now(), gen_random_uuid(),
            decode(repeat('00', 32), 'hex'))
        """,
        (early_stream,),
    )
    fresh_store.append("acme", late_stream, [event(2)], expected_version=0)

    with fresh_database.connect_worker(autocommit=True) as reader:
        seen_while_open = read_after(reader, Checkpoint(), 100)
        early.commit()
        early.close()
        seen_after_commit = read_after(reader, Checkpoint(), 100)

    assert seen_while_open == []
    assert [e.stream_id for e in seen_after_commit] == [early_stream, late_stream]
    positions = [(e.tx_id, e.position) for e in seen_after_commit]
    assert positions == sorted(positions)


def test_reader_leaves_out_unread_payloads(
    fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    stream = new_stream()
    events = [
        NewEvent("Noted", {"n": 1}, T0, metadata={"actor": "alice"}),
        NewEvent("Flagged", {"n": 2}, T0, metadata={"actor": "bob"}),
        NewEvent("Noted", {"n": 3}, T0, metadata={"actor": "carol"}),
    ]
    fresh_store.append("acme", stream, events, expected_version=0)

    with fresh_database.connect_worker(autocommit=True) as reader:
        deadline = time.monotonic() + 60
        while len(full := read_after(reader, Checkpoint(), 100)) < 3:
            assert time.monotonic() < deadline, "the horizon did not pass the events"
            time.sleep(0.05)
        partial = read_after(reader, Checkpoint(), 100, payload_types={"Flagged"})

    assert [e.event_type for e in partial] == ["Noted", "Flagged", "Noted"]
    assert [(e.payload, e.metadata) for e in partial] == [
        ({}, {}),
        ({"n": 2}, {"actor": "bob"}),
        ({}, {}),
    ]
    assert partial == [
        e if e.event_type == "Flagged" else dataclasses.replace(e, payload={}, metadata={})
        for e in full
    ]


def test_repeated_id_in_one_append_rejected(store: PostgresEventStore) -> None:
    stream = new_stream()
    twice = event(1)

    with pytest.raises(ValueError, match=f"event id {twice.event_id} appears more than once"):
        store.append("acme", stream, [twice, twice], expected_version=0)

    assert count_events(store, stream) == 0
