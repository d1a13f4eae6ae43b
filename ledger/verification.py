"""Recompute every stream's hash chain and every seal, and name what does not match.

All reads run as the worker role in one repeatable-read transaction, so chains, stream
heads and seals are checked against one consistent snapshot of the log while appends go
on. Tenants are read one at a time through server-side cursors, so memory grows with the
number of seals, not with the number of events. The exception is a seal that no longer
matches: naming its changed events keeps each event's leaf prefix and position in memory.
"""

from __future__ import annotations

import itertools
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from uuid import UUID

import psycopg

from ledger.database import Database
from ledger.errors import InvalidSeal, TenantNotFound
from ledger.events import RecordedEvent, recorded_event_hash
from ledger.merkle import MerkleRoot
from ledger.seals import (
    LEAF_PREFIX_BYTES,
    SCAN_BATCH_ROWS,
    SEAL_EVENT_TYPE,
    Seal,
    decode_leaf_prefixes,
    load_seals,
    log_rows,
    seal_from_event,
    seal_stream_id,
)
from ledger.store import EVENT_COLUMNS, Checkpoint, row_to_event

DEFAULT_MAX_MISMATCHES = 100

_cursor_numbers = itertools.count()


class MismatchKind(StrEnum):
    """The kind of check that failed."""

    CONTENT_HASH = "content hash"
    PREVIOUS_LINK = "link to previous"
    MISSING_VERSION = "missing version"
    STREAM_HEAD = "stream head"
    INVALID_SEAL = "invalid seal"
    SEAL_LINK = "seal link"
    SEAL_ROOT = "seal root"
    SEAL_COUNT = "sealed event count"


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One place where the stored log differs from what its hashes or seals commit to.

    Event fields are None where no stored event can be named, as for a deleted one.
    """

    kind: MismatchKind
    tenant_id: str
    detail: str
    stream_id: str | None = None
    stream_version: int | None = None
    position: int | None = None
    event_id: UUID | None = None
    seal_version: int | None = None
    seal_position: int | None = None

    def __str__(self) -> str:
        where = [f"tenant {self.tenant_id}"]
        if self.seal_version is not None:
            where.append(f"seal {self.seal_version} (position {self.seal_position})")
        if self.stream_id is not None:
            where.append(f"stream {self.stream_id}")
        if self.stream_version is not None:
            where.append(f"version {self.stream_version}")
        if self.position is not None:
            where.append(f"position {self.position}")
        if self.event_id is not None:
            where.append(f"event {self.event_id}")
        return f"{self.kind} mismatch at {', '.join(where)}: {self.detail}"


@dataclass(slots=True)
class TenantVerification:
    """Counts of what `verify` checked for one tenant, and its latest seal."""

    tenant_id: str
    streams: int = 0
    events: int = 0
    seals: int = 0
    sealed_events: int = 0
    unsealed_events: int = 0
    latest_seal: Seal | None = None


@dataclass(slots=True)
class VerificationResult:
    """The outcome of `verify`: counts per tenant and every mismatch found.

    `truncated` is true when checking stopped at the maximum number of mismatches, so
    later tenants or events were not checked.
    """

    tenants: list[TenantVerification] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return not self.mismatches

    @property
    def events(self) -> int:
        return sum(tenant.events for tenant in self.tenants)

    @property
    def streams(self) -> int:
        return sum(tenant.streams for tenant in self.tenants)

    @property
    def seals(self) -> int:
        return sum(tenant.seals for tenant in self.tenants)


class _Findings:
    def __init__(self, limit: int) -> None:
        self.mismatches: list[Mismatch] = []
        self.limit = limit

    @property
    def full(self) -> bool:
        return len(self.mismatches) >= self.limit

    def add(self, mismatch: Mismatch) -> None:
        if not self.full:
            self.mismatches.append(mismatch)


def verify(
    database: Database,
    tenant_id: str | None = None,
    *,
    max_mismatches: int = DEFAULT_MAX_MISMATCHES,
) -> VerificationResult:
    """Check the hash chain of every stream and every seal, of one tenant or of all.

    For each stream, versions must run 1..n, each stored hash must match the event's
    content chained to the previous event's stored hash, and the stream head must name the
    last event. For each seal, the Merkle root and count over its range must match, and it
    must link to the previous seal's root and start where that seal ended. Checking stops
    after `max_mismatches` mismatches. Raises TenantNotFound for an unknown `tenant_id`.
    """
    with database.connect_worker(application_name="civicpulse-verify") as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        return verify_on(conn, tenant_id, max_mismatches=max_mismatches)


def verify_on(
    conn: psycopg.Connection[Any],
    tenant_id: str | None = None,
    *,
    max_mismatches: int = DEFAULT_MAX_MISMATCHES,
) -> VerificationResult:
    """Run `verify` on `conn`, which the caller gives one snapshot (repeatable read).

    With the application role, the caller also sets the tenant, and only that tenant's
    rows are visible.
    """
    if max_mismatches < 1:
        raise ValueError(f"max_mismatches = {max_mismatches} must be at least 1")
    findings = _Findings(max_mismatches)
    result = VerificationResult()
    tenants = _tenants(conn) if tenant_id is None else [tenant_id]
    if tenant_id is not None and tenant_id not in _tenants(conn, tenant_id):
        raise TenantNotFound(tenant_id)
    for tenant in tenants:
        if findings.full:
            break
        checked = TenantVerification(tenant)
        result.tenants.append(checked)
        _verify_chains(conn, checked, findings)
        if not findings.full:
            _verify_stream_heads(conn, checked, findings)
        if not findings.full:
            _verify_seals(conn, checked, findings)
    result.mismatches = findings.mismatches
    result.truncated = findings.full
    return result


def _tenants(conn: psycopg.Connection[Any], only: str | None = None) -> list[str]:
    # Events and stream heads both count: deleting every event of a tenant leaves its heads.
    rows = conn.execute(
        """
        SELECT tenant_id FROM (
            SELECT DISTINCT tenant_id FROM events
            UNION SELECT tenant_id FROM streams
        ) AS tenants
        WHERE %s::text IS NULL OR tenant_id = %s
        ORDER BY tenant_id
        """,
        (only, only),
    ).fetchall()
    return [row[0] for row in rows]


# Hash chains ---------------------------------------------------------------------------


def _tenant_events_by_stream(
    conn: psycopg.Connection[Any], tenant_id: str
) -> Iterator[RecordedEvent]:
    with conn.cursor(name=f"verify_chains_{next(_cursor_numbers)}") as cur:
        cur.itersize = SCAN_BATCH_ROWS
        cur.execute(
            f"""
            SELECT {EVENT_COLUMNS} FROM events WHERE tenant_id = %s
            ORDER BY stream_id, stream_version
            """,
            (tenant_id,),
        )
        for row in cur:
            yield row_to_event(row)


def _verify_chains(
    conn: psycopg.Connection[Any], checked: TenantVerification, findings: _Findings
) -> None:
    stream_id: str | None = None
    next_version = 1
    # The previous event's stored hash, and its hash as recomputed from the contents of
    # its stream from version 1. They differ once a stored hash in the stream was changed.
    stored_previous: bytes | None = None
    recomputed_previous: bytes | None = None
    for event in _tenant_events_by_stream(conn, checked.tenant_id):
        checked.events += 1
        if event.stream_id != stream_id:
            stream_id = event.stream_id
            checked.streams += 1
            next_version = 1
            stored_previous = recomputed_previous = None

        if event.stream_version != next_version:
            findings.add(_version_gap(event, next_version))
            # The predecessor is missing, so this event's link cannot be checked.
            recomputed = event.hash
        else:
            expected = recorded_event_hash(event, stored_previous)
            recomputed = (
                expected
                if recomputed_previous == stored_previous
                else recorded_event_hash(event, recomputed_previous)
            )
            if expected != event.hash:
                findings.add(_hash_mismatch(event, recomputed == event.hash))

        stored_previous = event.hash
        recomputed_previous = recomputed
        next_version = event.stream_version + 1
        if findings.full:
            return


def _event_mismatch(kind: MismatchKind, event: RecordedEvent, detail: str) -> Mismatch:
    return Mismatch(
        kind,
        event.tenant_id,
        detail,
        stream_id=event.stream_id,
        stream_version=event.stream_version,
        position=event.position,
        event_id=event.event_id,
    )


def _hash_mismatch(event: RecordedEvent, matches_recomputed_chain: bool) -> Mismatch:
    version = event.stream_version
    if matches_recomputed_chain:
        return _event_mismatch(
            MismatchKind.PREVIOUS_LINK,
            event,
            f"the stored hash matches this event's content chained to version {version - 1} "
            f"as recomputed from its content, but not to the stored hash of version "
            f"{version - 1}: that stored hash was changed",
        )
    if version == 1:
        detail = (
            "the stored hash does not match this event's content at the stream's start: "
            "the event's content or its stored hash was changed"
        )
    else:
        detail = (
            f"the stored hash does not match this event's content chained to the stored "
            f"hash of version {version - 1}: the event's content or its stored hash was "
            f"changed, or version {version - 1} was rewritten together with its hash"
        )
    return _event_mismatch(MismatchKind.CONTENT_HASH, event, detail)


def _version_gap(event: RecordedEvent, expected_version: int) -> Mismatch:
    if event.stream_version > expected_version:
        missing = (
            f"version {expected_version}"
            if event.stream_version == expected_version + 1
            else f"versions {expected_version} to {event.stream_version - 1}"
        )
        detail = (
            f"{missing} not found: the next stored event is version {event.stream_version} "
            f"at position {event.position} (event {event.event_id})"
        )
    else:
        detail = (
            f"version {event.stream_version} is stored again at position {event.position} "
            f"(event {event.event_id}) after version {expected_version - 1}"
        )
    return Mismatch(
        MismatchKind.MISSING_VERSION,
        event.tenant_id,
        detail,
        stream_id=event.stream_id,
        stream_version=expected_version,
    )


def _verify_stream_heads(
    conn: psycopg.Connection[Any], checked: TenantVerification, findings: _Findings
) -> None:
    # The head row of each stream records its version and last hash at every append, so
    # it shows a deleted last event that leaves no gap in the chain.
    rows = conn.execute(
        """
        SELECT s.stream_id, s.version, s.head_hash, last.stream_version, last.hash,
               last.position, last.event_id
        FROM streams AS s
        LEFT JOIN LATERAL (
            SELECT e.stream_version, e.hash, e.position, e.event_id FROM events AS e
            WHERE e.stream_id = s.stream_id
            ORDER BY e.stream_version DESC LIMIT 1
        ) AS last ON true
        WHERE s.tenant_id = %s
          AND (s.version <> coalesce(last.stream_version, 0)
               OR s.head_hash IS DISTINCT FROM last.hash)
        ORDER BY s.stream_id
        """,
        (checked.tenant_id,),
    ).fetchall()
    for stream_id, head_version, head_hash, last_version, last_hash, position, event_id in rows:
        last_version = last_version or 0
        if head_version > last_version:
            missing = (
                f"version {head_version}"
                if head_version == last_version + 1
                else f"versions {last_version + 1} to {head_version}"
            )
            findings.add(
                Mismatch(
                    MismatchKind.MISSING_VERSION,
                    checked.tenant_id,
                    f"{missing} not found: the stream head records version {head_version}, "
                    f"the last stored event is version {last_version}",
                    stream_id=stream_id,
                    stream_version=last_version + 1,
                )
            )
        else:
            stored = bytes(last_hash).hex() if last_hash is not None else "none"
            recorded = bytes(head_hash).hex() if head_hash is not None else "none"
            findings.add(
                Mismatch(
                    MismatchKind.STREAM_HEAD,
                    checked.tenant_id,
                    f"the stream head records version {head_version} with hash {recorded}, "
                    f"but the last stored event is version {last_version} with hash {stored}",
                    stream_id=stream_id,
                    stream_version=last_version,
                    position=position,
                    event_id=event_id,
                )
            )


# Seals ---------------------------------------------------------------------------------


def _seal_mismatch(kind: MismatchKind, seal: Seal, detail: str, **event: Any) -> Mismatch:
    return Mismatch(
        kind,
        seal.tenant_id,
        detail,
        stream_id=event.get("stream_id"),
        stream_version=event.get("stream_version"),
        position=event.get("position"),
        event_id=event.get("event_id"),
        seal_version=seal.stream_version,
        seal_position=seal.position,
    )


def _read_seals(conn: psycopg.Connection[Any], tenant_id: str, findings: _Findings) -> list[Seal]:
    """Read the tenant's seals and check that each links to the one before it."""
    seals: list[Seal] = []
    for version, position, event_type, payload in load_seals(conn, tenant_id):
        if event_type != SEAL_EVENT_TYPE:
            problem = f"the seal stream holds a {event_type} event"
        else:
            try:
                seal = seal_from_event(tenant_id, version, position, payload)
            except InvalidSeal as error:
                problem = str(error)
            else:
                problem = ""
        if problem:
            findings.add(
                Mismatch(
                    MismatchKind.INVALID_SEAL,
                    tenant_id,
                    problem,
                    stream_id=seal_stream_id(tenant_id),
                    stream_version=version,
                    position=position,
                )
            )
            continue
        _check_seal_link(seal, seals[-1] if seals else None, findings)
        seals.append(seal)
    return seals


