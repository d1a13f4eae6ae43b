"""Audit queries over one tenant's event log: filters, pages, histories and changes.

Every query reads the `audit_events` view (migration 0005), which shows the rows of the
tenant named by `set_tenant`, like the row-level security policy on `events`. Filters on
actor, event type, recorded time and category also read `audit_entries`, the audit
projection's index of the log (projections/audit.py), up to that projection's checkpoint,
and the log after it, so results never lag the log. Run the queries inside
`audit_transaction`, which opens a read-only REPEATABLE READ transaction for one tenant, so
that every statement of a request reads the same snapshot.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import re
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

import orjson
import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from ledger.config_sections import (
    CALENDARS_CONFIGURED,
    ROUTING_CONFIGURED,
    SLA_POLICIES_CONFIGURED,
)
from ledger.database import set_tenant
from ledger.errors import IncidentNotFound, InvalidRequest
from ledger.events import RecordedEvent
from ledger.grouping import GROUPING_CONFIGURED
from ledger.ids import incident_stream_id
from ledger.keys import KEY_ISSUED, KEY_REVOKED, Role
from ledger.lifecycle import (
    INCIDENT_EVENT_TYPES,
    REPORT_SUBMITTED,
    IncidentState,
    evolve,
    fold_incident,
)
from ledger.personal import CONTACT_ACCESSED, reporter_stream_id
from ledger.store import EVENT_COLUMNS, row_to_event
from ledger.tenants import CATEGORIES_CONFIGURED, TENANT_CREATED
from projections.audit import AUDIT_PROJECTION

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_TEXT_LENGTH = 200
MAX_CURSOR_LENGTH = 512

# The role in the metadata of imported events (see ledger.imports.boston.import_metadata).
IMPORT_ROLE = "system"

KNOWN_EVENT_TYPES = INCIDENT_EVENT_TYPES | {
    TENANT_CREATED,
    CATEGORIES_CONFIGURED,
    GROUPING_CONFIGURED,
    CALENDARS_CONFIGURED,
    SLA_POLICIES_CONFIGURED,
    ROUTING_CONFIGURED,
    KEY_ISSUED,
    KEY_REVOKED,
}
KNOWN_ROLES = frozenset({role.value for role in Role} | {IMPORT_ROLE})

INCIDENT_STREAM_PREFIX = "incident-"

_COLUMNS = sql.SQL(EVENT_COLUMNS)
_JOINED_COLUMNS = sql.SQL(", ".join(f"e.{name.strip()}" for name in EVENT_COLUMNS.split(",")))
_CURSOR_VERSION = 1


def parse_time(name: str, value: str | None, time_zone: str) -> datetime | None:
    """Read an ISO 8601 time, or None for None. A time without an offset is read in
    `time_zone`, the tenant's zone.

    Raises InvalidRequest naming the parameter and the value.
    """
    if value is None:
        return None
    text = value.strip()
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        # A '+' left unencoded in a query string arrives as a space: 05:00:00 01:00.
        repaired = re.sub(r"(?<=\d) (\d{2}(:?\d{2})?)$", r"+\1", text)
        try:
            moment = datetime.fromisoformat(repaired)
        except ValueError:
            raise InvalidRequest(
                f"invalid {name} {value!r}: use ISO 8601, such as 2016-01-13T00:00 (read in "
                f"the tenant's time zone, {time_zone}) or 2016-01-13T05:00:00Z; in a URL, "
                "write a '+' offset as %2B"
            ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=ZoneInfo(time_zone))
    try:
        # Times near the ends of the calendar fall outside Python's years 1 to 9999 once
        # moved to UTC, which the filter's digest and the database both need.
        moment.astimezone(UTC)
    except OverflowError:
        raise InvalidRequest(
            f"invalid {name} {value!r}: the time is out of range; use a year from 1 to 9999 "
            "that stays in range in UTC"
        ) from None
    return moment


def _check_text(name: str, value: str | None, max_length: int = MAX_TEXT_LENGTH) -> None:
    if value is None:
        return
    if not value or len(value) > max_length or "\x00" in value:
        raise InvalidRequest(
            f"invalid {name} {value[:50]!r}: use 1 to {max_length} characters without NUL"
        )


def _utc_text(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).isoformat() if moment is not None else None


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """Conditions on one tenant's events. Every field left None or empty matches all events.

    Time ranges include their start and exclude their end. `occurred_*` bounds valid time
    (when the event happened in the world), `recorded_*` bounds transaction time (when the
    ledger stored it). `category` matches the category an incident was reported with.
    """

    actor: str | None = None
    role: str | None = None
    event_types: tuple[str, ...] = ()
    incident_id: UUID | None = None
    stream_id: str | None = None
    category: str | None = None
    occurred_from: datetime | None = None
    occurred_to: datetime | None = None
    recorded_from: datetime | None = None
    recorded_to: datetime | None = None

    def __post_init__(self) -> None:
        _check_text("actor", self.actor)
        _check_text("role", self.role, 50)
        _check_text("stream", self.stream_id)
        _check_text("category", self.category)
        for event_type in self.event_types:
            _check_text("event_type", event_type, 100)
        for label, start, end in (
            ("occurred", self.occurred_from, self.occurred_to),
            ("recorded", self.recorded_from, self.recorded_to),
        ):
            for moment in (start, end):
                if moment is not None and moment.utcoffset() is None:
                    raise InvalidRequest(f"{label} time {moment} has no time zone offset")
            if start is not None and end is not None and start >= end:
                raise InvalidRequest(
                    f"invalid {label} range: {label}_from {start.isoformat()} is not earlier "
                    f"than {label}_to {end.isoformat()}; the range includes its start and "
                    "excludes its end"
                )

    def fingerprint(self, tenant_id: str) -> str:
        """Return a digest of the tenant and the conditions, which a cursor carries."""
        canonical = {
            "tenant_id": tenant_id,
            "actor": self.actor,
            "role": self.role,
            "event_types": sorted(set(self.event_types)),
            "incident_id": str(self.incident_id) if self.incident_id else None,
            "stream_id": self.stream_id,
            "category": self.category,
            "occurred_from": _utc_text(self.occurred_from),
            "occurred_to": _utc_text(self.occurred_to),
            "recorded_from": _utc_text(self.recorded_from),
            "recorded_to": _utc_text(self.recorded_to),
        }
        digest = hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS))
        return digest.hexdigest()[:32]

    def where(
        self,
        tenant_id: str,
        indexed: LogPlace | None = None,
        alias: str = "",
        *,
        without_entry_conditions: bool = False,
    ) -> tuple[sql.Composed, list[Any]]:
        """Return the WHERE conditions on `audit_events` and their parameters.

        `alias` qualifies the columns (`e.` for `audit_events AS e`). `indexed` is the
        place up to which `audit_entries` indexes the log: the category condition reads
        reported categories from the entries up to it and from the log after it.
        `without_entry_conditions` leaves out the conditions of `entry_where`, for rows
        that an entry matched already: repeated on the event, they would only make the
        planner underestimate the rows and sort where an index gives the order.
        """
        entry_conditions = not without_entry_conditions
        p = alias
        clauses: list[sql.Composable] = [sql.SQL(f"{p}tenant_id = %s")]
        params: list[Any] = [tenant_id]

        def add(clause: str, *values: Any) -> None:
            clauses.append(sql.SQL(clause))
            params.extend(values)

        if self.actor is not None and entry_conditions:
            add(f"{p}metadata->>'actor' = %s", self.actor)
        if self.role is not None:
            add(f"{p}metadata->>'role' = %s", self.role)
        if len(self.event_types) == 1 and entry_conditions:
            add(f"{p}event_type = %s", self.event_types[0])
        elif self.event_types and entry_conditions:
            add(f"{p}event_type = ANY(%s)", sorted(set(self.event_types)))
        if self.incident_id is not None:
            # An officer's reading of the incident's contact details is recorded in the
            # tenant's reporters stream, and belongs to the incident's trail too.
            add(
                f"({p}stream_id = %s OR ({p}stream_id = %s AND {p}event_type = %s"
                f" AND {p}payload->>'incident_id' = %s))",
                incident_stream_id(self.incident_id),
                reporter_stream_id(tenant_id),
                CONTACT_ACCESSED,
                str(self.incident_id),
            )
        if self.stream_id is not None:
            add(f"{p}stream_id = %s", self.stream_id)
        if self.category is not None:
            # An incident's category is in its ReportSubmitted event. The filter reads it
            # from the log and its index, not from the incidents read model: the read
            # model lags behind the log while the projector catches up, and it would not
            # share this query's snapshot. The subquery finds the matching streams in the
            # partial index audit_entries_category up to the indexed place, and in the log
            # after it. The outer query takes their events through the
            # (stream_id, stream_version) index.
            # NOTE: no event changes a category yet; once staff corrections exist, decide
            # whether this should match the category at the time of each event instead.
            place = indexed or LogPlace()
            clauses.append(
                sql.SQL(
                    f"{p}stream_id IN ("
                    "SELECT entry.stream_id FROM audit_entries AS entry "
                    "WHERE entry.tenant_id = %s AND entry.category = %s "
                    "UNION ALL "
                    "SELECT reported.stream_id FROM audit_events AS reported "
                    "WHERE reported.tenant_id = %s AND reported.event_type = %s "
                    "AND reported.payload->>'category' = %s "
                    "AND (reported.tx_id, reported.position) > (%s::text::xid8, %s))"
                )
            )
            params.extend(
                [
                    tenant_id,
                    self.category,
                    tenant_id,
                    REPORT_SUBMITTED,
                    self.category,
                    str(place.tx_id),
                    place.position,
                ]
            )
        if self.occurred_from is not None:
            add(f"{p}occurred_at >= %s", self.occurred_from)
        if self.occurred_to is not None:
            add(f"{p}occurred_at < %s", self.occurred_to)
        if self.recorded_from is not None and entry_conditions:
            add(f"{p}recorded_at >= %s", self.recorded_from)
        if self.recorded_to is not None and entry_conditions:
            add(f"{p}recorded_at < %s", self.recorded_to)
        return sql.SQL(" AND ").join(clauses), params

    def entry_where(self, tenant_id: str) -> tuple[sql.Composed, list[Any]] | None:
        """Return the conditions on `audit_entries AS a` that its indexes serve, or None
        when the filter has none of them (actor, event types, recorded time)."""
        clauses: list[sql.Composable] = []
        params: list[Any] = []
        if self.actor is not None:
            clauses.append(sql.SQL("a.actor = %s"))
            params.append(self.actor)
        # `= value` rather than `= ANY(array)`: the index scan then returns rows in
        # (tx_id, position) order and needs no sort.
        if len(self.event_types) == 1:
            clauses.append(sql.SQL("a.event_type = %s"))
            params.append(self.event_types[0])
        elif self.event_types:
            clauses.append(sql.SQL("a.event_type = ANY(%s)"))
            params.append(sorted(set(self.event_types)))
        if self.recorded_from is not None:
            clauses.append(sql.SQL("a.recorded_at >= %s"))
            params.append(self.recorded_from)
        if self.recorded_to is not None:
            clauses.append(sql.SQL("a.recorded_at < %s"))
            params.append(self.recorded_to)
        if not clauses:
            return None
        return sql.SQL(" AND ").join([sql.SQL("a.tenant_id = %s"), *clauses]), [
            tenant_id,
            *params,
        ]


@contextmanager
def audit_transaction(conn: psycopg.Connection[Any], tenant_id: str) -> Iterator[None]:
    """Open a read-only REPEATABLE READ transaction scoped to one tenant's events.

    Every statement inside reads the same snapshot, so a page and the histories folded for
    it agree. The connection must not be inside a transaction already: PostgreSQL only
    takes the isolation level in a transaction's first statement.
    """
    if conn.info.transaction_status != TransactionStatus.IDLE:
        raise RuntimeError(
            "audit queries open their own transaction: pass a connection that is not in one"
        )
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        set_tenant(conn, tenant_id)
        yield


def check_filter(conn: psycopg.Connection[Any], tenant_id: str, audit_filter: AuditFilter) -> None:
    """Raise InvalidRequest for an event type or role that neither the code defines nor the
    tenant's log contains, listing the valid values.

    Values in the log count too, so the filter accepts event types added after this module.
    """
    unknown_types = set(audit_filter.event_types) - KNOWN_EVENT_TYPES
    if unknown_types:
        present = set(_distinct_values(conn, tenant_id, "event_type"))
        if not unknown_types <= present:
            valid = ", ".join(sorted(KNOWN_EVENT_TYPES | present))
            names = ", ".join(repr(name) for name in sorted(unknown_types))
            raise InvalidRequest(f"unknown event_type {names}: use one of {valid}")
    role = audit_filter.role
    if role is not None and role not in KNOWN_ROLES:
        present = set(_distinct_values(conn, tenant_id, "role"))
        if role not in present:
            valid = ", ".join(sorted(KNOWN_ROLES | present))
            raise InvalidRequest(f"unknown role {role!r}: use one of {valid}")


_FILTER_COLUMNS = {"event_type": "event_type", "role": "role"}
_FILTER_EXPRESSIONS = {"event_type": "event_type", "role": "(metadata->>'role')"}


def _distinct_values(conn: psycopg.Connection[Any], tenant_id: str, kind: str) -> list[str]:
    """List the distinct values of an audit column in the tenant's log, sorted.

    Up to the indexed place, a recursive query jumps from one value to the next in
    `audit_entries`; for event types it reads one entry of audit_entries_type per distinct
    value instead of every event. After that place, it reads the log.
    """
    column = sql.Identifier(_FILTER_COLUMNS[kind])
    expression = sql.SQL(_FILTER_EXPRESSIONS[kind])
    place = indexed_place(conn)
    query = sql.SQL(
        """
        WITH RECURSIVE found(value) AS (
            (SELECT {column} FROM audit_entries WHERE tenant_id = %s AND {column} IS NOT NULL
             ORDER BY {column} LIMIT 1)
            UNION ALL
            SELECT (SELECT {column} FROM audit_entries
                    WHERE tenant_id = %s AND {column} > found.value ORDER BY {column} LIMIT 1)
            FROM found WHERE found.value IS NOT NULL
        )
        SELECT value FROM found WHERE value IS NOT NULL
        UNION
        SELECT DISTINCT {expression} FROM audit_events
        WHERE tenant_id = %s AND {expression} IS NOT NULL
          AND (tx_id, position) > (%s::text::xid8, %s)
        ORDER BY 1
        """
    ).format(column=column, expression=expression)
    rows = conn.execute(query, (tenant_id, tenant_id, tenant_id, str(place.tx_id), place.position))
    return [row[0] for row in rows]


@dataclass(frozen=True, slots=True)
class LogPlace:
    """A place in the log order of audit pages: after the event at (tx_id, position)."""

    tx_id: int = 0
    position: int = 0


def encode_cursor(place: LogPlace, fingerprint: str) -> str:
    """Return an opaque cursor: URL-safe base64 of JSON with the place and the filter digest."""
    document = {"v": _CURSOR_VERSION, "t": place.tx_id, "p": place.position, "f": fingerprint}
    return base64.urlsafe_b64encode(orjson.dumps(document)).rstrip(b"=").decode()


def decode_cursor(cursor: str, fingerprint: str) -> LogPlace:
    """Read a cursor back, checking it was issued for the same tenant and conditions.

    The digest catches a cursor reused with other filters by mistake. It is not a secret:
    a forged cursor only moves the reader within what its tenant may read anyway.
    """
    invalid = (
        f"invalid cursor {cursor[:40]!r}: pass the next_cursor value of the previous page "
        "unchanged, or leave cursor out to start from the first page"
    )
    if len(cursor) > MAX_CURSOR_LENGTH:
        raise InvalidRequest(invalid)
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        document = orjson.loads(raw)
    except (binascii.Error, ValueError):
        raise InvalidRequest(invalid) from None
    if not isinstance(document, dict) or document.get("v") != _CURSOR_VERSION:
        raise InvalidRequest(invalid)
    tx_id, position, digest = document.get("t"), document.get("p"), document.get("f")
    if not (
        isinstance(tx_id, int)
        and isinstance(position, int)
        and isinstance(digest, str)
        and 0 <= tx_id < 2**64
        and 0 <= position < 2**63
    ):
        raise InvalidRequest(invalid)
    if digest != fingerprint:
        raise InvalidRequest(
            "cursor was issued for other filters or another tenant: repeat the filters of "
            "the first page with it, or leave cursor out to start again"
        )
    return LogPlace(tx_id, position)


@dataclass(frozen=True, slots=True)
class AuditPage:
    """One page of events. `next_cursor` continues after its last event."""

    events: list[RecordedEvent]
    next_cursor: str
    has_more: bool


def indexed_place(conn: psycopg.Connection[Any]) -> LogPlace:
    """Return the place up to which `audit_entries` indexes the log: the audit projection's
    checkpoint in the transaction's snapshot."""
    row = conn.execute(
        "SELECT tx_id::text::bigint, position FROM projection_checkpoints WHERE projection = %s",
        (AUDIT_PROJECTION,),
    ).fetchone()
    return LogPlace(int(row[0]), row[1]) if row is not None else LogPlace()


