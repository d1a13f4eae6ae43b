"""Helpers for tests of seals, verification and the scheduler."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from ledger.database import Database
from ledger.events import NewEvent, RecordedEvent
from ledger.ids import incident_stream_id
from ledger.lifecycle import INCIDENT_ACKNOWLEDGED, INCIDENT_ASSIGNED, REPORT_SUBMITTED
from ledger.seals import Seal, seal_all, seal_stream_id, transaction_horizon
from ledger.store import EVENT_COLUMNS, PostgresEventStore, row_to_event

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)

# Other test runs may share the server, and a transaction of theirs that stays open keeps
# the horizon back for every database on it.
HORIZON_TIMEOUT_SECONDS = 60


def add_incidents(store: PostgresEventStore, tenant_id: str, count: int) -> list[str]:
    """Append `count` incidents of three events each; return their stream ids."""
    streams = []
    for number in range(count):
        incident = uuid.uuid4()
        stream = incident_stream_id(incident)
        moment = T0 + timedelta(minutes=number)
        store.append(
            tenant_id,
            stream,
            [
                NewEvent(
                    REPORT_SUBMITTED,
                    {"incident_id": str(incident), "description": f"Broken light {number}"},
                    moment,
                ),
                NewEvent(INCIDENT_ACKNOWLEDGED, {}, moment + timedelta(minutes=5)),
                NewEvent(INCIDENT_ASSIGNED, {"assignee": "crew-7"}, moment + timedelta(hours=1)),
            ],
            expected_version=0,
        )
        streams.append(stream)
    return streams


def wait_for_horizon(database: Database, tenant_id: str) -> None:
    """Wait until every transaction that wrote the tenant's events is below the horizon."""
    with database.connect_worker(autocommit=True) as conn:
        row = conn.execute(
            "SELECT tx_id FROM events WHERE tenant_id = %s ORDER BY tx_id DESC LIMIT 1",
            (tenant_id,),
        ).fetchone()
        if row is None:
            return
        deadline = time.monotonic() + HORIZON_TIMEOUT_SECONDS
        while transaction_horizon(conn) <= row[0]:
            if time.monotonic() > deadline:
                raise AssertionError(f"transaction {row[0]} stayed above the horizon")
            time.sleep(0.05)


def seal_now(database: Database, tenant_id: str) -> Seal:
    """Seal every committed event of the tenant and return the new seal."""
    wait_for_horizon(database, tenant_id)
    report = seal_all(database, tenant_id=tenant_id)
    assert report.failed == {}
    assert len(report.sealed) == 1, report
    return report.sealed[0]


def tenant_events(database: Database, tenant_id: str) -> list[RecordedEvent]:
    """Every event of the tenant in log order, read as the owner."""
    with database.connect_owner() as conn:
        rows = conn.execute(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE tenant_id = %s ORDER BY tx_id, position",
            (tenant_id,),
        ).fetchall()
    return [row_to_event(row) for row in rows]


def stream_event(database: Database, stream_id: str, version: int) -> RecordedEvent:
    with database.connect_owner() as conn:
        row = conn.execute(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = %s AND stream_version = %s",
            (stream_id, version),
        ).fetchone()
    assert row is not None, (stream_id, version)
    return row_to_event(row)


def stored_seals(database: Database, tenant_id: str) -> list[RecordedEvent]:
    with database.connect_owner() as conn:
        rows = conn.execute(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = %s ORDER BY stream_version",
            (seal_stream_id(tenant_id),),
        ).fetchall()
    return [row_to_event(row) for row in rows]


def tamper(database: Database, statement: str, params: tuple[Any, ...] = ()) -> int:
    """Run a statement as the superuser with the append-only triggers switched off, as an
    attacker with full access would. Return the number of rows it changed."""
    with database.connect_owner() as conn:
        conn.execute("SET session_replication_role = replica")
        cursor = conn.execute(statement, params)
        return cursor.rowcount
