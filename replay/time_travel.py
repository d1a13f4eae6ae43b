"""Bitemporal replay: any read model as of a valid time, as known at a transaction time.

`as_of` keeps the events that happened by then (`occurred_at`): the state of the world at
that moment as the ledger records it today. `known_at` keeps the events recorded by then
(`recorded_at`): what the ledger contained at that moment. Together they give the
state of the world at `as_of` as the ledger knew it at `known_at`. The same filter applies
to the tenant's configuration streams, so a past view folds with the rules of its day.

A replay starts from a usable snapshot (see `replay.snapshots.nearest_snapshot`) and folds
only the events after it, or from nothing when there is none. Either way it returns the
same states.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg

from ledger.database import set_tenant
from ledger.errors import IncidentNotFound
from ledger.events import RecordedEvent
from ledger.ids import incident_stream_id
from ledger.lifecycle import IncidentState, fold_incident
from ledger.parking import tenant_parked_positions, without_parked
from ledger.store import EVENT_COLUMNS, Checkpoint, row_to_event
from projections.base import INCIDENT_STREAM_PREFIX, Folded, Projection
from projections.runtime import collect_less_often
from projections.sla_queries import consistent_snapshot
from replay.snapshots import nearest_snapshot


@dataclass(frozen=True, slots=True)
class Replayed:
    """A replay's states, the snapshot it started from, and how many events it folded."""

    states: Folded
    snapshot_id: int | None
    events_folded: int


def read_tenant_events(
    conn: psycopg.Connection[Any],
    tenant_id: str,
    *,
    as_of: datetime | None = None,
    known_at: datetime | None = None,
    after: Checkpoint | None = None,
    refold_streams: list[str] | None = None,
) -> list[RecordedEvent]:
    """Read a tenant's events in (tx_id, position) order, every stream included.

    `after` keeps only the events after that place, plus, from before it, those of
    `refold_streams` and of every stream that is not an incident's: folds that apply the
    tenant's rules (the SLA model) rebuild the configuration history from them.
    """
    filters = ""
    limits: list[Any] = []
    if as_of is not None:
        filters += " AND occurred_at <= %s"
        limits.append(as_of)
    if known_at is not None:
        filters += " AND recorded_at <= %s"
        limits.append(known_at)
    if after is None:
        query = f"SELECT {EVENT_COLUMNS} FROM events WHERE tenant_id = %s{filters}"
        params: list[Any] = [tenant_id, *limits]
    else:
        # Two range scans, by log position and by stream, instead of one scan of the whole
        # tenant's log that an OR of the two conditions takes.
        streams = [*(refold_streams or []), *_configuration_streams(conn, tenant_id)]
        place = [str(after.tx_id), after.position]
        query = f"""
            SELECT {EVENT_COLUMNS} FROM events
            WHERE tenant_id = %s AND (tx_id, position) > (%s::text::xid8, %s){filters}
            UNION ALL
            SELECT {EVENT_COLUMNS} FROM events
            WHERE tenant_id = %s AND stream_id = ANY(%s)
              AND (tx_id, position) <= (%s::text::xid8, %s){filters}
        """
        params = [tenant_id, *place, *limits, tenant_id, streams, *place, *limits]
    query += " ORDER BY tx_id, position"
    with conn.cursor() as cur:
        cur.execute(query, params)
        return [row_to_event(row) for row in cur]


def _configuration_streams(conn: psycopg.Connection[Any], tenant_id: str) -> list[str]:
    """Return the tenant's streams that are not an incident's."""
    rows = conn.execute(
        "SELECT stream_id FROM streams WHERE tenant_id = %s AND NOT starts_with(stream_id, %s)",
        (tenant_id, INCIDENT_STREAM_PREFIX),
    ).fetchall()
    return [row[0] for row in rows]


