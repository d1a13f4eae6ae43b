"""The hot queries on a log of one million events: none reads `events` or the audit index
sequentially."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from ledger.audit import AuditFilter, audit_transaction, incident_history, read_page
from ledger.database import Database, set_tenant
from ledger.events import NewEvent
from ledger.store import Checkpoint, PostgresEventStore, read_after, read_stream
from projections.sla_queries import sla_summary
from tests.ledger.plan_helpers import (
    RecordingCursor,
    explain,
    fill_events,
    index_audit_log,
    is_explainable,
    sequential_scans,
    statement_text,
)

BIG, SMALL = "plans-big", "plans-small"
EVENTS = 1_000_000


def hot_queries(
    conn: psycopg.Connection[Any], store: PostgresEventStore
) -> dict[str, Callable[[], object]]:
    """The queries each hot path runs, by name, as the product runs them."""
    incident = uuid.UUID(bytes=bytes.fromhex(_md5(f"{BIG}/{EVENTS // 8}")))
    stream_id = f"incident-{incident}"
    middle = conn.execute(
        "SELECT tx_id::text::bigint, position FROM events WHERE tenant_id = %s "
        "ORDER BY tx_id, position OFFSET %s LIMIT 1",
        (BIG, EVENTS // 2),
    ).fetchone()
    conn.commit()
    assert middle is not None
    recorded = conn.execute("SELECT max(recorded_at) FROM events").fetchone()
    conn.commit()
    assert recorded is not None

    def append() -> None:
        with conn.transaction(force_rollback=True):
            set_tenant(conn, BIG)
            store.append(
                BIG,
                stream_id,
                [NewEvent("IncidentReopened", {"reason": "x"}, datetime.now(UTC))],
                expected_version=4,
                conn=conn,
            )

    def audit(**conditions: Any) -> Callable[[], object]:
        def run() -> None:
            with audit_transaction(conn, BIG):
                read_page(conn, BIG, AuditFilter(**conditions), limit=100)

        return run

    def history() -> None:
        with audit_transaction(conn, BIG):
            incident_history(conn, BIG, incident, known_at=datetime.now(UTC))

    def lookup() -> None:
        with conn.transaction():
            set_tenant(conn, BIG)
            read_stream(conn, BIG, stream_id)

    def tail() -> None:
        with conn.transaction():
            read_after(conn, Checkpoint(middle[0], middle[1]), 2000)

    def summary() -> None:
        sla_summary(conn, BIG, datetime(2016, 1, 1, tzinfo=UTC))

    return {
        "append": append,
        "read after a checkpoint": tail,
        "incident lookup": lookup,
        "audit by actor": audit(actor="actor-7"),
        "audit by event type": audit(event_types=("IncidentClosed",)),
        "audit by category": audit(category="category-3"),
        "audit by incident": audit(incident_id=incident),
        "audit by recorded time": audit(
            recorded_from=recorded[0] - timedelta(seconds=1), recorded_to=recorded[0]
        ),
        "audit by occurred time": audit(
            occurred_from=datetime(2015, 3, 1, tzinfo=UTC),
            occurred_to=datetime(2015, 3, 2, tzinfo=UTC),
        ),
        "incident history": history,
        "SLA summary": summary,
    }


def _md5(text: str) -> str:
    import hashlib

    return hashlib.md5(text.encode()).hexdigest()


@pytest.mark.slow
def test_hot_queries_avoid_sequential_scans(fresh_database: Database) -> None:
    with fresh_database.connect_owner() as conn:
        fill_events(conn, BIG, EVENTS - 50_000)
        fill_events(conn, SMALL, 50_000)
        index_audit_log(fresh_database)
        conn.cursor_factory = RecordingCursor
        store = PostgresEventStore(None)  # type: ignore[arg-type]  # every call passes conn

        scans: dict[str, list[str]] = {}
        for name, run in hot_queries(conn, store).items():
            RecordingCursor.statements.clear()
            run()
            recorded = list(RecordingCursor.statements)
            conn.cursor_factory = psycopg.Cursor
            explained = 0
            for statement in recorded:
                text = statement_text(conn, statement)
                if "events" not in text or not is_explainable(text):
                    continue
                explained += 1
                seq = [
                    relation
                    for relation in sequential_scans(explain(conn, statement, BIG))
                    if relation in ("events", "audit_entries")
                ]
                if seq:
                    scans[f"{name}: {text[:120]}"] = seq
            conn.cursor_factory = RecordingCursor
            assert explained > 0 or name == "SLA summary", name

    assert scans == {}