def _check_seal_link(seal: Seal, previous: Seal | None, findings: _Findings) -> None:
    expected_root = previous.merkle_root if previous is not None else None
    if seal.previous_root != expected_root:
        recorded = seal.previous_root.hex() if seal.previous_root is not None else "none"
        actual = (
            f"{previous.describe()} has root {expected_root.hex()}"
            if previous is not None and expected_root is not None
            else "there is no earlier seal"
        )
        findings.add(
            _seal_mismatch(
                MismatchKind.SEAL_LINK,
                seal,
                f"the seal records previous root {recorded}, but {actual}",
            )
        )
    expected_start = previous.through if previous is not None else Checkpoint()
    if seal.after != expected_start:
        findings.add(
            _seal_mismatch(
                MismatchKind.SEAL_LINK,
                seal,
                f"the seal's range starts after (tx {seal.after.tx_id}, position "
                f"{seal.after.position}), but the previous seal ended at (tx "
                f"{expected_start.tx_id}, position {expected_start.position})",
            )
        )


def _verify_seals(
    conn: psycopg.Connection[Any], checked: TenantVerification, findings: _Findings
) -> None:
    tenant_id = checked.tenant_id
    seals = _read_seals(conn, tenant_id, findings)
    checked.seals = len(seals)
    checked.sealed_events = sum(seal.event_count for seal in seals)
    end = max((seal.through for seal in seals), key=_key, default=Checkpoint())
    row = conn.execute(
        """
        SELECT count(*) FROM events
        WHERE tenant_id = %s AND (tx_id, position) > (%s::text::xid8, %s)
        """,
        (tenant_id, str(end.tx_id), end.position),
    ).fetchone()
    checked.unsealed_events = int(row[0]) if row else 0
    if not seals:
        return
    checked.latest_seal = seals[-1]

    for seal, count, root in _recompute_seals(conn, tenant_id, seals):
        if count == seal.event_count and root == seal.merkle_root:
            continue
        for mismatch in _locate_seal_mismatch(conn, seal, count):
            findings.add(mismatch)
        if findings.full:
            return