def replay(
    conn: psycopg.Connection[Any],
    projection: Projection,
    tenant_id: str,
    *,
    as_of: datetime | None = None,
    known_at: datetime | None = None,
    use_snapshots: bool = True,
) -> Replayed:
    """Fold one tenant's rows of `projection` as of `as_of` and as known at `known_at`.

    None for either means no limit on that axis. Runs on one database snapshot. On an
    application-role connection, row-level security limits it to the tenant's rows. Pass a
    projection built with another rule set for a what-if replay: the live model is never
    written.
    """
    # The tenant's events or snapshot rows stay in memory for the whole fold.
    collect_less_often()
    with consistent_snapshot(conn):
        set_tenant(conn, tenant_id)
        loaded = (
            nearest_snapshot(conn, projection, tenant_id, as_of=as_of, known_at=known_at)
            if use_snapshots
            else None
        )
        refold: list[str] = []
        if loaded is not None and as_of is not None and loaded.info.last_occurred_at > as_of:
            # Only stream-keyed models get here (see nearest_snapshot). The snapshot's rows of
            # streams with events after as_of hold those events, so they are folded again.
            # A configuration stream among them may have changed any row: then the snapshot
            # is of no use.
            refold = _streams_after(conn, tenant_id, as_of, loaded.info.checkpoint)
            if any(projection.stream_key(tenant_id, stream) is None for stream in refold):
                loaded = None
        parked = tenant_parked_positions(conn, projection.name, tenant_id)
        if loaded is None:
            events = read_tenant_events(conn, tenant_id, as_of=as_of, known_at=known_at)
            events = without_parked(events, parked)
            return Replayed(projection.fold(events), None, len(events))

        states = dict(loaded.states)
        for stream_id in refold:
            key = projection.stream_key(tenant_id, stream_id)
            if key is not None:
                states.pop(key, None)
        events = read_tenant_events(
            conn,
            tenant_id,
            as_of=as_of,
            known_at=known_at,
            after=loaded.info.checkpoint,
            refold_streams=refold,
        )
        events = without_parked(events, parked)
        return Replayed(projection.fold(events, states), loaded.info.snapshot_id, len(events))


def _streams_after(
    conn: psycopg.Connection[Any], tenant_id: str, as_of: datetime, through: Checkpoint
) -> list[str]:
    """Return the streams with an event up to `through` that happened after `as_of`."""
    rows = conn.execute(
        """
        SELECT DISTINCT stream_id FROM events
        WHERE tenant_id = %s AND occurred_at > %s AND (tx_id, position) <= (%s::text::xid8, %s)
        """,
        (tenant_id, as_of, str(through.tx_id), through.position),
    ).fetchall()
    return [row[0] for row in rows]


def incident_at(
    conn: psycopg.Connection[Any],
    tenant_id: str,
    incident_id: UUID,
    *,
    as_of: datetime | None,
    known_at: datetime | None,
) -> IncidentState:
    """Fold one incident's stream as of `as_of` and as known at `known_at`.

    Raises IncidentNotFound, saying which limit hid it, when the incident did not exist yet
    at those times.
    """
    with consistent_snapshot(conn):
        set_tenant(conn, tenant_id)
        query = f"SELECT {EVENT_COLUMNS} FROM events WHERE tenant_id = %s AND stream_id = %s"
        params: list[Any] = [tenant_id, incident_stream_id(incident_id)]
        if as_of is not None:
            query += " AND occurred_at <= %s"
            params.append(as_of)
        if known_at is not None:
            query += " AND recorded_at <= %s"
            params.append(known_at)
        with conn.cursor() as cur:
            cur.execute(query + " ORDER BY stream_version", params)
            events = [row_to_event(row) for row in cur]
        events = without_parked(events, tenant_parked_positions(conn, "incidents", tenant_id))
    state = fold_incident(events)
    if state is None:
        limits = [
            f"{name} {moment.isoformat()}"
            for name, moment in (("as of", as_of), ("known at", known_at))
            if moment is not None
        ]
        raise IncidentNotFound(tenant_id, f"{incident_id} ({' and '.join(limits)})")
    return state