def matching_query(
    conn: psycopg.Connection[Any],
    tenant_id: str,
    audit_filter: AuditFilter,
    after: LogPlace,
    limit: int | None,
) -> tuple[sql.Composed, list[Any]]:
    """Return the query for the events after `after` that match, in log order, and its
    parameters. With a `limit`, only events below the transaction horizon count.

    A filter on actor, event types or recorded time reads two parts. Up to the place the
    audit projection has indexed, `audit_entries` finds the events through its indexes.
    After that place, the log itself is read in order. The entries and the checkpoint
    change in one transaction, so in one snapshot the two parts meet without a gap or an
    overlap, and the result is the same however far the projection has come.
    """
    indexed = indexed_place(conn)
    where, params = audit_filter.where(tenant_id, indexed)
    horizon = sql.SQL(
        "AND tx_id < pg_snapshot_xmin(pg_current_snapshot())" if limit is not None else ""
    )
    limit_clause = sql.SQL("LIMIT %s" if limit is not None else "")
    limit_params = [limit] if limit is not None else []
    entries = audit_filter.entry_where(tenant_id)
    if entries is None:
        query = sql.SQL(
            """
            SELECT {columns} FROM audit_events
            WHERE {where} AND (tx_id, position) > (%s::text::xid8, %s) {horizon}
            ORDER BY tx_id, position {limit}
            """
        ).format(columns=_COLUMNS, where=where, horizon=horizon, limit=limit_clause)
        return query, [*params, str(after.tx_id), after.position, *limit_params]

    entry_where, entry_params = entries
    joined_where, joined_params = audit_filter.where(
        tenant_id, indexed, alias="e.", without_entry_conditions=True
    )
    tail_from = max(after, indexed, key=lambda place: (place.tx_id, place.position))
    query = sql.SQL(
        """
        SELECT {columns} FROM (
            (SELECT {joined_columns}
             FROM audit_entries AS a
             JOIN audit_events AS e
               ON e.tenant_id = a.tenant_id AND e.tx_id = a.tx_id AND e.position = a.position
             WHERE {entry_where} AND {joined_where}
               AND (a.tx_id, a.position) > (%s::text::xid8, %s)
             ORDER BY a.tx_id, a.position {limit})
            UNION ALL
            (SELECT {columns} FROM audit_events
             WHERE {where} AND (tx_id, position) > (%s::text::xid8, %s) {horizon}
             ORDER BY tx_id, position {limit})
        ) AS found
        ORDER BY tx_id, position {limit}
        """
    ).format(
        columns=_COLUMNS,
        joined_columns=_JOINED_COLUMNS,
        entry_where=entry_where,
        joined_where=joined_where,
        where=where,
        horizon=horizon,
        limit=limit_clause,
    )
    return query, [
        *entry_params,
        *joined_params,
        str(after.tx_id),
        after.position,
        *limit_params,
        *params,
        str(tail_from.tx_id),
        tail_from.position,
        *limit_params,
        *limit_params,
    ]


