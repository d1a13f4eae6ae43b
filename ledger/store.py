"""The append-only event store on PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import args_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from ledger.database import set_tenant
from ledger.errors import (
    ConcurrencyError,
    IdempotencyKeyReused,
    StreamTenantMismatch,
)
from ledger.events import (
    NewEvent,
    RecordedEvent,
    event_hash,
    normalize_json,
    require_aware,
)
from ledger.group_commit import GroupCommitter, Outcome, Work
from ledger.metrics import APPEND_CONFLICTS, APPEND_REPLAYS, EVENTS_APPENDED

logger = logging.getLogger(__name__)

T = TypeVar("T")

EVENT_COLUMNS = """
    position, tx_id, tenant_id, stream_id, stream_version, event_type,
    schema_version, payload, metadata, occurred_at, recorded_at, event_id, hash
"""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A reader's place in the log: the last (transaction id, position) it has read."""

    tx_id: int = 0
    position: int = 0


@dataclass(frozen=True, slots=True)
class PendingAppend:
    """An append waiting for its group-commit batch; its events are already prepared."""

    tenant_id: str
    stream_id: str
    events: list[NewEvent]
    expected_version: int | None


@dataclass(frozen=True, slots=True)
class AppendResult:
    """The stream version and positions of an append; `replayed` marks an idempotent retry."""

    stream_id: str
    stream_version: int
    positions: tuple[int, ...]
    replayed: bool = False


def row_to_event(row: tuple[Any, ...]) -> RecordedEvent:
    """Build an event from a row of EVENT_COLUMNS, which are in RecordedEvent's field order."""
    *fields, digest = row
    return RecordedEvent(*fields, bytes(digest))  # type: ignore[call-arg]


# EVENT_COLUMNS with payload and metadata only for the event types a parameter lists.
_SELECTED_PAYLOAD_COLUMNS = EVENT_COLUMNS.replace(
    "payload, metadata",
    "CASE WHEN event_type = ANY(%s) THEN payload ELSE '{}'::jsonb END, "
    "CASE WHEN event_type = ANY(%s) THEN metadata ELSE '{}'::jsonb END",
)


def read_after(
    conn: psycopg.Connection[Any],
    checkpoint: Checkpoint,
    limit: int,
    payload_types: Collection[str] | None = None,
) -> list[RecordedEvent]:
    """Read up to `limit` events after `checkpoint`, in commit-safe order.

    Only events written by transactions older than every transaction still in flight are
    returned, ordered by (transaction id, position). Positions come from a sequence and
    transactions commit out of position order, so a reader that trusted positions alone
    would step past an event whose transaction commits late. No event below the horizon
    can appear later, so the returned order never changes.

    With `payload_types`, only events of those types carry their payload and metadata.
    The others come with empty objects, which spares sending and decoding JSON that the
    reader would not look at. Every event is still returned, so a checkpoint set from the
    last one moves past them all.
    """
    columns = EVENT_COLUMNS
    params: list[Any] = []
    if payload_types is not None:
        columns = _SELECTED_PAYLOAD_COLUMNS
        types = sorted(payload_types)
        params = [types, types]
    # The columns come in RecordedEvent's field order, and bytea loads as bytes, so each row
    # is passed to the constructor as it is.
    with conn.cursor(row_factory=args_row(RecordedEvent)) as cur:
        cur.execute(
            f"""
            SELECT {columns}
            FROM events
            WHERE (tx_id, position) > (%s::text::xid8, %s)
              AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
            ORDER BY tx_id, position
            LIMIT %s
            """,
            (*params, str(checkpoint.tx_id), checkpoint.position, limit),
        )
        return cur.fetchall()


def _prepare_append(events: Sequence[NewEvent]) -> list[NewEvent]:
    """Check the events of one append and prepare them for storing."""
    if not events:
        raise ValueError("append needs at least one event")
    ids = [event.event_id for event in events]
    if len(set(ids)) != len(ids):
        repeated = next(event_id for event_id in ids if ids.count(event_id) > 1)
        raise ValueError(
            f"event id {repeated} appears more than once in one append; give each event its own id"
        )
    return [_prepare(event) for event in events]


def _counted(result: AppendResult, prepared: list[NewEvent]) -> AppendResult:
    """Count a finished append in the metrics and return it."""
    if result.replayed:
        APPEND_REPLAYS.inc()
    else:
        for event in prepared:
            EVENTS_APPENDED.labels(event.event_type).inc()
    return result


