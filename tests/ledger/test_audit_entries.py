"""Audit results from the audit projection's index and the log after its checkpoint."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from psycopg_pool import ConnectionPool

from ledger.audit import (
    AuditFilter,
    LogPlace,
    audit_transaction,
    iter_event_batches,
    matching_query,
    read_page,
)
from ledger.database import Database
from ledger.errors import InvalidRequest
from ledger.events import NewEvent, RecordedEvent
from ledger.lifecycle import INCIDENT_ACKNOWLEDGED, REPORT_SUBMITTED
from ledger.store import PostgresEventStore
from projections.audit import audit_projection
from projections.runtime import catch_up, load_checkpoint, project_batch
from tests.conftest import app_pool
from tests.ledger.audit_scenario import (
    AuditScenario,
    build_scenario,
    tenant_events,
    wait_for_horizon,
)

Reference = Callable[[AuditScenario, RecordedEvent], bool]


def reported_category(scenario: AuditScenario, event: RecordedEvent) -> str | None:
    for candidate in scenario.events:
        if candidate.stream_id == event.stream_id and candidate.event_type == REPORT_SUBMITTED:
            return candidate.payload.get("category")
    return None


def filters(scenario: AuditScenario) -> dict[str, tuple[AuditFilter, Reference]]:
    """Filters by name, each with the condition it means, evaluated in Python."""
    middle = scenario.events[len(scenario.events) // 2].recorded_at
    return {
        "actor": (AuditFilter(actor="alice"), lambda s, e: e.metadata.get("actor") == "alice"),
        "one event type": (
            AuditFilter(event_types=(REPORT_SUBMITTED,)),
            lambda s, e: e.event_type == REPORT_SUBMITTED,
        ),
        "two event types": (
            AuditFilter(event_types=(REPORT_SUBMITTED, INCIDENT_ACKNOWLEDGED)),
            lambda s, e: e.event_type in (REPORT_SUBMITTED, INCIDENT_ACKNOWLEDGED),
        ),
        "recorded from": (AuditFilter(recorded_from=middle), lambda s, e: e.recorded_at >= middle),
        "recorded until": (AuditFilter(recorded_to=middle), lambda s, e: e.recorded_at < middle),
        "category": (
            AuditFilter(category="Pothole"),
            lambda s, e: reported_category(s, e) == "Pothole",
        ),
        "actor and category": (
            AuditFilter(actor="bob", category="Pothole"),
            lambda s, e: e.metadata.get("actor") == "bob" and reported_category(s, e) == "Pothole",
        ),
        "actor and role": (
            AuditFilter(actor="alice", role="staff"),
            lambda s, e: e.metadata.get("actor") == "alice" and e.metadata.get("role") == "staff",
        ),
        "no filter": (AuditFilter(), lambda s, e: True),
    }


@pytest.fixture
def scenario(fresh_database: Database) -> AuditScenario:
    with app_pool(fresh_database) as pool:
        return build_scenario(PostgresEventStore(pool), fresh_database)


@pytest.fixture
def pool(fresh_database: Database) -> Iterator[ConnectionPool[Any]]:
    with app_pool(fresh_database) as pool:
        yield pool


def paged(pool: ConnectionPool[Any], tenant_id: str, audit_filter: AuditFilter) -> list[int]:
    """Walk every page of two events; return the positions read."""
    found: list[int] = []
    cursor = None
    while True:
        with pool.connection() as conn, audit_transaction(conn, tenant_id):
            page = read_page(conn, tenant_id, audit_filter, cursor=cursor, limit=2)
        found.extend(event.position for event in page.events)
        cursor = page.next_cursor
        if not page.has_more:
            return found


def exported(pool: ConnectionPool[Any], tenant_id: str, audit_filter: AuditFilter) -> list[int]:
    with pool.connection() as conn, audit_transaction(conn, tenant_id):
        batches = iter_event_batches(conn, tenant_id, audit_filter, batch_size=3)
        return [event.position for batch in batches for event in batch]


def test_results_same_at_every_indexed_place(
    fresh_database: Database, scenario: AuditScenario, pool: ConnectionPool[Any]
) -> None:
    cases = filters(scenario)
    expected = {
        name: [event.position for event in scenario.events if means(scenario, event)]
        for name, (_, means) in cases.items()
    }
    projection = audit_projection()
    places = 0
    with fresh_database.connect_worker() as worker:
        load_checkpoint(worker, projection.name)
        worker.commit()
        # One event more in the index at each step, from none to the whole log.
        while True:
            for name, (audit_filter, _) in cases.items():
                place = f"{name}, {places} events indexed"
                assert paged(pool, scenario.tenant_id, audit_filter) == expected[name], place
                assert exported(pool, scenario.tenant_id, audit_filter) == expected[name], place
            if project_batch(worker, projection, 1) == 0:
                break
            places += 1

    assert places >= len(scenario.events)
    assert all(expected[name] for name in expected)


def test_projection_writes_json_fields(fresh_database: Database, scenario: AuditScenario) -> None:
    catch_up(fresh_database, [audit_projection()])
    with fresh_database.connect_worker() as conn:
        rows = conn.execute(
            "SELECT position, stream_id, event_type, actor, role, category, recorded_at "
            "FROM audit_entries WHERE tenant_id = %s ORDER BY tx_id, position",
            (scenario.tenant_id,),
        ).fetchall()

    assert [row[0] for row in rows] == [event.position for event in scenario.events]
    for row, event in zip(rows, scenario.events, strict=True):
        category = event.payload.get("category") if event.event_type == REPORT_SUBMITTED else None
        assert row[1:] == (
            event.stream_id,
            event.event_type,
            event.metadata.get("actor"),
            event.metadata.get("role"),
            category,
            event.recorded_at,
        )


def test_indexed_filters_read_entry_indexes(
    fresh_database: Database, scenario: AuditScenario, pool: ConnectionPool[Any]
) -> None:
    catch_up(fresh_database, [audit_projection()])
    indexes = {
        "audit_entries_actor": AuditFilter(actor="alice"),
        "audit_entries_type": AuditFilter(event_types=(INCIDENT_ACKNOWLEDGED,)),
        "audit_entries_recorded": AuditFilter(
            recorded_from=scenario.events[-1].recorded_at - timedelta(seconds=1)
        ),
        "audit_entries_category": AuditFilter(category="Graffiti"),
    }
    for index, audit_filter in indexes.items():
        with pool.connection() as conn, audit_transaction(conn, scenario.tenant_id):
            # The tables are tiny, so make sequential scans look costly to the planner.
            conn.execute("SET LOCAL enable_seqscan = off")
            query, params = matching_query(conn, scenario.tenant_id, audit_filter, LogPlace(), 10)
            explained = conn.execute(b"EXPLAIN " + query.as_bytes(conn), params)
            plan = "\n".join(row[0] for row in explained)
        assert index in plan, plan


def test_unknown_type_lists_types_of_both_parts(
    fresh_database: Database, scenario: AuditScenario, pool: ConnectionPool[Any]
) -> None:
    store = PostgresEventStore(pool)
    notes = f"notes-{scenario.tenant_id}"
    occurred = scenario.events[-1].occurred_at
    store.append(
        scenario.tenant_id, notes, [NewEvent("NoteFiled", {}, occurred)], expected_version=0
    )
    catch_up(fresh_database, [audit_projection()])
    store.append(
        scenario.tenant_id, notes, [NewEvent("NoteAmended", {}, occurred)], expected_version=1
    )
    wait_for_horizon(fresh_database, tenant_events(fresh_database, scenario.tenant_id)[-1].tx_id)

    with (
        pool.connection() as conn,
        audit_transaction(conn, scenario.tenant_id),
        pytest.raises(InvalidRequest) as raised,
    ):
        read_page(conn, scenario.tenant_id, AuditFilter(event_types=("Teleported",)))
    for present in ("NoteFiled", "NoteAmended"):
        with pool.connection() as conn, audit_transaction(conn, scenario.tenant_id):
            page = read_page(conn, scenario.tenant_id, AuditFilter(event_types=(present,)))
        assert [event.event_type for event in page.events] == [present]

    message = str(raised.value)
    assert "unknown event_type 'Teleported'" in message
    assert "NoteFiled" in message
    assert "NoteAmended" in message


def test_migration_indexes_existing_log(fresh_database: Database) -> None:
    from alembic import command

    from ledger.schema import alembic_config
    from ledger.settings import Settings

    config = alembic_config(fresh_database, Settings(database_url=fresh_database.owner_conninfo))
    command.downgrade(config, "0015")
    with app_pool(fresh_database) as pool:
        scenario = build_scenario(PostgresEventStore(pool), fresh_database)
    command.upgrade(config, "head")

    with fresh_database.connect_worker() as conn:
        positions = [
            row[0]
            for row in conn.execute(
                "SELECT position FROM audit_entries WHERE tenant_id = %s ORDER BY tx_id, position",
                (scenario.tenant_id,),
            )
        ]
        checkpoint = load_checkpoint(conn, audit_projection().name)
        conn.commit()
    applied, _ = catch_up(fresh_database, [audit_projection()])

    assert positions == [event.position for event in scenario.events]
    last = scenario.events[-1]
    assert (checkpoint.tx_id, checkpoint.position) >= (last.tx_id, last.position)
    assert applied == 0