def read_page(
    conn: psycopg.Connection[Any],
    tenant_id: str,
    audit_filter: AuditFilter,
    *,
    cursor: str | None = None,
    limit: int = DEFAULT_PAGE_SIZE,
) -> AuditPage:
    """Read the next page of events that match, in (transaction id, position) order.

    Run it inside `audit_transaction`. Pages follow the rule of the log readers: they hold
    only events written by transactions older than every transaction still running, in
    (tx_id, position) order. Transactions commit out of position order, so a cursor that
    only remembered a position would step past an event whose transaction commits after a
    later position was read. Below that horizon no event can appear later, so walking the
    pages returns each event once, also while events are appended. The cost is that an
    event shows up only when no transaction that started writing before it is still
    running, in any database of the server: usually within milliseconds.

    `has_more` is False when the page reached the last matching event below the horizon.
    Its `next_cursor` still works later, to read the events appended since.
    """
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidRequest(f"invalid limit {limit}: use 1 to {MAX_PAGE_SIZE}")
    fingerprint = audit_filter.fingerprint(tenant_id)
    after = decode_cursor(cursor, fingerprint) if cursor is not None else LogPlace()
    check_filter(conn, tenant_id, audit_filter)

    query, params = matching_query(conn, tenant_id, audit_filter, after, limit + 1)
    with conn.cursor() as cur:
        cur.execute(query, params)
        events = [row_to_event(row) for row in cur.fetchall()]

    has_more = len(events) > limit
    events = events[:limit]
    last = LogPlace(events[-1].tx_id, events[-1].position) if events else after
    return AuditPage(events, encode_cursor(last, fingerprint), has_more)