class PostgresEventStore:
    """Appends events with optimistic concurrency and reads them back.

    Each stream belongs to one tenant. An append names the version it expects the stream to
    be at (0 for a new stream, None to skip the check); a mismatch raises ConcurrencyError.
    Events carry ids: appending ids that are already stored returns the first result when the
    request is the same, and raises IdempotencyKeyReused when it is not.
    """

    def __init__(
        self, pool: ConnectionPool[Any], *, committer: GroupCommitter | None = None
    ) -> None:
        self.pool = pool
        # With a committer, appends without a connection of the caller's are committed in
        # batches with other callers' appends (ledger.group_commit).
        self.committer = committer
        if committer is not None and committer.batch_handler is None:
            committer.batch_handler = self._append_batch

    def run_in_transaction(self, tenant_id: str, work: Work[T], *, lock_key: str) -> T:
        """Run `work(conn)` in a transaction scoped to `tenant_id` and commit it.

        Through the committer when the store has one, so the transaction may be shared with
        other callers' work: `work` then runs in a savepoint of it, and its errors roll back
        only its own writes. `lock_key` is the stream whose head `work` locks.
        """
        if self.committer is not None:
            return self.committer.run(tenant_id, work, lock_key=lock_key)
        with self.pool.connection() as conn, conn.transaction():
            set_tenant(conn, tenant_id)
            return work(conn)

    def append(
        self,
        tenant_id: str,
        stream_id: str,
        events: Sequence[NewEvent],
        *,
        expected_version: int | None,
        conn: psycopg.Connection[Any] | None = None,
    ) -> AppendResult:
        """Append `events` to a stream in one transaction.

        Raises ConcurrencyError, StreamTenantMismatch, IdempotencyKeyReused or
        InvalidEventData, and nothing is stored when any of them is raised. With `conn` inside
        an open transaction, the append runs in a savepoint of it and is durable only when the
        caller commits. A retry that lost a race is then raised as a conflict, not replayed.
        """
        prepared = _prepare_append(events)
        try:
            result = self._append(tenant_id, stream_id, prepared, expected_version, conn)
        except ConcurrencyError:
            APPEND_CONFLICTS.inc()
            raise
        return _counted(result, prepared)

    async def append_async(
        self,
        tenant_id: str,
        stream_id: str,
        events: Sequence[NewEvent],
        *,
        expected_version: int | None,
    ) -> AppendResult:
        """Append `events` as `append` does, with the same results and errors, from an
        event loop.

        With a committer, the append joins the next batch and the caller waits for its
        COMMIT without holding a thread. Without one, `append` runs in a thread.
        """
        if self.committer is None:
            return await asyncio.to_thread(
                self.append, tenant_id, stream_id, events, expected_version=expected_version
            )
        prepared = _prepare_append(events)
        try:
            pending = PendingAppend(tenant_id, stream_id, prepared, expected_version)
            result = await self.committer.run_async(
                tenant_id, self._unbatched(pending), lock_key=stream_id, item=pending
            )
        except ConcurrencyError:
            APPEND_CONFLICTS.inc()
            raise
        return _counted(result, prepared)

    def _unbatched(self, pending: PendingAppend) -> Work[AppendResult]:
        """Return the work that appends `pending` alone, for when the batch handler leaves it
        out."""
        return lambda shared: self._append_or_replay(
            shared, pending.tenant_id, pending.stream_id, pending.events, pending.expected_version
        )

    def _append(
        self,
        tenant_id: str,
        stream_id: str,
        prepared: list[NewEvent],
        expected_version: int | None,
        conn: psycopg.Connection[Any] | None,
    ) -> AppendResult:
        if conn is not None:
            set_tenant(conn, tenant_id)
            with conn.transaction():
                return self._append_locked(conn, tenant_id, stream_id, prepared, expected_version)
        if self.committer is not None:
            pending = PendingAppend(tenant_id, stream_id, prepared, expected_version)
            return self.committer.run(
                tenant_id, self._unbatched(pending), lock_key=stream_id, item=pending
            )
        try:
            with self.pool.connection() as conn:
                set_tenant(conn, tenant_id)
                with conn.transaction():
                    return self._append_locked(
                        conn, tenant_id, stream_id, prepared, expected_version
                    )
        except (ConcurrencyError, pg_errors.UniqueViolation) as error:
            # A concurrent request with the same event ids may have won the race: if so,
            # this append is a retry of it and gets the first result.
            with self.pool.connection() as conn:
                set_tenant(conn, tenant_id)
                replay = find_stored(conn, tenant_id, stream_id, prepared)
            if replay is not None:
                return replay
            if isinstance(error, ConcurrencyError):
                raise
            with self.pool.connection() as conn:
                set_tenant(conn, tenant_id)
                current = _stream_version(conn, stream_id)
            raise ConcurrencyError(
                stream_id, expected_version if expected_version is not None else -1, current
            ) from error

    def _append_batch(
        self, conn: psycopg.Connection[Any], appends: list[PendingAppend]
    ) -> list[Outcome | None]:
        """Append many requests' events in one transaction with a few statements per tenant.

        Returns each append's (result, None) or (None, error). An append whose event ids are
        stored already, or repeat those of an earlier append of the batch, gets None: its
        replay or rejection is decided one by one afterwards. Raises a database error (a
        unique violation) when a concurrent transaction created a stream or event of the
        batch first. The caller then appends one at a time.
        """
        outcomes: list[Outcome | None] = [None] * len(appends)
        by_tenant: dict[str, list[int]] = {}
        for index, pending in enumerate(appends):
            by_tenant.setdefault(pending.tenant_id, []).append(index)
        for tenant_id, indexes in by_tenant.items():
            set_tenant(conn, tenant_id)
            self._append_tenant_batch(
                conn, tenant_id, [appends[i] for i in indexes], indexes, outcomes
            )
        return outcomes

    def _append_tenant_batch(
        self,
        conn: psycopg.Connection[Any],
        tenant_id: str,
        appends: list[PendingAppend],
        indexes: list[int],
        outcomes: list[Outcome | None],
    ) -> None:
        # Create the missing heads and lock all heads in stream order in one statement, as a
        # single append does, so that two transactions never take two heads in opposite orders.
        # NOTE: a new stream whose append is then rejected (a version conflict) keeps an
        # empty head at version 0, which reads and verify treat as no stream.
        streams = sorted({pending.stream_id for pending in appends})
        heads: dict[str, tuple[int, bytes | None]] = {}
        for stream_id, owner, version, head_hash in conn.execute(
            """
            INSERT INTO streams (stream_id, tenant_id, version, head_hash)
            SELECT stream_id, %s, 0, NULL FROM unnest(%s::text[]) AS stream_id
            ORDER BY stream_id
            ON CONFLICT (stream_id) DO UPDATE SET version = streams.version
            RETURNING stream_id, tenant_id, version, head_hash
            """,
            (tenant_id, streams),
        ):
            if owner == tenant_id:
                heads[stream_id] = (version, bytes(head_hash) if head_hash is not None else None)
        event_ids = [event.event_id for pending in appends for event in pending.events]
        stored = {
            row[0]
            for row in conn.execute(
                "SELECT event_id FROM events WHERE tenant_id = %s AND event_id = ANY(%s)",
                (tenant_id, event_ids),
            )
        }

        seen: set[UUID] = set()
        planned: list[tuple[int, str, int, list[UUID]]] = []
        rows: list[tuple[Any, ...]] = []
        for index, pending in zip(indexes, appends, strict=True):
            ids = {event.event_id for event in pending.events}
            if ids & stored or ids & seen or len(ids) != len(pending.events):
                continue  # a replay or a reused key: decided one by one
            version, previous = heads.get(pending.stream_id, (0, None))
            expected = pending.expected_version
            if expected is not None and expected != version:
                outcomes[index] = (None, ConcurrencyError(pending.stream_id, expected, version))
                continue
            new_rows, previous = _event_rows(
                tenant_id, pending.stream_id, version, previous, pending.events
            )
            rows.extend(new_rows)
            version += len(pending.events)
            heads[pending.stream_id] = (version, previous)
            seen |= ids
            planned.append(
                (index, pending.stream_id, version, [e.event_id for e in pending.events])
            )
        if not rows:
            return

        columns = list(zip(*rows, strict=True))
        positions = dict(
            conn.execute(
                """
                INSERT INTO events (tenant_id, stream_id, stream_version, event_type,
                    schema_version, payload, metadata, occurred_at, event_id, hash)
                SELECT * FROM unnest(%s::text[], %s::text[], %s::int[], %s::text[],
                    %s::smallint[], %s::jsonb[], %s::jsonb[], %s::timestamptz[], %s::uuid[],
                    %s::bytea[])
                RETURNING event_id, position
                """,
                [list(column) for column in columns],
            ).fetchall()
        )
        touched = sorted({stream_id for _, stream_id, _, _ in planned})
        conn.execute(
            """
            INSERT INTO streams (stream_id, tenant_id, version, head_hash)
            SELECT * FROM unnest(%s::text[], %s::text[], %s::int[], %s::bytea[])
            ON CONFLICT (stream_id) DO UPDATE
                SET version = EXCLUDED.version, head_hash = EXCLUDED.head_hash
            """,
            (
                touched,
                [tenant_id] * len(touched),
                [heads[stream_id][0] for stream_id in touched],
                [heads[stream_id][1] for stream_id in touched],
            ),
        )
        for index, stream_id, version, appended_ids in planned:
            result = AppendResult(stream_id, version, tuple(positions[i] for i in appended_ids))
            outcomes[index] = (result, None)

    def _append_or_replay(
        self,
        conn: psycopg.Connection[Any],
        tenant_id: str,
        stream_id: str,
        prepared: list[NewEvent],
        expected_version: int | None,
    ) -> AppendResult:
        """Append inside the caller's transaction, or return the stored result of a retry.

        The append runs in a savepoint, so that after a unique violation (a concurrent
        request with the same event ids committed first) the transaction can still look
        the first result up.
        """
        try:
            with conn.transaction():
                return self._append_locked(conn, tenant_id, stream_id, prepared, expected_version)
        except (ConcurrencyError, pg_errors.UniqueViolation) as error:
            replay = find_stored(conn, tenant_id, stream_id, prepared)
            if replay is not None:
                return replay
            if isinstance(error, ConcurrencyError):
                raise
            current = _stream_version(conn, stream_id)
            raise ConcurrencyError(
                stream_id, expected_version if expected_version is not None else -1, current
            ) from error

    def _append_locked(
        self,
        conn: psycopg.Connection[Any],
        tenant_id: str,
        stream_id: str,
        events: list[NewEvent],
        expected_version: int | None,
    ) -> AppendResult:
        # Lock the stream head. Creating the row first means two appends to a new stream
        # queue on the same lock instead of racing on the unique index.
        conn.execute(
            """
            INSERT INTO streams (stream_id, tenant_id, version, head_hash)
            VALUES (%s, %s, 0, NULL)
            ON CONFLICT (stream_id) DO NOTHING
            """,
            (stream_id, tenant_id),
        )
        head = conn.execute(
            "SELECT tenant_id, version, head_hash FROM streams WHERE stream_id = %s FOR UPDATE",
            (stream_id,),
        ).fetchone()
        # Under row-level security another tenant's stream head is not even visible.
        if head is None or head[0] != tenant_id:
            raise StreamTenantMismatch(stream_id, tenant_id)
        _, version, head_hash = head

        # Checked under the lock, so a retry that arrives after the first request committed
        # gets the first result rather than a version conflict.
        replay = find_stored(conn, tenant_id, stream_id, events)
        if replay is not None:
            return replay
        if expected_version is not None and expected_version != version:
            raise ConcurrencyError(stream_id, expected_version, version)

        previous = bytes(head_hash) if head_hash is not None else None
        rows, previous = _event_rows(tenant_id, stream_id, version, previous, events)

        positions = []
        with conn.cursor() as cur:
            cur.executemany(
                """
                INSERT INTO events (tenant_id, stream_id, stream_version, event_type,
                    schema_version, payload, metadata, occurred_at, event_id, hash)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                RETURNING position
                """,
                rows,
                returning=True,
            )
            while True:
                row = cur.fetchone()
                assert row is not None
                positions.append(row[0])
                if not cur.nextset():
                    break
        new_version = version + len(events)
        conn.execute(
            "UPDATE streams SET version = %s, head_hash = %s WHERE stream_id = %s",
            (new_version, previous, stream_id),
        )
        return AppendResult(stream_id, new_version, tuple(positions))

    def read_stream(
        self,
        tenant_id: str,
        stream_id: str,
        *,
        occurred_until: datetime | None = None,
    ) -> list[RecordedEvent]:
        """Read a tenant's stream in version order; empty when it does not exist."""
        with self.pool.connection() as conn:
            set_tenant(conn, tenant_id)
            return read_stream(conn, tenant_id, stream_id, occurred_until=occurred_until)

    def stream_version(self, tenant_id: str, stream_id: str) -> int:
        with self.pool.connection() as conn:
            set_tenant(conn, tenant_id)
            row = conn.execute(
                "SELECT version FROM streams WHERE stream_id = %s AND tenant_id = %s",
                (stream_id, tenant_id),
            ).fetchone()
        return int(row[0]) if row else 0


