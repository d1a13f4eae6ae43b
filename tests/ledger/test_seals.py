"""Seals over each tenant's log, and verification of chains and seals after tampering."""

from __future__ import annotations

import base64
import logging
import threading
import time
import uuid
from dataclasses import replace
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from ledger.database import Database
from ledger.errors import TenantNotFound
from ledger.events import NewEvent, event_hash, recorded_event_hash
from ledger.ids import incident_stream_id
from ledger.lifecycle import REPORT_SUBMITTED
from ledger.merkle import merkle_root
from ledger.seals import (
    LEAF_PREFIX_BYTES,
    SEAL_EVENT_TYPE,
    SealReport,
    leaf_data,
    seal_all,
    seal_event_id,
    seal_stream_id,
)
from ledger.store import Checkpoint, PostgresEventStore
from ledger.tenants import create_tenant
from ledger.verification import MismatchKind, verify
from tests.ledger.seal_helpers import (
    T0,
    add_incidents,
    seal_now,
    stored_seals,
    stream_event,
    tamper,
    tenant_events,
    wait_for_horizon,
)

# Tests that tamper with events or read the whole log use a database of their own.


@pytest.fixture
def sealed_tenant(fresh_database: Database, fresh_store: PostgresEventStore) -> list[str]:
    """A tenant "acme" with five incidents of three events each, sealed once."""
    create_tenant(fresh_store, "acme", name="Acme", time_zone="UTC", occurred_at=T0)
    streams = add_incidents(fresh_store, "acme", 5)
    seal_now(fresh_database, "acme")
    return streams


def test_sealed_tenant_verifies(
    database: Database, store: PostgresEventStore, tenant_id: str
) -> None:
    add_incidents(store, tenant_id, 4)

    seal = seal_now(database, tenant_id)
    result = verify(database, tenant_id)

    events = tenant_events(database, tenant_id)
    covered = [event for event in events if event.event_type != SEAL_EVENT_TYPE]
    leaves = [leaf_data(e.position, e.tx_id, e.recorded_at, e.hash) for e in covered]
    assert seal.event_count == len(covered) == 13  # the tenant's creation and 4 x 3 events
    assert seal.merkle_root == merkle_root(leaves)
    assert seal.after == Checkpoint()
    assert seal.through == Checkpoint(covered[-1].tx_id, covered[-1].position)
    assert seal.previous_root is None
    assert result.ok, result.mismatches
    assert [checked.tenant_id for checked in result.tenants] == [tenant_id]
    assert result.tenants[0].events == 14
    assert result.tenants[0].streams == 6
    assert result.tenants[0].seals == 1
    assert result.tenants[0].sealed_events == 13
    assert result.tenants[0].unsealed_events == 1  # the seal itself
    assert result.tenants[0].latest_seal == seal


def test_seal_event_is_stored_as_appended(
    database: Database, store: PostgresEventStore, tenant_id: str
) -> None:
    add_incidents(store, tenant_id, 2)

    seal = seal_now(database, tenant_id)

    [stored] = stored_seals(database, tenant_id)
    prefixes = base64.b64decode(stored.payload["leaf_prefixes"])
    assert stored.event_type == SEAL_EVENT_TYPE
    assert stored.stream_id == f"seals-{tenant_id}"
    assert stored.event_id == seal_event_id(tenant_id, seal.through)
    assert stored.position == seal.position
    assert stored.payload["merkle_root"] == seal.merkle_root.hex()
    assert stored.payload["event_count"] == 7
    assert stored.payload["after"] == {"tx_id": 0, "position": 0}
    assert stored.payload["through"] == {
        "tx_id": seal.through.tx_id,
        "position": seal.through.position,
    }
    assert stored.payload["previous_root"] is None
    assert stored.payload["algorithm"] == "rfc6962-sha256"
    assert len(prefixes) == 7 * LEAF_PREFIX_BYTES
    assert stored.metadata["actor"] == "cli"


def test_next_seal_links_to_previous(
    database: Database, store: PostgresEventStore, tenant_id: str
) -> None:
    add_incidents(store, tenant_id, 1)
    first = seal_now(database, tenant_id)
    add_incidents(store, tenant_id, 2)

    second = seal_now(database, tenant_id)
    result = verify(database, tenant_id)

    assert second.after == first.through
    assert second.previous_root == first.merkle_root
    assert second.stream_version == first.stream_version + 1
    assert second.event_count == 7  # the first seal and 2 x 3 events
    assert result.ok, result.mismatches
    assert result.tenants[0].sealed_events == first.event_count + second.event_count