def iter_event_batches(
    conn: psycopg.Connection[Any],
    tenant_id: str,
    audit_filter: AuditFilter,
    *,
    batch_size: int,
) -> Generator[list[RecordedEvent], None, None]:
    """Yield every matching event in (transaction id, position) order, `batch_size` at a time.

    Run it inside `audit_transaction`. A server-side cursor fetches one batch per round
    trip, so memory contains one batch at a time whatever the size of the result. The
    whole result comes from the transaction's snapshot. Unlike pages, it needs no horizon
    and includes every event committed when the transaction began.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    check_filter(conn, tenant_id, audit_filter)
    query, params = matching_query(conn, tenant_id, audit_filter, LogPlace(), None)
    with conn.cursor(name="audit_events_export") as cur:
        cur.execute(query, params)
        while rows := cur.fetchmany(batch_size):
            yield [row_to_event(row) for row in rows]


def incident_id_of(stream_id: str) -> str | None:
    """Return the incident id in an incident stream's id, or None for other streams."""
    if stream_id.startswith(INCIDENT_STREAM_PREFIX):
        return stream_id.removeprefix(INCIDENT_STREAM_PREFIX)
    return None


@dataclass(frozen=True, slots=True)
class IncidentHistory:
    """An incident's events and folded state as the ledger knew them at `known_at`."""

    incident_id: UUID
    known_at: datetime
    as_of: datetime | None
    events: list[RecordedEvent]
    state: IncidentState | None