def read_stream(
    conn: psycopg.Connection[Any],
    tenant_id: str,
    stream_id: str,
    *,
    occurred_until: datetime | None = None,
) -> list[RecordedEvent]:
    query = f"SELECT {EVENT_COLUMNS} FROM events WHERE tenant_id = %s AND stream_id = %s"
    params: list[Any] = [tenant_id, stream_id]
    if occurred_until is not None:
        query += " AND occurred_at <= %s"
        params.append(occurred_until)
    query += " ORDER BY stream_version"
    with conn.cursor() as cur:
        cur.execute(query, params)
        return [row_to_event(row) for row in cur.fetchall()]


def _event_rows(
    tenant_id: str,
    stream_id: str,
    version: int,
    previous: bytes | None,
    events: Sequence[NewEvent],
) -> tuple[list[tuple[Any, ...]], bytes | None]:
    """Return the INSERT rows of events appended after `version`, chained from `previous`,
    and the hash of the last of them."""
    rows = []
    for offset, event in enumerate(events, start=1):
        stream_version = version + offset
        digest = event_hash(
            previous,
            tenant_id=tenant_id,
            stream_id=stream_id,
            stream_version=stream_version,
            event_type=event.event_type,
            schema_version=event.schema_version,
            event_id=event.event_id,
            occurred_at=event.occurred_at,
            payload=event.payload,
            metadata=event.metadata,
        )
        rows.append(
            (
                tenant_id,
                stream_id,
                stream_version,
                event.event_type,
                event.schema_version,
                Jsonb(event.payload),
                Jsonb(event.metadata),
                event.occurred_at,
                event.event_id,
                digest,
            )
        )
        previous = digest
    return rows, previous