def _key(checkpoint: Checkpoint) -> tuple[int, int]:
    return (checkpoint.tx_id, checkpoint.position)


def _recompute_seals(
    conn: psycopg.Connection[Any], tenant_id: str, seals: list[Seal]
) -> list[tuple[Seal, int, bytes]]:
    """Return each seal with the event count and root of its range as stored now.

    One scan of the log serves all seals: their ranges follow one another, so each event
    falls in the first seal, in range order, whose range ends at or after it. Events in a
    gap between ranges belong to no seal (the seal link check reports the gap).
    """
    ordered = sorted(seals, key=lambda seal: _key(seal.through))
    trees = [MerkleRoot() for _ in ordered]
    start = min((seal.after for seal in ordered), key=_key)
    index = 0
    for row in log_rows(conn, tenant_id, start, through=ordered[-1].through):
        while row.key > _key(ordered[index].through):
            index += 1
        if row.key > _key(ordered[index].after):
            trees[index].add(row.leaf())
    return [(seal, tree.count, tree.root()) for seal, tree in zip(ordered, trees, strict=True)]


def _locate_seal_mismatch(conn: psycopg.Connection[Any], seal: Seal, count: int) -> list[Mismatch]:
    """Name the events of a seal's range that no longer match its leaves.

    Compares the leaf hash prefixes stored in the seal with those of the range as stored
    now, as multisets. An event whose leaf is not among the sealed ones was changed or
    added. A sealed leaf with no event was deleted or changed. Events that still
    match keep their relative order, so they mark where a deleted event was.
    """
    mismatches: list[Mismatch] = []
    if count != seal.event_count:
        mismatches.append(
            _seal_mismatch(
                MismatchKind.SEAL_COUNT,
                seal,
                f"the range held {seal.event_count} events when it was sealed and holds "
                f"{count} now",
            )
        )
    row = conn.execute(
        "SELECT payload->>'leaf_prefixes' FROM events WHERE tenant_id = %s AND position = %s",
        (seal.tenant_id, seal.position),
    ).fetchone()
    try:
        sealed = decode_leaf_prefixes(row[0] if row and row[0] is not None else "")
        if len(sealed) != seal.event_count:
            raise InvalidSeal(
                f"the seal stores {len(sealed)} leaf prefixes for {seal.event_count} events"
            )
    except InvalidSeal as error:
        mismatches.append(
            _seal_mismatch(
                MismatchKind.SEAL_ROOT,
                seal,
                f"the recomputed root differs from the sealed one, and the changed events "
                f"cannot be named: {error}",
            )
        )
        return mismatches

    prefixes: list[bytes] = []
    positions = array("q")
    for log_row in log_rows(conn, seal.tenant_id, seal.after, through=seal.through):
        prefixes.append(log_row.leaf()[:LEAF_PREFIX_BYTES])
        positions.append(log_row.position)

    # Leaves present on both sides, counted per prefix.
    current_counts = Counter(prefixes)
    shared = {
        prefix: min(number, current_counts[prefix])
        for prefix, number in Counter(sealed).items()
        if prefix in current_counts
    }
    unmatched_events: list[int] = []
    matched_positions: list[int] = []
    budget = dict(shared)
    for prefix, position in zip(prefixes, positions, strict=True):
        if budget.get(prefix, 0) > 0:
            budget[prefix] -= 1
            matched_positions.append(position)
        else:
            unmatched_events.append(position)

    located = 0
    for position, stream_id, version, event_id in _describe_events(
        conn, seal.tenant_id, unmatched_events
    ):
        located += 1
        mismatches.append(
            _seal_mismatch(
                MismatchKind.SEAL_ROOT,
                seal,
                "this event's position, transaction id, recorded_at or stored hash is not "
                "among those sealed: it was changed, or added to the range after sealing",
                stream_id=stream_id,
                stream_version=version,
                position=position,
                event_id=event_id,
            )
        )
    # With an unchanged count, each unmatched sealed leaf is the old form of a changed
    # event reported above. Otherwise report where each sealed leaf without an event was.
    if count != seal.event_count:
        for index, matched_before in _unmatched_leaves(sealed, shared):
            located += 1
            before = (
                f"after position {matched_positions[matched_before - 1]}"
                if matched_before > 0
                else "at the start of the range"
            )
            following = (
                f" and before position {matched_positions[matched_before]}"
                if matched_before < len(matched_positions)
                else ""
            )
            mismatches.append(
                _seal_mismatch(
                    MismatchKind.SEAL_COUNT,
                    seal,
                    f"sealed event {index + 1} of {seal.event_count} has no matching event: "
                    f"it was deleted or changed; it came {before}{following}",
                )
            )
    if not located:
        mismatches.append(
            _seal_mismatch(
                MismatchKind.SEAL_ROOT,
                seal,
                "the recomputed root differs from the sealed one, but every event matches a "
                "sealed leaf prefix: the seal's root or its leaf prefixes were changed",
            )
        )
    return mismatches


def _unmatched_leaves(sealed: list[bytes], shared: dict[bytes, int]) -> list[tuple[int, int]]:
    """Return (index, number of matched leaves before it) of each sealed leaf no event has."""
    budget = dict(shared)
    matched = 0
    missing: list[tuple[int, int]] = []
    for index, prefix in enumerate(sealed):
        if budget.get(prefix, 0) > 0:
            budget[prefix] -= 1
            matched += 1
        else:
            missing.append((index, matched))
    return missing


def _describe_events(
    conn: psycopg.Connection[Any], tenant_id: str, positions: list[int]
) -> list[tuple[int, str, int, UUID]]:
    if not positions:
        return []
    rows = conn.execute(
        """
        SELECT position, stream_id, stream_version, event_id FROM events
        WHERE tenant_id = %s AND position = ANY(%s) ORDER BY position
        """,
        (tenant_id, positions[:DEFAULT_MAX_MISMATCHES]),
    ).fetchall()
    return [(int(row[0]), row[1], int(row[2]), row[3]) for row in rows]
