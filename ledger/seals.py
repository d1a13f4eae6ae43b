"""Seals: Merkle roots over each tenant's log, appended to the log as events.

Each event's stream hash covers its content and the hash before it in its stream, but not
the values the database assigns: position, transaction id and `recorded_at`. A seal covers
those. It is a `LedgerSealed` event in the tenant's stream `seals-<tenant>`, holding the
RFC 6962 Merkle root over the tenant's events in (tx_id, position) order after the
previous seal's range, and the previous seal's root. Each leaf binds one event's position,
transaction id, `recorded_at` and stored hash.

A seal only covers events below the transaction horizon, as the log readers do, so no
transaction that commits later can add an event inside a sealed range. A seal event is an
ordinary event and the next seal covers it.

`verify` in `ledger.verification` recomputes the chains and the seals.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg_pool import ConnectionPool

from ledger.database import Database
from ledger.errors import ConcurrencyError, InvalidSeal, LedgerError, TenantNotFound
from ledger.events import JsonObject, NewEvent, utc_text
from ledger.ids import derived_id
from ledger.merkle import MerkleRoot, leaf_hash
from ledger.store import Checkpoint, PostgresEventStore

logger = logging.getLogger(__name__)

SEAL_EVENT_TYPE = "LedgerSealed"
# Written into each seal, so that a later change of the tree or of the leaf layout is not
# mistaken for tampering.
MERKLE_ALGORITHM = "rfc6962-sha256"
LEAF_VERSION = 1
# Each seal also stores this many leading bytes of every leaf hash, in order. They add
# nothing to the proof, which is the root, but let `verify` name the event that no longer
# matches. Four bytes cost about 5.3 characters of base64 per event.
LEAF_PREFIX_BYTES = 4

# Rows fetched per round trip by the server-side cursors that walk a tenant's log.
SCAN_BATCH_ROWS = 5000

_LEAF_NUMBERS = struct.Struct(">QQ")
_cursor_numbers = itertools.count()


def seal_stream_id(tenant_id: str) -> str:
    return f"seals-{tenant_id}"


def leaf_data(position: int, tx_id: int, recorded_at: datetime, stored_hash: bytes) -> bytes:
    """Return the bytes a seal's leaf covers for one event.

    Position and transaction id as 8-byte big-endian integers, then `recorded_at` in UTC as
    `utc_text` writes it (ISO 8601 with microseconds, 32 ASCII characters), then the event's
    stored hash, which covers the event's tenant, stream, version and content.
    """
    return _LEAF_NUMBERS.pack(position, tx_id) + utc_text(recorded_at).encode("ascii") + stored_hash


def event_leaf(position: int, tx_id: int, recorded_at: datetime, stored_hash: bytes) -> bytes:
    """Return the leaf hash of one event."""
    return leaf_hash(leaf_data(position, tx_id, recorded_at, stored_hash))


@dataclass(frozen=True, slots=True)
class Seal:
    """A stored seal: the Merkle root over one range of a tenant's log.

    The range runs in (tx_id, position) order from just after `after` up to and including
    `through`.
    """

    tenant_id: str
    after: Checkpoint
    through: Checkpoint
    event_count: int
    merkle_root: bytes
    previous_root: bytes | None
    stream_version: int
    position: int

    def describe(self) -> str:
        return f"seal {self.stream_version} (position {self.position})"


def seal_from_event(
    tenant_id: str, stream_version: int, position: int, payload: JsonObject
) -> Seal:
    """Read a seal from its event's payload; raises InvalidSeal when it is malformed."""
    where = f"seal {stream_version} (position {position}) of tenant {tenant_id}"
    try:
        if payload["algorithm"] != MERKLE_ALGORITHM or payload["leaf_version"] != LEAF_VERSION:
            raise InvalidSeal(
                f"{where} uses {payload['algorithm']} with leaf version "
                f"{payload['leaf_version']}; this version of CivicPulse checks only "
                f"{MERKLE_ALGORITHM} with leaf version {LEAF_VERSION}"
            )
        previous = payload["previous_root"]
        return Seal(
            tenant_id=tenant_id,
            after=_checkpoint(payload["after"]),
            through=_checkpoint(payload["through"]),
            event_count=int(payload["event_count"]),
            merkle_root=bytes.fromhex(payload["merkle_root"]),
            previous_root=bytes.fromhex(previous) if previous is not None else None,
            stream_version=stream_version,
            position=position,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise InvalidSeal(f"{where} has an invalid payload: {error!r}") from error


def _checkpoint(value: Any) -> Checkpoint:
    return Checkpoint(int(value["tx_id"]), int(value["position"]))


def _checkpoint_json(checkpoint: Checkpoint) -> JsonObject:
    return {"tx_id": checkpoint.tx_id, "position": checkpoint.position}


def decode_leaf_prefixes(text: str) -> list[bytes]:
    """Split a seal's `leaf_prefixes` (base64) into one prefix per sealed event."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidSeal(f"leaf_prefixes is not valid base64: {error}") from error
    if len(raw) % LEAF_PREFIX_BYTES:
        raise InvalidSeal(
            f"leaf_prefixes contains {len(raw)} bytes, not a multiple of {LEAF_PREFIX_BYTES}"
        )
    return [
        raw[index : index + LEAF_PREFIX_BYTES] for index in range(0, len(raw), LEAF_PREFIX_BYTES)
    ]


# Reading the log -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogRow:
    """The columns of an event that its seal leaf covers, and its stream."""

    position: int
    tx_id: int
    recorded_at: datetime
    hash: bytes
    stream_id: str

    @property
    def key(self) -> tuple[int, int]:
        return (self.tx_id, self.position)

    def leaf(self) -> bytes:
        return event_leaf(self.position, self.tx_id, self.recorded_at, self.hash)


def log_rows(
    conn: psycopg.Connection[Any],
    tenant_id: str,
    after: Checkpoint,
    *,
    through: Checkpoint | None = None,
    below_tx_id: int | None = None,
) -> Iterator[LogRow]:
    """Yield a tenant's events after `after` in (tx_id, position) order.

    Stops after `through` when given, and skips transactions from `below_tx_id` on. Reads
    through a server-side cursor in batches, so a large tenant is never held in memory.
    `conn` must be inside a transaction.
    """
    # No index leads with the tenant in log order, and none is added, because one more
    # index on events slowed the Boston import by about 15%. PostgreSQL 15 walks the
    # (tx_id, position) index for a large share of the log or a short range, and reads a
    # small tenant by its primary key and sorts it.
    query = """
        SELECT position, tx_id, recorded_at, hash, stream_id
        FROM events
        WHERE tenant_id = %s AND (tx_id, position) > (%s::text::xid8, %s)
    """
    params: list[Any] = [tenant_id, str(after.tx_id), after.position]
    if through is not None:
        query += " AND (tx_id, position) <= (%s::text::xid8, %s)"
        params += [str(through.tx_id), through.position]
    if below_tx_id is not None:
        query += " AND tx_id < %s::text::xid8"
        params.append(str(below_tx_id))
    query += " ORDER BY tx_id, position"
    with conn.cursor(name=f"log_rows_{next(_cursor_numbers)}") as cur:
        cur.itersize = SCAN_BATCH_ROWS
        cur.execute(query, params)
        for position, tx_id, recorded_at, digest, stream_id in cur:
            yield LogRow(position, tx_id, recorded_at, digest, stream_id)


def transaction_horizon(conn: psycopg.Connection[Any]) -> int:
    """Return the oldest transaction id still in flight: every older one has ended."""
    row = conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())").fetchone()
    assert row is not None
    return int(row[0])


def load_seals(conn: psycopg.Connection[Any], tenant_id: str) -> list[tuple[int, int, str, Any]]:
    """Return (stream version, position, event type, payload) of each event in the tenant's
    seal stream, in version order, without the leaf prefixes."""
    rows = conn.execute(
        """
        SELECT stream_version, position, event_type, payload - 'leaf_prefixes'
        FROM events WHERE tenant_id = %s AND stream_id = %s
        ORDER BY stream_version
        """,
        (tenant_id, seal_stream_id(tenant_id)),
    ).fetchall()
    return [
        (int(version), int(position), kind, payload) for version, position, kind, payload in rows
    ]


def latest_seal(conn: psycopg.Connection[Any], tenant_id: str) -> Seal | None:
    """Return the tenant's last seal, or None before the first.

    Raises InvalidSeal when the last event of the seal stream is not a readable seal.
    """
    row = conn.execute(
        """
        SELECT stream_version, position, event_type, payload - 'leaf_prefixes'
        FROM events WHERE tenant_id = %s AND stream_id = %s
        ORDER BY stream_version DESC LIMIT 1
        """,
        (tenant_id, seal_stream_id(tenant_id)),
    ).fetchone()
    if row is None:
        return None
    version, position, event_type, payload = row
    if event_type != SEAL_EVENT_TYPE:
        raise InvalidSeal(
            f"the last event of {seal_stream_id(tenant_id)} (version {version}, position "
            f"{position}) is a {event_type} event, not a {SEAL_EVENT_TYPE}; run "
            "`civicpulse verify` to find out what changed"
        )
    return seal_from_event(tenant_id, version, position, payload)


# Sealing -------------------------------------------------------------------------------


@dataclass(slots=True)
class _PendingSeal:
    """A range scanned for the next seal, not yet appended."""

    through: Checkpoint
    tree: MerkleRoot = field(default_factory=MerkleRoot)
    prefixes: bytearray = field(default_factory=bytearray)
    ledger_events: int = 0


def _scan_unsealed(
    conn: psycopg.Connection[Any], tenant_id: str, after: Checkpoint
) -> _PendingSeal | None:
    # The horizon is read before the scan starts, so every transaction below it has ended
    # and its events are visible to the scan. Transactions from the horizon on stay out,
    # because one of them may still be in flight and later commit an event that sorts
    # before events already committed by a newer transaction.
    horizon = transaction_horizon(conn)
    seal_stream = seal_stream_id(tenant_id)
    pending: _PendingSeal | None = None
    for row in log_rows(conn, tenant_id, after, below_tx_id=horizon):
        if pending is None:
            pending = _PendingSeal(Checkpoint(row.tx_id, row.position))
        leaf = row.leaf()
        pending.tree.add(leaf)
        pending.prefixes += leaf[:LEAF_PREFIX_BYTES]
        pending.through = Checkpoint(row.tx_id, row.position)
        if row.stream_id != seal_stream:
            pending.ledger_events += 1
    return pending


def seal_event_id(tenant_id: str, through: Checkpoint) -> UUID:
    """Return the seal's event id, derived from its range so a retry appends nothing."""
    return derived_id(tenant_id, "seal", str(through.tx_id), str(through.position))


def seal_tenant(
    database: Database, store: PostgresEventStore, tenant_id: str, *, actor: str
) -> Seal | None:
    """Append a seal over the tenant's events since its last seal.

    Returns None when there is nothing new to seal (no events, or only the last seal
    itself), and when another process appended a seal first. The append names the seal
    stream's current version, so of two processes racing only one seal is stored.
    """
    with database.connect_worker(application_name="civicpulse-seal") as conn:
        previous = latest_seal(conn, tenant_id)
        after = previous.through if previous is not None else Checkpoint()
        pending = _scan_unsealed(conn, tenant_id, after)
    if pending is None or pending.ledger_events == 0:
        logger.debug("tenant %s has no new events to seal", tenant_id)
        return None

    root = pending.tree.root()
    payload: JsonObject = {
        "after": _checkpoint_json(after),
        "through": _checkpoint_json(pending.through),
        "event_count": pending.tree.count,
        "merkle_root": root.hex(),
        "previous_root": previous.merkle_root.hex() if previous is not None else None,
        "algorithm": MERKLE_ALGORITHM,
        "leaf_version": LEAF_VERSION,
        "leaf_prefixes": base64.b64encode(pending.prefixes).decode("ascii"),
    }
    event = NewEvent(
        SEAL_EVENT_TYPE,
        payload,
        datetime.now(UTC),
        event_id=seal_event_id(tenant_id, pending.through),
        metadata={
            "actor": actor,
            "role": "system",
            "channel": "seal",
            "process": f"{socket.gethostname()}:{os.getpid()}",
        },
    )
    expected_version = previous.stream_version if previous is not None else 0
    try:
        result = store.append(
            tenant_id, seal_stream_id(tenant_id), [event], expected_version=expected_version
        )
    except ConcurrencyError as error:
        logger.info(
            "tenant %s was sealed by another process first; this seal through position %d "
            "was dropped (%s)",
            tenant_id,
            pending.through.position,
            error,
        )
        return None
    if result.replayed:
        logger.info(
            "tenant %s already has this seal through position %d (appended by another "
            "process or an earlier try)",
            tenant_id,
            pending.through.position,
        )
        return None

    seal = Seal(
        tenant_id=tenant_id,
        after=after,
        through=pending.through,
        event_count=pending.tree.count,
        merkle_root=root,
        previous_root=previous.merkle_root if previous is not None else None,
        stream_version=result.stream_version,
        position=result.positions[0],
    )
    logger.info(
        "sealed tenant %s: %d events through position %d, root %s",
        tenant_id,
        seal.event_count,
        seal.through.position,
        root.hex(),
    )
    return seal


@dataclass(slots=True)
class SealReport:
    """The outcome of one sealing run: new seals, tenants with nothing new, failures."""

    sealed: list[Seal] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def list_tenants(conn: psycopg.Connection[Any]) -> list[str]:
    rows = conn.execute("SELECT DISTINCT tenant_id FROM streams ORDER BY tenant_id").fetchall()
    return [row[0] for row in rows]


def seal_all(
    database: Database,
    *,
    tenant_id: str | None = None,
    actor: str = "cli",
    should_stop: Callable[[], bool] = lambda: False,
) -> SealReport:
    """Append one seal for each tenant with new events, or for `tenant_id` only.

    A tenant whose seal fails is logged and reported, and the others are still sealed.
    Connection failures are raised, and TenantNotFound for an unknown `tenant_id`.
    `should_stop` is checked between tenants.
    """
    report = SealReport()
    with database.connect_worker() as conn:
        tenants = list_tenants(conn)
    if tenant_id is not None:
        if tenant_id not in tenants:
            raise TenantNotFound(tenant_id)
        tenants = [tenant_id]
    pool: ConnectionPool[Any] = ConnectionPool(
        database.worker_conninfo,
        min_size=1,
        max_size=1,
        open=True,
        kwargs={"application_name": "civicpulse-seal"},
    )
    with pool:
        store = PostgresEventStore(pool)
        for tenant in tenants:
            if should_stop():
                logger.info("sealing stopped before tenant %s", tenant)
                break
            try:
                seal = seal_tenant(database, store, tenant, actor=actor)
            except psycopg.OperationalError:
                raise
            except (LedgerError, psycopg.Error) as error:
                logger.error("sealing tenant %s failed: %s; the next run retries it", tenant, error)
                report.failed[tenant] = str(error)
                continue
            if seal is None:
                report.unchanged.append(tenant)
            else:
                report.sealed.append(seal)
    return report
