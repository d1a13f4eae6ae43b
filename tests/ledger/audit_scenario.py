"""A tenant for the audit tests, whose events differ by actor, role, type, category, valid
time and transaction time."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import orjson
import pytest

from ledger.commands import Actor, IncidentCommands
from ledger.database import Database
from ledger.events import RecordedEvent
from ledger.imports.copytext import EVENT_COPY_COLUMNS
from ledger.keys import Role, issue_key
from ledger.store import EVENT_COLUMNS, PostgresEventStore, row_to_event
from ledger.tenants import create_tenant

RITA = Actor("rita", "reporter")
ALICE = Actor("alice", "staff")
BOB = Actor("bob", "staff")

# Valid times of the first incident, reported long before it reached the ledger.
MARCH_1 = datetime(2015, 3, 1, 14, 0, tzinfo=UTC)
MARCH_2 = datetime(2015, 3, 2, 14, 0, tzinfo=UTC)
MARCH_3 = datetime(2015, 3, 3, 14, 0, tzinfo=UTC)


class SettableClock:
    """A clock for the command handlers: a fixed moment when set, else the real time."""

    def __init__(self) -> None:
        self.moment: datetime | None = None

    def __call__(self) -> datetime:
        return self.moment or datetime.now(UTC)


@dataclass
class AuditScenario:
    tenant_id: str
    old_pothole: UUID  # reported 1 March 2015 by rita, acknowledged by alice, assigned by bob
    graffiti: UUID  # reported now by alice, acknowledged by bob, resolved by alice
    new_pothole: UUID  # reported now by bob
    officer_token: str
    staff_token: str
    events: list[RecordedEvent]  # every event of the tenant, in (tx_id, position) order


def build_scenario(store: PostgresEventStore, database: Database) -> AuditScenario:
    tenant_id = f"audit-{uuid.uuid4().hex[:8]}"
    create_tenant(
        store,
        tenant_id,
        name="Audit City",
        time_zone="America/New_York",
        occurred_at=datetime(2015, 1, 1, tzinfo=UTC),
    )
    _, officer_token = issue_key(
        store, tenant_id, role=Role.OFFICER, name="auditor", issued_by="test"
    )
    _, staff_token = issue_key(store, tenant_id, role=Role.STAFF, name="clerk", issued_by="test")
    clock = SettableClock()
    commands = IncidentCommands(store, clock=clock)

    clock.moment = MARCH_1
    old_pothole = commands.submit(
        tenant_id, {"description": "Deep pothole", "category": "Pothole"}, actor=RITA
    ).incident_id
    clock.moment = MARCH_2
    commands.execute(tenant_id, old_pothole, "acknowledge", {}, actor=ALICE, expected_version=1)
    clock.moment = MARCH_3
    commands.execute(
        tenant_id,
        old_pothole,
        "assign",
        {"assignee": "crew-1", "department": "Public Works"},
        actor=BOB,
        expected_version=2,
    )

    clock.moment = None
    graffiti = commands.submit(
        tenant_id, {"description": "Tags on the wall", "category": "Graffiti"}, actor=ALICE
    ).incident_id
    commands.execute(tenant_id, graffiti, "acknowledge", {}, actor=BOB, expected_version=1)
    commands.execute(
        tenant_id, graffiti, "resolve", {"note": "Painted over"}, actor=ALICE, expected_version=2
    )
    new_pothole = commands.submit(
        tenant_id, {"description": "Small pothole", "category": "Pothole"}, actor=BOB
    ).incident_id

    events = tenant_events(database, tenant_id)
    wait_for_horizon(database, events[-1].tx_id)
    return AuditScenario(
        tenant_id, old_pothole, graffiti, new_pothole, officer_token, staff_token, events
    )


def tenant_events(database: Database, tenant_id: str) -> list[RecordedEvent]:
    """Read every event of the tenant as the owner, in (tx_id, position) order."""
    with database.connect_owner() as conn:
        rows = conn.execute(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE tenant_id = %s ORDER BY tx_id, position",
            (tenant_id,),
        ).fetchall()
    return [row_to_event(row) for row in rows]


def wait_for_horizon(database: Database, tx_id: int, timeout: float = 120.0) -> None:
    """Wait until no transaction older than `tx_id` is running, so audit pages show it.

    The horizon is cluster-wide: other databases on the same server can hold it back.
    """
    deadline = time.monotonic() + timeout
    with database.connect_owner(autocommit=True) as conn:
        while True:
            row: Any = conn.execute(
                "SELECT pg_snapshot_xmin(pg_current_snapshot()) > %s::text::xid8", (str(tx_id),)
            ).fetchone()
            if row[0]:
                return
            if time.monotonic() > deadline:
                running = conn.execute(
                    "SELECT datname, backend_xid, state FROM pg_stat_activity "
                    "WHERE backend_xid IS NOT NULL"
                ).fetchall()
                pytest.fail(
                    f"transaction {tx_id} is still above the horizon after {timeout} s; "
                    f"transactions holding it back: {running}"
                )
            time.sleep(0.05)


def copy_events(database: Database, tenant_id: str, count: int) -> None:
    """Append `count` ReportSubmitted events to the tenant with one COPY, as the owner.

    Imports append this way too. The events carry a placeholder hash, so their chains do
    not verify: they are for tests of reading in bulk.
    """
    occurred = datetime(2016, 1, 1, tzinfo=UTC)
    metadata = orjson.dumps({"actor": "import", "role": "system", "channel": "import"}).decode()
    description = "Streetlight flickering at the corner of the block, " * 3
    with (
        database.connect_owner() as conn,
        conn.cursor() as cur,
        cur.copy(f"COPY events ({EVENT_COPY_COLUMNS}) FROM STDIN") as copy,
    ):
        for number in range(count):
            incident = uuid.uuid4()
            payload = {
                "incident_id": str(incident),
                "category": "Streetlight",
                "description": description,
                "source_id": str(number),
            }
            copy.write_row(
                (
                    tenant_id,
                    f"incident-{incident}",
                    1,
                    "ReportSubmitted",
                    1,
                    orjson.dumps(payload).decode(),
                    metadata,
                    occurred + timedelta(minutes=number),
                    uuid.uuid4(),
                    bytes(32),
                )
            )
