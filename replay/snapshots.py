"""Read-model snapshots: one tenant's rows of one projection at a known log position.

A snapshot is taken from the live read model and its checkpoint, read in one repeatable-read
transaction, so its rows are the fold of exactly the tenant's events up to that checkpoint.
It records the checkpoint, the latest `recorded_at` and `occurred_at` among those events,
their count, and the SHA-256 of its canonical JSON (the projection's `to_snapshot`), which
is stored zlib-compressed. Snapshots taken as lists of records, the first format, still load.
Snapshots are derived data: time travel starts from one to fold fewer events, and returns
the same states without any.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import threading
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import psycopg

from ledger.database import Database
from ledger.store import Checkpoint
from projections.base import Folded, Projection
from projections.runtime import replayable_projections

logger = logging.getLogger(__name__)

_INFO_COLUMNS = """
    tenant_id, projection, snapshot_id, tx_id, position, last_recorded_at, last_occurred_at,
    event_count, row_count, sha256, taken_at, length(content)
"""


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """A stored snapshot, without its rows. `compressed_bytes` is the size of its content."""

    tenant_id: str
    projection: str
    snapshot_id: int
    checkpoint: Checkpoint
    last_recorded_at: datetime
    last_occurred_at: datetime
    event_count: int
    row_count: int
    sha256: str
    taken_at: datetime
    compressed_bytes: int


def _info(row: tuple[Any, ...]) -> SnapshotInfo:
    tenant, name, snapshot_id, tx_id, position, recorded, occurred, events, rows, digest = row[:10]
    return SnapshotInfo(
        tenant,
        name,
        int(snapshot_id),
        Checkpoint(int(tx_id), int(position)),
        recorded,
        occurred,
        int(events),
        int(rows),
        bytes(digest).hex(),
        row[10],
        int(row[11]),
    )


def serialize(projection: Projection, states: Folded) -> bytes:
    """Return the canonical bytes of a tenant's rows: what a snapshot's SHA-256 covers."""
    return orjson.dumps(projection.to_snapshot(states), option=orjson.OPT_SORT_KEYS)


def take_snapshot(
    conn: psycopg.Connection[Any], projection: Projection, tenant_id: str
) -> SnapshotInfo | None:
    """Store a snapshot of one tenant's rows of `projection` at its checkpoint.

    Returns None, storing nothing, when the tenant has no events below the checkpoint or
    none since its latest snapshot. `conn` is a worker-role connection outside a transaction.
    """
    with conn.transaction():
        # One snapshot of the database for the checkpoint, the event figures and the rows.
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        # A plain read: load_checkpoint's INSERT ... ON CONFLICT fails with a serialization
        # failure at repeatable read when the projector has just moved the checkpoint.
        found = conn.execute(
            "SELECT tx_id::text::bigint, position FROM projection_checkpoints "
            "WHERE projection = %s",
            (projection.name,),
        ).fetchone()
        if found is None:
            return None
        checkpoint = Checkpoint(int(found[0]), int(found[1]))
        row = conn.execute(
            """
            SELECT count(*), max(recorded_at), max(occurred_at) FROM events
            WHERE tenant_id = %s AND (tx_id, position) <= (%s::text::xid8, %s)
            """,
            (tenant_id, str(checkpoint.tx_id), checkpoint.position),
        ).fetchone()
        assert row is not None
        event_count, last_recorded, last_occurred = row
        if event_count == 0:
            return None
        latest = conn.execute(
            "SELECT max(event_count) FROM projection_snapshots "
            "WHERE tenant_id = %s AND projection = %s",
            (tenant_id, projection.name),
        ).fetchone()
        # Events are never removed, so an equal count means the same events.
        if latest is not None and latest[0] == event_count:
            return None
        states = projection.read_states(conn, tenant_id)
        content = serialize(projection, states)
        stored = conn.execute(
            f"""
            INSERT INTO projection_snapshots (tenant_id, projection, tx_id, position,
                last_recorded_at, last_occurred_at, event_count, row_count, sha256, content)
            VALUES (%s, %s, %s::text::xid8, %s, %s, %s, %s, %s, %s, %s)
            RETURNING {_INFO_COLUMNS}
            """,
            (
                tenant_id,
                projection.name,
                str(checkpoint.tx_id),
                checkpoint.position,
                last_recorded,
                last_occurred,
                event_count,
                len(states),
                hashlib.sha256(content).digest(),
                zlib.compress(content, 6),
            ),
        ).fetchone()
    assert stored is not None
    return _info(stored)


def take_snapshots(
    database: Database,
    projections: Sequence[Projection] | None = None,
    *,
    tenant_id: str | None = None,
    should_stop: Any = None,
) -> tuple[list[SnapshotInfo], dict[str, str]]:
    """Snapshot each tenant (or one) of each projection; return the snapshots taken and
    the failures by "tenant/projection", which are logged and do not stop the others."""
    taken: list[SnapshotInfo] = []
    failed: dict[str, str] = {}
    with database.connect_worker() as conn:
        if tenant_id is not None:
            tenants = [tenant_id]
        else:
            with conn.transaction():
                tenants = [
                    row[0]
                    for row in conn.execute(
                        "SELECT DISTINCT tenant_id FROM streams ORDER BY tenant_id"
                    )
                ]
        for tenant in tenants:
            for projection in projections or replayable_projections():
                if should_stop is not None and should_stop():
                    return taken, failed
                try:
                    info = take_snapshot(conn, projection, tenant)
                except psycopg.Error as error:
                    logger.error(
                        "snapshot of projection %s for tenant %s failed: %s",
                        projection.name,
                        tenant,
                        error,
                    )
                    failed[f"{tenant}/{projection.name}"] = str(error)
                    continue
                if info is not None:
                    taken.append(info)
    return taken, failed


def list_snapshots(
    conn: psycopg.Connection[Any], tenant_id: str | None = None, projection: str | None = None
) -> list[SnapshotInfo]:
    query = f"SELECT {_INFO_COLUMNS} FROM projection_snapshots WHERE true"
    params: list[Any] = []
    if tenant_id is not None:
        query += " AND tenant_id = %s"
        params.append(tenant_id)
    if projection is not None:
        query += " AND projection = %s"
        params.append(projection)
    query += " ORDER BY tenant_id, projection, snapshot_id"
    return [_info(row) for row in conn.execute(query, params)]


def prune_snapshots(
    conn: psycopg.Connection[Any],
    *,
    keep: int,
    tenant_id: str | None = None,
    projection: str | None = None,
) -> int:
    """Delete all but the `keep` latest snapshots of each tenant and projection; return how
    many were deleted."""
    if keep < 0:
        raise ValueError(f"keep = {keep}: keep zero or more snapshots")
    cursor = conn.execute(
        """
        DELETE FROM projection_snapshots AS s
        USING (
            SELECT tenant_id, projection, snapshot_id,
                   row_number() OVER (PARTITION BY tenant_id, projection
                                      ORDER BY snapshot_id DESC) AS rank
            FROM projection_snapshots
            WHERE (%(tenant)s::text IS NULL OR tenant_id = %(tenant)s)
              AND (%(projection)s::text IS NULL OR projection = %(projection)s)
        ) AS ranked
        WHERE s.tenant_id = ranked.tenant_id AND s.projection = ranked.projection
          AND s.snapshot_id = ranked.snapshot_id AND ranked.rank > %(keep)s
        """,
        {"tenant": tenant_id, "projection": projection, "keep": keep},
    )
    return cursor.rowcount


@dataclass(frozen=True, slots=True)
class LoadedSnapshot:
    info: SnapshotInfo
    states: Folded


def nearest_snapshot(
    conn: psycopg.Connection[Any],
    projection: Projection,
    tenant_id: str,
    *,
    as_of: datetime | None,
    known_at: datetime | None,
) -> LoadedSnapshot | None:
    """Load the snapshot to start a replay at (`as_of`, `known_at`) from, or None.

    Usable means every event in it was recorded by `known_at`. With `as_of`, a model that is
    not stream-keyed also needs every event in it to have happened by `as_of`. Of the usable
    snapshots the latest is loaded, except with `as_of` on a stream-keyed model (see
    `_by_valid_time`). A snapshot whose content no longer matches its SHA-256, or that this
    version of the model cannot read, is skipped with a warning.
    """
    query = (
        f"SELECT {_INFO_COLUMNS} FROM projection_snapshots WHERE tenant_id = %s AND projection = %s"
    )
    params: list[Any] = [tenant_id, projection.name]
    if known_at is not None:
        query += " AND last_recorded_at <= %s"
        params.append(known_at)
    if as_of is not None and not projection.stream_keyed:
        query += " AND last_occurred_at <= %s"
        params.append(as_of)
    query += " ORDER BY tx_id DESC, position DESC"
    candidates = [_info(row) for row in conn.execute(query, params)]
    if as_of is not None and projection.stream_keyed:
        candidates = _by_valid_time(conn, candidates, as_of)
    for info in candidates:
        loaded = _load(conn, projection, info)
        if loaded is not None:
            return loaded
    return None


def _by_valid_time(
    conn: psycopg.Connection[Any], candidates: list[SnapshotInfo], as_of: datetime
) -> list[SnapshotInfo]:
    """Return, latest first, the snapshots worth starting a replay as of `as_of` from.

    A replay from a snapshot folds again every stream of it with an event after `as_of`,
    and every event after it that happened by then. Both are few for a snapshot whose
    tenant's last event, its frontier, happened shortly before `as_of`, when the log is
    roughly in valid-time order. A snapshot with a frontier after `as_of` contains
    the streams that started after it, which would all be folded again, so a fold from
    nothing costs less.
    """
    if not candidates:
        return []
    # NOTE: a history imported after newer events breaks the valid-time order that this
    # choice assumes. The replay returns the same states, but may fold more events.
    frontiers = dict(
        conn.execute(
            """
            SELECT s.snapshot_id, last_event.occurred_at
            FROM projection_snapshots AS s
            CROSS JOIN LATERAL (
                SELECT occurred_at FROM events
                WHERE tenant_id = s.tenant_id AND (tx_id, position) <= (s.tx_id, s.position)
                ORDER BY tx_id DESC, position DESC
                LIMIT 1
            ) AS last_event
            WHERE s.tenant_id = %s AND s.projection = %s AND s.snapshot_id = ANY(%s)
            """,
            (
                candidates[0].tenant_id,
                candidates[0].projection,
                [info.snapshot_id for info in candidates],
            ),
        ).fetchall()
    )
    return [
        info
        for info in candidates
        if info.last_occurred_at <= as_of
        or (frontiers.get(info.snapshot_id) is not None and frontiers[info.snapshot_id] <= as_of)
    ]


def _load(
    conn: psycopg.Connection[Any], projection: Projection, info: SnapshotInfo
) -> LoadedSnapshot | None:
    """Read, check and decode one snapshot's rows; None, with a warning, when it is unusable."""
    row = conn.execute(
        "SELECT content FROM projection_snapshots "
        "WHERE tenant_id = %s AND projection = %s AND snapshot_id = %s",
        (info.tenant_id, projection.name, info.snapshot_id),
    ).fetchone()
    if row is None:
        # Pruned since its figures were read.
        return None
    content = zlib.decompress(row[0])
    if hashlib.sha256(content).hexdigest() != info.sha256:
        logger.warning(
            "snapshot %d of projection %s for tenant %s does not match its SHA-256; skipped",
            info.snapshot_id,
            info.projection,
            info.tenant_id,
        )
        return None
    try:
        with _cycle_collection_paused():
            states = projection.from_snapshot(info.tenant_id, orjson.loads(content))
    except (ValueError, KeyError, TypeError) as error:
        # Derived data: a fold from the log gives the same states without it.
        logger.warning(
            "snapshot %d of projection %s for tenant %s cannot be read (%s); skipped",
            info.snapshot_id,
            info.projection,
            info.tenant_id,
            error,
        )
        return None
    return LoadedSnapshot(info, states)


@contextmanager
def _cycle_collection_paused() -> Iterator[None]:
    """Pause the cycle collector while a snapshot decodes.

    A decode allocates a few objects per row, each a reason for the collector to walk the
    young objects, and at times the whole heap, although these rows form no cycles. Other
    threads run without cycle collection meanwhile. The first pause to end turns it back
    on, unless it was off before.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def snapshot_job_function(database: Database) -> Any:
    """Return the scheduler job body that snapshots every tenant of every default model."""

    def run(stop: threading.Event) -> None:
        taken, failed = take_snapshots(database, should_stop=stop.is_set)
        if taken or failed:
            logger.info("snapshot run: %d taken, %d failed", len(taken), len(failed))

    return run