def test_seal_alone_is_not_sealed_again(
    database: Database, store: PostgresEventStore, tenant_id: str
) -> None:
    add_incidents(store, tenant_id, 1)
    seal_now(database, tenant_id)
    wait_for_horizon(database, tenant_id)

    again = seal_all(database, tenant_id=tenant_id)

    assert again.sealed == []
    assert again.unchanged == [tenant_id]
    assert len(stored_seals(database, tenant_id)) == 1


def test_seal_all_seals_each_tenant_with_new_events(
    fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    for tenant in ("north", "south", "quiet"):
        create_tenant(fresh_store, tenant, name=tenant, time_zone="UTC", occurred_at=T0)
    seal_now(fresh_database, "quiet")
    add_incidents(fresh_store, "north", 2)
    add_incidents(fresh_store, "south", 1)
    for tenant in ("north", "south", "quiet"):
        wait_for_horizon(fresh_database, tenant)

    report = seal_all(fresh_database)

    assert sorted(seal.tenant_id for seal in report.sealed) == ["north", "south"]
    assert report.unchanged == ["quiet"]
    assert report.failed == {}
    assert verify(fresh_database).ok


def test_seal_unknown_tenant_is_not_found(database: Database) -> None:
    with pytest.raises(TenantNotFound, match="'no-such-tenant' not found"):
        seal_all(database, tenant_id="no-such-tenant")


def test_verify_unknown_tenant_is_not_found(database: Database) -> None:
    with pytest.raises(TenantNotFound, match="'no-such-tenant' not found"):
        verify(database, "no-such-tenant")


def test_unsealed_tenant_verifies_chains_only(
    database: Database, store: PostgresEventStore, tenant_id: str
) -> None:
    add_incidents(store, tenant_id, 2)

    result = verify(database, tenant_id)

    assert result.ok
    assert result.tenants[0].seals == 0
    assert result.tenants[0].unsealed_events == 7
    assert result.tenants[0].latest_seal is None


# Tampering -------------------------------------------------------------------------------


def test_changed_payload_is_named(fresh_database: Database, sealed_tenant: list[str]) -> None:
    target = stream_event(fresh_database, sealed_tenant[2], 2)
    changed = tamper(
        fresh_database,
        'UPDATE events SET payload = \'{"note": "never acknowledged"}\' WHERE position = %s',
        (target.position,),
    )

    result = verify(fresh_database)

    assert changed == 1
    assert not result.ok
    [mismatch] = result.mismatches  # the leaf covers the unchanged stored hash
    assert mismatch.kind == MismatchKind.CONTENT_HASH
    assert mismatch.tenant_id == "acme"
    assert mismatch.stream_id == sealed_tenant[2]
    assert mismatch.stream_version == 2
    assert mismatch.position == target.position
    assert mismatch.event_id == target.event_id
    assert mismatch.seal_version is None


@pytest.mark.parametrize(
    ("column", "change"),
    [
        ("recorded_at", "recorded_at = recorded_at - interval '1 microsecond'"),
        ("position", "position = DEFAULT"),  # the next value of the identity sequence
        ("tx_id", "tx_id = (tx_id::text::bigint - 1)::text::xid8"),
    ],
)
def test_changed_database_value_is_named_by_seal(
    fresh_database: Database, sealed_tenant: list[str], column: str, change: str
) -> None:
    target = stream_event(fresh_database, sealed_tenant[1], 3)
    [seal_event] = stored_seals(fresh_database, "acme")
    tamper(fresh_database, f"UPDATE events SET {change} WHERE event_id = %s", (target.event_id,))
    after = stream_event(fresh_database, sealed_tenant[1], 3)

    result = verify(fresh_database)

    assert getattr(after, column) != getattr(target, column)
    assert not result.ok
    [mismatch] = result.mismatches  # the stream hash does not cover this column
    assert mismatch.kind == MismatchKind.SEAL_ROOT
    assert mismatch.seal_version == 1
    assert mismatch.seal_position == seal_event.position
    assert mismatch.stream_id == sealed_tenant[1]
    assert mismatch.stream_version == 3
    assert mismatch.position == after.position
    assert mismatch.event_id == target.event_id


def test_deleted_event_is_reported(fresh_database: Database, sealed_tenant: list[str]) -> None:
    target = stream_event(fresh_database, sealed_tenant[3], 2)
    before = stream_event(fresh_database, sealed_tenant[3], 1)
    following = stream_event(fresh_database, sealed_tenant[3], 3)
    tamper(fresh_database, "DELETE FROM events WHERE position = %s", (target.position,))

    result = verify(fresh_database)
    kinds = [mismatch.kind for mismatch in result.mismatches]

    assert kinds == [MismatchKind.MISSING_VERSION, MismatchKind.SEAL_COUNT, MismatchKind.SEAL_COUNT]
    missing, count, gap = result.mismatches
    assert missing.stream_id == sealed_tenant[3]
    assert missing.stream_version == 2
    assert f"next stored event is version 3 at position {following.position}" in missing.detail
    assert count.seal_version == 1
    assert "held 16 events when it was sealed and holds 15 now" in count.detail
    assert gap.seal_version == 1
    assert f"after position {before.position} and before position {following.position}" in (
        gap.detail
    )


def test_deleted_last_event_is_reported(fresh_database: Database, sealed_tenant: list[str]) -> None:
    target = stream_event(fresh_database, sealed_tenant[0], 3)
    tamper(fresh_database, "DELETE FROM events WHERE position = %s", (target.position,))

    result = verify(fresh_database)
    first = result.mismatches[0]

    assert first.kind == MismatchKind.MISSING_VERSION
    assert first.stream_id == sealed_tenant[0]
    assert first.stream_version == 3
    assert "stream head records version 3" in first.detail
    assert MismatchKind.SEAL_COUNT in {mismatch.kind for mismatch in result.mismatches}


def test_changed_stored_hash_breaks_next_link(
    fresh_database: Database, sealed_tenant: list[str]
) -> None:
    target = stream_event(fresh_database, sealed_tenant[4], 1)
    tamper(
        fresh_database,
        "UPDATE events SET hash = sha256(hash) WHERE position = %s",
        (target.position,),
    )

    result = verify(fresh_database)
    found = {(mismatch.kind, mismatch.stream_version) for mismatch in result.mismatches}

    assert found == {
        (MismatchKind.CONTENT_HASH, 1),
        (MismatchKind.PREVIOUS_LINK, 2),
        (MismatchKind.SEAL_ROOT, 1),  # the leaf covers the stored hash
    }
    assert all(mismatch.stream_id == sealed_tenant[4] for mismatch in result.mismatches)


def test_event_inserted_into_sealed_range_is_named(
    fresh_database: Database, sealed_tenant: list[str]
) -> None:
    # A well-formed new stream, hashed as the store would, but written with the
    # transaction id of an event that was already sealed.
    target = stream_event(fresh_database, sealed_tenant[0], 1)
    stream = incident_stream_id(uuid.uuid4())
    event_id = uuid.uuid4()
    payload = {"incident_id": stream.removeprefix("incident-"), "description": "Backdated"}
    fields: dict[str, Any] = {
        "tenant_id": "acme",
        "stream_id": stream,
        "stream_version": 1,
        "event_type": REPORT_SUBMITTED,
        "schema_version": 1,
        "event_id": event_id,
        "occurred_at": T0,
        "payload": payload,
        "metadata": {},
    }
    digest = event_hash(None, **fields)
    tamper(
        fresh_database,
        """
        INSERT INTO events (tx_id, tenant_id, stream_id, stream_version, event_type,
            schema_version, payload, metadata, occurred_at, event_id, hash)
        VALUES (%s::text::xid8, 'acme', %s, 1, %s, 1, %s, '{}', %s, %s, %s)
        """,
        (str(target.tx_id), stream, REPORT_SUBMITTED, Jsonb(payload), T0, event_id, digest),
    )
    tamper(
        fresh_database,
        "INSERT INTO streams (stream_id, tenant_id, version, head_hash) VALUES (%s, 'acme', 1, %s)",
        (stream, digest),
    )

    result = verify(fresh_database)

    assert [mismatch.kind for mismatch in result.mismatches] == [
        MismatchKind.SEAL_COUNT,
        MismatchKind.SEAL_ROOT,
    ]
    count, inserted = result.mismatches
    assert "held 16 events when it was sealed and holds 17 now" in count.detail
    assert inserted.stream_id == stream
    assert inserted.event_id == event_id
    assert inserted.seal_version == 1


def test_rewritten_seal_breaks_the_next_seal(
    fresh_database: Database, fresh_store: PostgresEventStore, sealed_tenant: list[str]
) -> None:
    add_incidents(fresh_store, "acme", 1)
    seal_now(fresh_database, "acme")
    first, second = stored_seals(fresh_database, "acme")

    # Rewrite the first seal's root and recompute its stream hash, as an attacker with
    # write access would. Only rewriting every later seal too would hide the change.
    forged = replace(first, payload={**first.payload, "merkle_root": "00" * 32})
    tamper(
        fresh_database,
        "UPDATE events SET payload = %s, hash = %s WHERE position = %s",
        (Jsonb(forged.payload), recorded_event_hash(forged, None), first.position),
    )

    result = verify(fresh_database)
    found = [
        (mismatch.kind, mismatch.stream_version, mismatch.seal_version)
        for mismatch in result.mismatches
    ]

    assert found == [
        (MismatchKind.CONTENT_HASH, 2, None),  # the second seal event's stream hash
        (MismatchKind.SEAL_LINK, None, 2),  # the second seal's previous root
        (MismatchKind.SEAL_ROOT, None, 1),  # the first seal's root over its range
        (MismatchKind.SEAL_ROOT, 1, 2),  # the second seal covers the first seal event
    ]
    assert result.mismatches[0].event_id == second.event_id
    assert result.mismatches[3].event_id == first.event_id
    assert "version 1 was rewritten" in result.mismatches[0].detail
    assert "but every event matches a sealed leaf prefix" in result.mismatches[2].detail


def test_verify_stops_at_max_mismatches(fresh_database: Database, sealed_tenant: list[str]) -> None:
    tamper(
        fresh_database,
        "UPDATE events SET payload = '{}' WHERE stream_id LIKE 'incident-%%'",
    )

    result = verify(fresh_database, max_mismatches=3)

    assert len(result.mismatches) == 3
    assert result.truncated
    assert all(mismatch.kind == MismatchKind.CONTENT_HASH for mismatch in result.mismatches)


def test_unreadable_seal_is_reported(fresh_database: Database, sealed_tenant: list[str]) -> None:
    [seal_event] = stored_seals(fresh_database, "acme")
    tamper(
        fresh_database,
        "UPDATE events SET payload = payload - 'merkle_root' WHERE position = %s",
        (seal_event.position,),
    )

    result = verify(fresh_database)
    kinds = [mismatch.kind for mismatch in result.mismatches]

    assert kinds == [MismatchKind.CONTENT_HASH, MismatchKind.INVALID_SEAL]
    assert "'merkle_root'" in result.mismatches[1].detail
    assert result.mismatches[1].position == seal_event.position


def test_failed_tenant_is_logged_and_others_sealed(
    fresh_database: Database,
    fresh_store: PostgresEventStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for tenant in ("broken", "fine"):
        create_tenant(fresh_store, tenant, name=tenant, time_zone="UTC", occurred_at=T0)
    # A seal stream whose last event is not a seal cannot be extended.
    fresh_store.append(
        "broken", seal_stream_id("broken"), [NewEvent("Noted", {}, T0)], expected_version=0
    )
    for tenant in ("broken", "fine"):
        wait_for_horizon(fresh_database, tenant)

    with caplog.at_level(logging.ERROR, logger="ledger.seals"):
        report = seal_all(fresh_database)

    assert [seal.tenant_id for seal in report.sealed] == ["fine"]
    assert list(report.failed) == ["broken"]
    assert "is a Noted event, not a LedgerSealed" in report.failed["broken"]
    assert any("sealing tenant broken failed" in record.getMessage() for record in caplog.records)


# Concurrency -----------------------------------------------------------------------------


def _waiting_seal_appends(database: Database) -> int:
    with database.connect_owner() as conn:
        row = conn.execute(
            """
            SELECT count(*) FROM pg_stat_activity
            WHERE datname = current_database() AND application_name = 'civicpulse-seal'
              AND wait_event_type = 'Lock'
            """
        ).fetchone()
    assert row is not None
    return int(row[0])


def _wait_for(condition: Any, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.02)


def _start_seal_run(database: Database, reports: list[SealReport]) -> threading.Thread:
    thread = threading.Thread(
        target=lambda: reports.append(seal_all(database, tenant_id="acme")), daemon=True
    )
    thread.start()
    return thread


def _lock_seal_stream(database: Database, tenant_id: str) -> psycopg.Connection[Any]:
    """Lock the seal stream's head row, so appends to it queue until the lock is released."""
    conn = database.connect_owner()
    conn.execute(
        "SELECT 1 FROM streams WHERE stream_id = %s FOR UPDATE", (seal_stream_id(tenant_id),)
    )
    return conn


def test_racing_seals_of_one_range_store_one(
    fresh_database: Database,
    fresh_store: PostgresEventStore,
    sealed_tenant: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    add_incidents(fresh_store, "acme", 2)
    wait_for_horizon(fresh_database, "acme")
    reports: list[SealReport] = []

    with caplog.at_level(logging.INFO, logger="ledger.seals"):
        blocker = _lock_seal_stream(fresh_database, "acme")
        try:
            threads = [_start_seal_run(fresh_database, reports) for _ in range(2)]
            _wait_for(
                lambda: _waiting_seal_appends(fresh_database) == 2, 30, "seal runs never queued"
            )
        finally:
            blocker.rollback()
            blocker.close()
        for thread in threads:
            thread.join(30)

    sealed = [seal for report in reports for seal in report.sealed]
    assert len(reports) == 2
    assert len(sealed) == 1
    assert all(report.failed == {} for report in reports)
    assert len(stored_seals(fresh_database, "acme")) == 2
    assert any("already has this seal" in record.getMessage() for record in caplog.records)
    assert verify(fresh_database).ok


def test_racing_seals_of_different_ranges_store_one(
    fresh_database: Database,
    fresh_store: PostgresEventStore,
    sealed_tenant: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    add_incidents(fresh_store, "acme", 1)
    wait_for_horizon(fresh_database, "acme")
    reports: list[SealReport] = []

    # While an open transaction keeps the horizon back, the first run sees less of the
    # log than the second one, which starts after it commits.
    with caplog.at_level(logging.INFO, logger="ledger.seals"):
        with fresh_database.connect_worker() as open_conn:
            open_conn.execute("SELECT 1")
            fresh_store.append(
                "acme",
                incident_stream_id(uuid.uuid4()),
                [NewEvent("Noted", {}, T0)],
                expected_version=0,
                conn=open_conn,
            )
            blocker = _lock_seal_stream(fresh_database, "acme")
            try:
                first = _start_seal_run(fresh_database, reports)
                _wait_for(lambda: _waiting_seal_appends(fresh_database) == 1, 30, "first run")
                open_conn.commit()
                wait_for_horizon(fresh_database, "acme")
                second = _start_seal_run(fresh_database, reports)
                _wait_for(lambda: _waiting_seal_appends(fresh_database) == 2, 30, "second run")
            finally:
                blocker.rollback()
                blocker.close()
        first.join(30)
        second.join(30)

    sealed = [seal for report in reports for seal in report.sealed]
    assert len(reports) == 2
    assert len(sealed) == 1
    assert all(report.failed == {} for report in reports)
    assert len(stored_seals(fresh_database, "acme")) == 2
    assert any("sealed by another process first" in r.getMessage() for r in caplog.records)
    assert verify(fresh_database).ok


def test_open_transaction_waits_for_next_seal(
    fresh_database: Database, fresh_store: PostgresEventStore, sealed_tenant: list[str]
) -> None:
    add_incidents(fresh_store, "acme", 1)
    wait_for_horizon(fresh_database, "acme")
    early_stream = incident_stream_id(uuid.uuid4())
    late_stream = incident_stream_id(uuid.uuid4())

    # The open transaction takes its position first; the later one commits first.
    with fresh_database.connect_worker() as open_conn:
        open_conn.execute("SELECT 1")
        early = fresh_store.append(
            "acme",
            early_stream,
            [NewEvent("Noted", {"n": 1}, T0)],
            expected_version=0,
            conn=open_conn,
        )
        late = fresh_store.append(
            "acme", late_stream, [NewEvent("Noted", {"n": 2}, T0)], expected_version=0
        )
        while_open = seal_all(fresh_database, tenant_id="acme")
        open_conn.commit()

    wait_for_horizon(fresh_database, "acme")
    after_commit = seal_all(fresh_database, tenant_id="acme")
    events = {event.position: event for event in tenant_events(fresh_database, "acme")}
    early_key = (events[early.positions[0]].tx_id, early.positions[0])
    late_key = (events[late.positions[0]].tx_id, late.positions[0])

    assert early.positions[0] < late.positions[0]
    assert early_key < late_key  # the open transaction's id is the older one
    for seal in while_open.sealed:
        assert (seal.through.tx_id, seal.through.position) < early_key
    [next_seal] = after_commit.sealed
    assert (next_seal.after.tx_id, next_seal.after.position) < early_key
    assert (next_seal.through.tx_id, next_seal.through.position) >= late_key
    assert verify(fresh_database).ok
