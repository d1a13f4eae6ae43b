"""The audit index: one narrow row per event, with the columns audit filters select on.

Audit filters on actor, event type, recorded time and reported category once used indexes
on `events` itself, which every append had to maintain. This model keeps those columns in
`audit_entries` instead, off the append path. Audit results never lag the log, because
ledger.audit reads the entries up to this projection's checkpoint and the log after it,
in one snapshot.

Each batch copies its rows straight from `events` with the same JSON operators the filters
used on the log (`metadata->>'actor'`, `payload->>'category'`), so an entry selects exactly
the events the old conditions did. The model keeps every event: an event parked for other
projections still belongs in the audit trail, so this projection cannot be parked.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
import psycopg

from ledger.events import RecordedEvent
from ledger.lifecycle import REPORT_SUBMITTED
from projections.base import Folded, Projection

AUDIT_PROJECTION = "audit"

ENTRY_COLUMNS = (
    "tenant_id, tx_id, position, stream_id, event_type, actor, role, category, recorded_at"
)


class AuditProjection(Projection):
    """The audit_entries table: rows derived from each event alone, so nothing is folded."""

    name = AUDIT_PROJECTION
    tables = ("audit_entries",)
    # Parking would drop events from audit results, which must list every event.
    parkable = False
    # The entries are copied from the events table, so the projector need not send any
    # payload or metadata.
    payload_types: frozenset[str] | None = frozenset()

    def apply(self, conn: psycopg.Connection[Any], events: list[RecordedEvent]) -> None:
        """Insert the entries of a batch, which is a contiguous run of the log in
        (tx_id, position) order: every event from the first to the last is in it."""
        if not events:
            return
        first, last = events[0], events[-1]
        conn.execute(
            f"""
            INSERT INTO audit_entries ({ENTRY_COLUMNS})
            SELECT tenant_id, tx_id, position, stream_id, event_type,
                   metadata->>'actor', metadata->>'role',
                   CASE WHEN event_type = %s THEN payload->>'category' END,
                   recorded_at
            FROM events
            WHERE (tx_id, position) >= (%s::text::xid8, %s)
              AND (tx_id, position) <= (%s::text::xid8, %s)
            """,
            (REPORT_SUBMITTED, str(first.tx_id), first.position, str(last.tx_id), last.position),
        )

    def fold(self, events: Iterable[RecordedEvent], initial: Folded | None = None) -> Folded:
        """Return the entries of `events` as `read_all` returns rows, for comparisons."""
        entries = dict(initial or {})
        for event in events:
            category = None
            if event.event_type == REPORT_SUBMITTED:
                category = _text(event.payload.get("category"))
            entries[(event.tenant_id, (event.tx_id, event.position))] = (
                event.stream_id,
                event.event_type,
                _text(event.metadata.get("actor")),
                _text(event.metadata.get("role")),
                category,
                event.recorded_at,
            )
        return entries

    def read_all(self, conn: psycopg.Connection[Any]) -> Folded:
        """Return every entry, keyed by (tenant, (tx_id, position)), for comparisons."""
        rows = conn.execute(
            f"SELECT {ENTRY_COLUMNS} FROM audit_entries ORDER BY tx_id, position"
        ).fetchall()
        return {(row[0], (int(row[1]), row[2])): tuple(row[3:]) for row in rows}


def _text(value: Any) -> str | None:
    """Return a JSON value as PostgreSQL's `->>` does: strings as they are, null as None,
    and other values as JSON text."""
    if value is None or isinstance(value, str):
        return value
    # NOTE: PostgreSQL writes a space after each ':' and ',' of an object or array, and
    # orjson writes none. Actors, roles and categories are strings wherever CivicPulse
    # writes them, so only a hand-made event would show the difference.
    return orjson.dumps(value).decode()


def audit_projection() -> AuditProjection:
    return AuditProjection()