def incident_history(
    conn: psycopg.Connection[Any],
    tenant_id: str,
    incident_id: UUID,
    *,
    known_at: datetime,
    as_of: datetime | None = None,
) -> IncidentHistory:
    """Read the incident's events recorded by `known_at` (transaction time), and of those
    the ones that happened by `as_of` (valid time) when it is given, and fold them.

    Run it inside `audit_transaction`. Raises IncidentNotFound when the tenant has no such
    incident at all. An incident that exists but was not known yet at `known_at` returns
    no events and a state of None.

    NOTE: `recorded_at` is the time of the statement that appended the event. The event
    became visible when its transaction committed, a little later, so an event recorded
    just before `known_at` may not have been readable yet at `known_at`.
    """
    stream_id = incident_stream_id(incident_id)
    query = sql.SQL(
        "SELECT {columns} FROM audit_events WHERE tenant_id = %s AND stream_id = %s "
        "AND recorded_at <= %s"
    ).format(columns=_COLUMNS)
    params: list[Any] = [tenant_id, stream_id, known_at]
    if as_of is not None:
        query += sql.SQL(" AND occurred_at <= %s")
        params.append(as_of)
    query += sql.SQL(" ORDER BY stream_version")
    with conn.cursor() as cur:
        cur.execute(query, params)
        events = [row_to_event(row) for row in cur.fetchall()]
        if not events:
            cur.execute(
                "SELECT 1 FROM audit_events WHERE tenant_id = %s AND stream_id = %s LIMIT 1",
                (tenant_id, stream_id),
            )
            if cur.fetchone() is None:
                raise IncidentNotFound(tenant_id, str(incident_id))
    return IncidentHistory(incident_id, known_at, as_of, events, fold_incident(events))