def _prepare(event: NewEvent) -> NewEvent:
    require_aware(event.occurred_at, "occurred_at")
    if not event.event_type or not event.event_type.isidentifier():
        raise ValueError(f"invalid event type {event.event_type!r}: use a CamelCase name")
    return NewEvent(
        event_type=event.event_type,
        payload=normalize_json(event.payload, "payload"),
        occurred_at=event.occurred_at,
        event_id=event.event_id,
        metadata=normalize_json(event.metadata, "metadata"),
        schema_version=event.schema_version,
    )


def _stream_version(conn: psycopg.Connection[Any], stream_id: str) -> int:
    row = conn.execute("SELECT version FROM streams WHERE stream_id = %s", (stream_id,)).fetchone()
    return int(row[0]) if row else 0


def find_stored(
    conn: psycopg.Connection[Any],
    tenant_id: str,
    stream_id: str,
    events: Sequence[NewEvent],
) -> AppendResult | None:
    """Return the stored result when these event ids were appended before.

    The earlier append counts as the same request when it went to the same stream with the
    same request hash (or, for events without one, the same type and payload). Anything else
    is a reused key.
    """
    ids: list[UUID] = [event.event_id for event in events]
    stored = conn.execute(
        """
        SELECT event_id, stream_id, stream_version, position, event_type, payload,
               metadata->>'request_hash'
        FROM events WHERE tenant_id = %s AND event_id = ANY(%s)
        ORDER BY stream_version
        """,
        (tenant_id, ids),
    ).fetchall()
    if not stored:
        return None
    by_id = {row[0]: row for row in stored}
    key = str(events[0].metadata.get("idempotency_key") or events[0].event_id)
    if len(by_id) != len(events):
        raise IdempotencyKeyReused(key)
    for event in events:
        _, stored_stream, _, _, event_type, payload, request_hash = by_id[event.event_id]
        if event.metadata.get("request_hash") is not None:
            same_request = (
                stored_stream == stream_id and request_hash == event.metadata["request_hash"]
            )
        else:
            same_request = (
                stored_stream == stream_id
                and event_type == event.event_type
                and payload == event.payload
            )
        if not same_request:
            raise IdempotencyKeyReused(key)
    last = max(stored, key=lambda row: row[2])
    return AppendResult(
        stream_id=stream_id,
        stream_version=last[2],
        positions=tuple(row[3] for row in stored),
        replayed=True,
    )
