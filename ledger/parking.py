"""Events an operator sets aside for one projection, so that the projection can go on.

A projection stops at an event it cannot apply: its batch rolls back and the projector
retries it, and every later event of every tenant waits. When the event cannot be fixed
(events are never changed), an operator parks it for that projection. The projection then
skips it in streaming, in rebuilds and in time travel alike (what-if replays skip the
events parked for `sla`), so every way of computing the read model gives the same rows.
Unparking removes the mark; the read model includes the event again only after a rebuild.

Each park and unpark is also an event in the tenant's `operations-<tenant>` stream, so the
decision and its reason are in the sealed log.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg

from ledger.errors import InvalidRequest, LedgerError, TenantNotFound
from ledger.events import NewEvent
from ledger.store import PostgresEventStore

EVENT_PARKED = "EventParked"
EVENT_UNPARKED = "EventUnparked"
MAX_REASON_LENGTH = 1000


class EventNotFound(LedgerError):
    def __init__(self, tenant_id: str, event_id: UUID) -> None:
        super().__init__(
            f"tenant {tenant_id!r} has no event {event_id}; copy the event id and tenant "
            "from the projection's last error (`civicpulse projections status`)"
        )


@dataclass(frozen=True, slots=True)
class ParkedEvent:
    """An event one projection skips, and who set it aside and why."""

    projection: str
    position: int
    tenant_id: str
    event_id: UUID
    reason: str
    parked_by: str
    parked_at: datetime


def operations_stream_id(tenant_id: str) -> str:
    return f"operations-{tenant_id}"


def park_event(
    conn: psycopg.Connection[Any],
    store: PostgresEventStore,
    projection: str,
    tenant_id: str,
    event_id: UUID,
    *,
    reason: str,
    parked_by: str,
    occurred_at: datetime,
) -> tuple[ParkedEvent, bool]:
    """Park an event for `projection`; return the mark and whether it is new.

    `conn` is a worker connection. The mark and its `EventParked` event are written in one
    transaction. Parking a parked event again changes nothing. The caller checks that
    `projection` exists. Raises InvalidRequest for an empty reason, and EventNotFound.
    """
    reason = _checked_reason(reason)
    with conn.transaction():
        row = conn.execute(
            "SELECT position FROM events WHERE tenant_id = %s AND event_id = %s",
            (tenant_id, event_id),
        ).fetchone()
        if row is None:
            known = conn.execute(
                "SELECT 1 FROM streams WHERE tenant_id = %s LIMIT 1", (tenant_id,)
            ).fetchone()
            if known is None:
                raise TenantNotFound(tenant_id, "check the --tenant value")
            raise EventNotFound(tenant_id, event_id)
        inserted = conn.execute(
            """
            INSERT INTO parked_events
                (projection, position, tenant_id, event_id, reason, parked_by)
            VALUES (%s, %s, %s, %s, %s, %s)
            ON CONFLICT (projection, position) DO NOTHING
            RETURNING position
            """,
            (projection, row[0], tenant_id, event_id, reason, parked_by),
        ).fetchone()
        if inserted is not None:
            mark = ParkedEvent(
                projection, row[0], tenant_id, event_id, reason, parked_by, occurred_at
            )
            _record(conn, store, EVENT_PARKED, mark)
        parked = _read(conn, "WHERE projection = %s AND position = %s", (projection, row[0]))
    return parked[0], inserted is not None


def unpark_event(
    conn: psycopg.Connection[Any],
    store: PostgresEventStore,
    projection: str,
    tenant_id: str,
    event_id: UUID,
    *,
    reason: str,
    unparked_by: str,
    occurred_at: datetime,
) -> bool:
    """Remove a park mark; return False when the event was not parked for `projection`.

    The projection's read model still lacks the event until it is rebuilt.
    """
    reason = _checked_reason(reason)
    with conn.transaction():
        removed = conn.execute(
            "DELETE FROM parked_events WHERE projection = %s AND tenant_id = %s "
            "AND event_id = %s RETURNING position",
            (projection, tenant_id, event_id),
        ).fetchone()
        if removed is None:
            return False
        mark = ParkedEvent(
            projection, removed[0], tenant_id, event_id, reason, unparked_by, occurred_at
        )
        _record(conn, store, EVENT_UNPARKED, mark)
    return True


def _record(
    conn: psycopg.Connection[Any], store: PostgresEventStore, event_type: str, mark: ParkedEvent
) -> None:
    """Append a park or unpark to the tenant's operations stream, in `conn`'s transaction."""
    payload = {
        "projection": mark.projection,
        "event_id": str(mark.event_id),
        "position": mark.position,
        "reason": mark.reason,
    }
    event = NewEvent(event_type, payload, mark.parked_at, metadata={"actor": mark.parked_by})
    store.append(
        mark.tenant_id,
        operations_stream_id(mark.tenant_id),
        [event],
        expected_version=None,
        conn=conn,
    )


def list_parked(conn: psycopg.Connection[Any], projection: str | None = None) -> list[ParkedEvent]:
    """Return the park marks of one projection, or of all, in log order."""
    if projection is None:
        return _read(conn, "", ())
    return _read(conn, "WHERE projection = %s", (projection,))


def parked_positions(
    conn: psycopg.Connection[Any], projection: str, first: int, last: int
) -> frozenset[int]:
    """Return the positions from `first` to `last` that `projection` skips."""
    rows = conn.execute(
        "SELECT position FROM parked_events WHERE projection = %s AND position BETWEEN %s AND %s",
        (projection, first, last),
    ).fetchall()
    return frozenset(row[0] for row in rows)


def tenant_parked_positions(
    conn: psycopg.Connection[Any], projection: str, tenant_id: str
) -> frozenset[int]:
    """Return every position of the tenant's log that `projection` skips."""
    rows = conn.execute(
        "SELECT position FROM parked_events WHERE projection = %s AND tenant_id = %s",
        (projection, tenant_id),
    ).fetchall()
    return frozenset(row[0] for row in rows)


def without_parked(events: Iterable[Any], parked: frozenset[int]) -> list[Any]:
    """Return `events` (anything with a `position`) less the parked ones."""
    if not parked:
        return list(events)
    return [event for event in events if event.position not in parked]


def _read(conn: psycopg.Connection[Any], where: str, params: tuple[Any, ...]) -> list[ParkedEvent]:
    rows = conn.execute(
        "SELECT projection, position, tenant_id, event_id, reason, parked_by, parked_at "
        f"FROM parked_events {where} ORDER BY position, projection",
        params,
    ).fetchall()
    return [ParkedEvent(*row) for row in rows]


def _checked_reason(reason: str) -> str:
    reason = reason.strip()
    if not reason or len(reason) > MAX_REASON_LENGTH:
        raise InvalidRequest(
            f"invalid reason {reason[:40]!r}: give why the event is set aside, in 1 to "
            f"{MAX_REASON_LENGTH} characters"
        )
    return reason