# Incident state fields that every event moves, or that only the fold itself uses.
_BOOKKEEPING_FIELDS = frozenset({"version", "updated_at", "resume_status"})
_STATE_FIELDS = [
    item.name for item in dataclasses.fields(IncidentState) if item.name not in _BOOKKEEPING_FIELDS
]
# Payload fields never listed as changes: digests of key secrets.
_HIDDEN_PAYLOAD_FIELDS = frozenset({"secret_sha256"})


@dataclass(frozen=True, slots=True)
class FieldChange:
    """One field an event changed. `before` is derived for incident state fields only, and
    is None for payload fields."""

    name: str
    after: Any
    before: Any = None


@dataclass(frozen=True, slots=True)
class EventChanges:
    """An event with the fields it changed.

    For an incident event, `source` is "state": the fields are those of the incident's
    folded state that differ before and after the event. For other events (tenant
    configuration, API keys), `source` is "payload": the event's payload fields, whose
    earlier values are not derived.
    """

    event: RecordedEvent
    source: str
    fields: list[FieldChange] = field(default_factory=list)


def read_changes(
    conn: psycopg.Connection[Any],
    tenant_id: str,
    audit_filter: AuditFilter,
    *,
    cursor: str | None = None,
    limit: int = DEFAULT_PAGE_SIZE,
) -> tuple[list[EventChanges], AuditPage]:
    """Read a page of events, as `read_page` does, each with the fields it changed.

    Run it inside `audit_transaction`. Each incident touched by the page is folded from its
    first event, so a change shows the value before it even when the earlier events fall
    outside the filter.
    """
    page = read_page(conn, tenant_id, audit_filter, cursor=cursor, limit=limit)
    streams = sorted({event.stream_id for event in page.events if incident_id_of(event.stream_id)})
    transitions = _incident_transitions(conn, tenant_id, streams)

    changes = []
    for event in page.events:
        if event.position in transitions:
            before, after = transitions[event.position]
            changes.append(EventChanges(event, "state", _state_changes(before, after)))
        else:
            fields = [
                FieldChange(name, value)
                for name, value in sorted(event.payload.items())
                if name not in _HIDDEN_PAYLOAD_FIELDS
            ]
            changes.append(EventChanges(event, "payload", fields))
    return changes, page


