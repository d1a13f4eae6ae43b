"""Read models as of a valid time: the state of the world at T, from `occurred_at`.

A read-model row whose events all happened by T is already the state at T. Only incidents
with events on both sides of T are folded again from the log, using just their events that
happened by T. Rows whose events all happened after T did not exist yet.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

import psycopg

from ledger.events import RecordedEvent
from ledger.ids import incident_stream_id
from ledger.parking import tenant_parked_positions
from ledger.store import EVENT_COLUMNS, row_to_event
from projections.sla import SlaState, evolve_sla, load_histories
from projections.trends import TREND_CONFIGS, TrendState, evolve_trend


def straddling_sla_states(
    conn: psycopg.Connection[Any], tenant_id: str, as_of: datetime
) -> list[SlaState]:
    """Fold the SLA state at `as_of` of each incident with events before and after it."""
    events = _straddling_events(conn, "incident_sla", "sla", tenant_id, as_of)
    if not events:
        return []
    # The configuration version in force for each event comes from its log position, as
    # in the streaming fold, whatever the valid time asked about.
    history = load_histories(conn, [tenant_id]).get(tenant_id)
    states = []
    for stream_events in events.values():
        state: SlaState | None = None
        for event in stream_events:
            state = evolve_sla(state, event, history)
        if state is not None:
            states.append(state)
    return states


def straddling_trend_states(
    conn: psycopg.Connection[Any], tenant_id: str, as_of: datetime
) -> list[TrendState]:
    """Fold the trends state at `as_of` of each incident with events before and after it."""
    events = _straddling_events(conn, "incident_trends", "trends", tenant_id, as_of)
    if not events:
        return []
    history = load_histories(conn, [tenant_id], TREND_CONFIGS).get(tenant_id)
    states = []
    for stream_events in events.values():
        state: TrendState | None = None
        for event in stream_events:
            state = evolve_trend(state, event, history)
        if state is not None:
            states.append(state)
    return states


def _straddling_events(
    conn: psycopg.Connection[Any], table: str, projection: str, tenant_id: str, as_of: datetime
) -> dict[str, list[RecordedEvent]]:
    """Return, by stream, the events up to `as_of` of the incidents of `table` (a read model
    with earliest_occurred_at and latest_occurred_at) that have events on both sides of it.

    Leaves out the events `projection` skips. Each stream's events come in log order, the
    order the projector folded them in, which stream versions need not follow.
    """
    ids = [
        row[0]
        for row in conn.execute(
            f"""
            SELECT incident_id FROM {table}
            WHERE tenant_id = %s AND earliest_occurred_at <= %s AND latest_occurred_at > %s
            """,
            (tenant_id, as_of, as_of),
        )
    ]
    if not ids:
        return {}
    streams = [incident_stream_id(incident_id) for incident_id in ids]
    events: dict[str, list[RecordedEvent]] = defaultdict(list)
    with conn.cursor() as cur:
        cur.execute(
            f"""
            SELECT {EVENT_COLUMNS} FROM events
            WHERE tenant_id = %s AND stream_id = ANY(%s) AND occurred_at <= %s
            ORDER BY tx_id, position
            """,
            (tenant_id, streams, as_of),
        )
        parked = tenant_parked_positions(conn, projection, tenant_id)
        for row in cur:
            event = row_to_event(row)
            if event.position not in parked:
                events[event.stream_id].append(event)
    return events
