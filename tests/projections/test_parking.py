"""Parked events: a projection skips an event an operator set aside, and goes on."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from typer.testing import CliRunner

from ledger.database import Database
from ledger.errors import InvalidRequest, TenantNotFound
from ledger.events import NewEvent
from ledger.ids import incident_stream_id
from ledger.parking import (
    EVENT_PARKED,
    EVENT_UNPARKED,
    EventNotFound,
    list_parked,
    operations_stream_id,
    park_event,
    unpark_event,
)
from ledger.store import PostgresEventStore
from projections.runtime import BatchFailed, load_checkpoint, project_batch
from tests.projections.test_runtime import PoisonedProjection, submitted

NOW = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def poisoned_log(store: PostgresEventStore) -> tuple[list[uuid.UUID], uuid.UUID]:
    """Append three reports, the second of which the poisoned projection cannot apply."""
    incidents = [uuid.uuid4() for _ in range(3)]
    poison_id = uuid.uuid4()
    for number, incident in enumerate(incidents):
        event = submitted(incident, number)
        if number == 1:
            event = NewEvent(
                event.event_type, {**event.payload, "category": "poison"}, T0, event_id=poison_id
            )
        store.append("acme", incident_stream_id(incident), [event], expected_version=0)
    return incidents, poison_id


def park(
    conn: psycopg.Connection[Any], store: PostgresEventStore, event_id: uuid.UUID, **extra: Any
) -> Any:
    arguments: dict[str, Any] = {"reason": "unreadable category", "parked_by": "ops"}
    arguments.update(extra)
    return park_event(conn, store, "poisoned", "acme", event_id, occurred_at=NOW, **arguments)


def test_parked_event_is_skipped(fresh_database: Database, fresh_store: PostgresEventStore) -> None:
    incidents, poison_id = poisoned_log(fresh_store)
    # A new instance after the failure: the failed batch's attempts are recorded too.
    projection = PoisonedProjection()

    with fresh_database.connect_worker() as conn:
        with pytest.raises(BatchFailed):
            project_batch(conn, PoisonedProjection(), 10)
        parked, new = park(conn, fresh_store, poison_id)
        conn.commit()
        applied = project_batch(conn, projection, 10)
        with conn.transaction():
            checkpoint = load_checkpoint(conn, "poisoned")

    seen = [event.event_id for event in projection.seen]
    assert new
    assert parked.event_id == poison_id
    assert poison_id not in seen
    assert [event.stream_id for event in projection.seen[:2]] == [
        incident_stream_id(incidents[0]),
        incident_stream_id(incidents[2]),
    ]
    assert applied == len(projection.seen) + 1
    assert checkpoint.position == projection.seen[-1].position
    assert projection.seen[-1].event_type == EVENT_PARKED


def test_park_twice_records_one_event(
    fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    _, poison_id = poisoned_log(fresh_store)

    with fresh_database.connect_worker() as conn:
        _, first = park(conn, fresh_store, poison_id)
        _, second = park(conn, fresh_store, poison_id, reason="again")
        conn.commit()
        marks = list_parked(conn, "poisoned")
    events = fresh_store.read_stream("acme", operations_stream_id("acme"))

    assert first
    assert not second
    assert [mark.reason for mark in marks] == ["unreadable category"]
    assert [event.event_type for event in events] == [EVENT_PARKED]
    assert events[0].payload["reason"] == "unreadable category"
    assert events[0].metadata["actor"] == "ops"


def test_unpark_removes_the_mark(fresh_database: Database, fresh_store: PostgresEventStore) -> None:
    _, poison_id = poisoned_log(fresh_store)

    with fresh_database.connect_worker() as conn:
        park(conn, fresh_store, poison_id)
        removed = unpark_event(
            conn,
            fresh_store,
            "poisoned",
            "acme",
            poison_id,
            reason="fixed the fold",
            unparked_by="ops",
            occurred_at=NOW,
        )
        again = unpark_event(
            conn,
            fresh_store,
            "poisoned",
            "acme",
            poison_id,
            reason="twice",
            unparked_by="ops",
            occurred_at=NOW,
        )
        conn.commit()
        marks = list_parked(conn)
    events = fresh_store.read_stream("acme", operations_stream_id("acme"))

    assert removed
    assert not again
    assert marks == []
    assert [event.event_type for event in events] == [EVENT_PARKED, EVENT_UNPARKED]


def test_park_rejects_unknown_event_and_empty_reason(
    fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    _, poison_id = poisoned_log(fresh_store)
    missing = uuid.uuid4()

    with fresh_database.connect_worker() as conn:
        with pytest.raises(EventNotFound, match=str(missing)):
            park(conn, fresh_store, missing)
        with pytest.raises(TenantNotFound, match="'nosuch' not found"):
            park_event(
                conn,
                fresh_store,
                "sla",
                "nosuch",
                poison_id,
                reason="x",
                parked_by="ops",
                occurred_at=NOW,
            )
        with pytest.raises(InvalidRequest, match="invalid reason"):
            park(conn, fresh_store, poison_id, reason="  ")
        marks = list_parked(conn)

    assert marks == []
    assert fresh_store.read_stream("acme", operations_stream_id("acme")) == []


def test_cli_park_names_unknown_projection(
    fresh_database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.cli import app

    monkeypatch.setenv("DATABASE_URL", fresh_database.owner_conninfo)
    result = CliRunner().invoke(
        app,
        [
            "projections",
            "park",
            "--projection",
            "slas",
            "--tenant",
            "acme",
            "--event-id",
            str(uuid.uuid4()),
            "--reason",
            "x",
        ],
    )

    assert result.exit_code == 2
    assert "unknown projection 'slas'" in result.output
    assert "sla" in result.output


def test_cli_park_rejects_audit_index(
    fresh_database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.cli import app

    monkeypatch.setenv("DATABASE_URL", fresh_database.owner_conninfo)
    result = CliRunner().invoke(
        app,
        [
            "projections",
            "park",
            "--projection",
            "audit",
            "--tenant",
            "acme",
            "--event-id",
            str(uuid.uuid4()),
            "--reason",
            "x",
        ],
    )

    assert result.exit_code == 2
    assert "projection 'audit' cannot be parked" in result.output
    with fresh_database.connect_worker() as conn:
        marks = list_parked(conn)
    assert marks == []


def test_cli_parked_lists_marks(
    fresh_database: Database, fresh_store: PostgresEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.cli import app

    monkeypatch.setenv("DATABASE_URL", fresh_database.owner_conninfo)
    _, poison_id = poisoned_log(fresh_store)
    empty = CliRunner().invoke(app, ["projections", "parked"])
    with fresh_database.connect_worker() as conn:
        park_event(
            conn,
            fresh_store,
            "sla",
            "acme",
            poison_id,
            reason="bad",
            parked_by="ops",
            occurred_at=NOW,
        )
        conn.commit()
    listed = CliRunner().invoke(app, ["projections", "parked", "--projection", "sla"])

    assert empty.exit_code == 0
    assert "no event is parked" in empty.output
    assert listed.exit_code == 0
    assert str(poison_id)[:8] in listed.output