def _incident_transitions(
    conn: psycopg.Connection[Any], tenant_id: str, streams: list[str]
) -> dict[int, tuple[IncidentState | None, IncidentState | None]]:
    """Fold the given incident streams; return the state before and after each event,
    keyed by the event's position."""
    if not streams:
        return {}
    transitions: dict[int, tuple[IncidentState | None, IncidentState | None]] = {}
    query = sql.SQL(
        "SELECT {columns} FROM audit_events WHERE tenant_id = %s AND stream_id = ANY(%s) "
        "ORDER BY stream_id, stream_version"
    ).format(columns=_COLUMNS)
    state: IncidentState | None = None
    current_stream = None
    with conn.cursor() as cur:
        cur.execute(query, (tenant_id, streams))
        for row in cur:
            event = row_to_event(row)
            if event.stream_id != current_stream:
                current_stream, state = event.stream_id, None
            if event.event_type not in INCIDENT_EVENT_TYPES:
                continue
            after = evolve(state, event)
            transitions[event.position] = (state, after)
            state = after
    return transitions


def _state_changes(before: IncidentState | None, after: IncidentState | None) -> list[FieldChange]:
    changes = []
    for name in _STATE_FIELDS:
        old = getattr(before, name) if before is not None else None
        new = getattr(after, name) if after is not None else None
        if old != new:
            changes.append(FieldChange(name, new, old))
    return changes
