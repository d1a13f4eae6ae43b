"""Queries over the SLA read model: per-incident verdicts and summaries, as of a valid time
and as known at a transaction time."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg.pq import TransactionStatus

from ledger import lifecycle as lc
from ledger.database import set_tenant
from ledger.ids import incident_stream_id
from ledger.parking import tenant_parked_positions
from ledger.sla_policy import SLA_CONFIG_EVENT_TYPES
from ledger.store import EVENT_COLUMNS, row_to_event
from projections.base import INCIDENT_STREAM_PREFIX
from projections.sla import (
    NOT_JUDGED,
    RESOLUTION_BREACHED_SQL,
    TENANT_STREAM_PREFIX,
    ConfigHistory,
    SlaState,
    evolve_sla,
    load_histories,
    resolution_breached,
)
from replay.point_in_time import straddling_sla_states

GROUPINGS = {"category": "category", "department": "department"}


@dataclass(frozen=True, slots=True)
class SlaCounts:
    """SLA figures for one group of incidents."""

    total: int = 0
    with_target: int = 0
    open: int = 0
    breached: int = 0

    @property
    def on_time(self) -> int:
        return self.total - self.breached

    @property
    def on_time_rate(self) -> float | None:
        return self.on_time / self.total if self.total else None

    def __add__(self, other: SlaCounts) -> SlaCounts:
        return SlaCounts(
            self.total + other.total,
            self.with_target + other.with_target,
            self.open + other.open,
            self.breached + other.breached,
        )


@contextmanager
def consistent_snapshot(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """Run the enclosed queries on one snapshot, unless the caller's transaction decides.

    Without it, the projector could commit between two queries of one summary and its
    parts would not add up.
    """
    if conn.info.transaction_status != TransactionStatus.IDLE:
        yield
        return
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        yield


def sla_verdicts(
    conn: psycopg.Connection[Any], tenant_id: str, as_of: datetime
) -> dict[UUID, bool]:
    """Return, for each judged incident that existed at `as_of`, whether it was breached."""
    with consistent_snapshot(conn):
        set_tenant(conn, tenant_id)
        return _sla_verdicts(conn, tenant_id, as_of)


def _sla_verdicts(
    conn: psycopg.Connection[Any], tenant_id: str, as_of: datetime
) -> dict[UUID, bool]:
    verdicts = {
        row[0]: row[1]
        for row in conn.execute(
            f"""
            SELECT incident_id, {RESOLUTION_BREACHED_SQL}
            FROM incident_sla
            WHERE tenant_id = %(tenant)s AND latest_occurred_at <= %(now)s
              AND status <> ALL(%(not_judged)s)
            """,
            {"tenant": tenant_id, "now": as_of, "not_judged": list(NOT_JUDGED)},
        )
    }
    for state in straddling_sla_states(conn, tenant_id, as_of):
        if state.status not in NOT_JUDGED:
            verdicts[state.incident_id] = resolution_breached(state, as_of)
    return verdicts


def sla_summary(
    conn: psycopg.Connection[Any], tenant_id: str, as_of: datetime
) -> dict[str, dict[str | None, SlaCounts]]:
    """Count incidents, open incidents and breaches by category and by department at `as_of`.

    Rejected and duplicate incidents are not judged and not counted. Incidents without a
    target count as on time.
    """
    with consistent_snapshot(conn):
        set_tenant(conn, tenant_id)
        return _sla_summary(conn, tenant_id, as_of)


def _sla_summary(
    conn: psycopg.Connection[Any], tenant_id: str, as_of: datetime
) -> dict[str, dict[str | None, SlaCounts]]:
    straddling = [
        state
        for state in straddling_sla_states(conn, tenant_id, as_of)
        if state.status not in NOT_JUDGED
    ]
    # One scan of the read model counts both groupings. GROUPING() returns 1 for the rows
    # of the category set (department not grouped) and 2 for those of the department set.
    rows = conn.execute(
        f"""
        SELECT GROUPING(category, department), category, department,
               count(*),
               count(*) FILTER (WHERE resolution_due_at IS NOT NULL),
               count(*) FILTER (WHERE resolved_at IS NULL),
               count(*) FILTER (WHERE {RESOLUTION_BREACHED_SQL})
        FROM incident_sla
        WHERE tenant_id = %(tenant)s AND latest_occurred_at <= %(now)s
          AND status <> ALL(%(not_judged)s)
        GROUP BY GROUPING SETS ((category), (department))
        """,
        {"tenant": tenant_id, "now": as_of, "not_judged": list(NOT_JUDGED)},
    ).fetchall()
    return _grouped(rows, straddling, as_of)


def summarize_states(
    states: Iterable[SlaState], judged_at: datetime
) -> dict[str, dict[str | None, SlaCounts]]:
    """Count folded SLA states as `sla_summary` counts the read model, judged at `judged_at`.

    Time travel folds states from the log; this gives them the same figures.
    """
    judged = [state for state in states if state.status not in NOT_JUDGED]
    result: dict[str, dict[str | None, SlaCounts]] = {}
    for grouping, column in GROUPINGS.items():
        groups: dict[str | None, SlaCounts] = defaultdict(SlaCounts)
        for state in judged:
            groups[getattr(state, column)] += SlaCounts(
                1,
                int(state.resolution_due_at is not None),
                int(state.resolved_at is None),
                int(resolution_breached(state, judged_at)),
            )
        result[grouping] = dict(groups)
    return result


def verdicts_of_states(states: Iterable[SlaState], judged_at: datetime) -> dict[UUID, bool]:
    """Return whether each judged incident among `states` was breached at `judged_at`."""
    return {
        state.incident_id: resolution_breached(state, judged_at)
        for state in states
        if state.status not in NOT_JUDGED
    }


def sla_summary_known_at(
    conn: psycopg.Connection[Any],
    tenant_id: str,
    known_at: datetime,
    as_of: datetime | None = None,
) -> dict[str, dict[str | None, SlaCounts]] | None:
    """Count as `sla_summary` does, over the incidents as the ledger knew them at `known_at`
    (and as they stood at `as_of`, when given), judged at `as_of` or else at `known_at`.

    The result equals a fold of the events recorded by `known_at`. A row whose
    `known_since` is at or before `known_at` is that fold's state already and is counted in
    SQL. Only the incidents with events recorded on both sides of `known_at` (or, with
    `as_of`, occurring on both sides of it), and those with events the projector has not
    applied yet, are folded again. Returns None when the configuration history does not
    allow this, and the caller folds the whole tenant instead: a configuration event
    recorded by `known_at` follows one recorded after it in the log, one the projector has
    not applied, or, with `as_of`, one that happened after `as_of`.
    """
    with consistent_snapshot(conn):
        set_tenant(conn, tenant_id)
        return _sla_summary_known_at(conn, tenant_id, known_at, as_of)


def _sla_summary_known_at(
    conn: psycopg.Connection[Any],
    tenant_id: str,
    known_at: datetime,
    as_of: datetime | None,
) -> dict[str, dict[str | None, SlaCounts]] | None:
    checkpoint = conn.execute(
        "SELECT tx_id::text, position FROM projection_checkpoints WHERE projection = 'sla'"
    ).fetchone()
    if checkpoint is None:
        return None
    # Events recorded by known_at that the projector has not applied: their incidents are
    # folded again, and with a configuration event among them this returns None.
    lagging: set[str] = set()
    for stream_id, event_type in conn.execute(
        """
        SELECT stream_id, event_type FROM events
        WHERE tenant_id = %s AND (tx_id, position) > (%s::xid8, %s) AND recorded_at <= %s
        """,
        (tenant_id, checkpoint[0], checkpoint[1], known_at),
    ):
        if stream_id.startswith(TENANT_STREAM_PREFIX) and event_type in SLA_CONFIG_EVENT_TYPES:
            return None
        if stream_id.startswith(INCIDENT_STREAM_PREFIX):
            lagging.add(stream_id)

    history = load_histories(conn, [tenant_id]).get(tenant_id) or ConfigHistory(tenant_id)
    known_history = history.known_by(known_at)
    if not _config_fits(conn, tenant_id, history, known_history, known_at, as_of):
        return None

    judged_at = as_of or known_at
    params = {
        "tenant": tenant_id,
        "known": known_at,
        "as_of": as_of,
        "now": judged_at,
        "not_judged": list(NOT_JUDGED),
        "lagging": [UUID(stream.removeprefix(INCIDENT_STREAM_PREFIX)) for stream in lagging],
    }
    rows = conn.execute(
        f"""
        SELECT GROUPING(category, department), category, department,
               count(*),
               count(*) FILTER (WHERE resolution_due_at IS NOT NULL),
               count(*) FILTER (WHERE resolved_at IS NULL),
               count(*) FILTER (WHERE {RESOLUTION_BREACHED_SQL})
        FROM incident_sla
        WHERE tenant_id = %(tenant)s AND known_since <= %(known)s
          AND (%(as_of)s::timestamptz IS NULL OR latest_occurred_at <= %(as_of)s)
          AND status <> ALL(%(not_judged)s)
          AND incident_id <> ALL(%(lagging)s)
        GROUP BY GROUPING SETS ((category), (department))
        """,
        params,
    ).fetchall()
    refold = lagging | {
        incident_stream_id(row[0])
        for row in conn.execute(
            """
            SELECT incident_id FROM incident_sla
            WHERE tenant_id = %(tenant)s AND earliest_recorded_at <= %(known)s
              AND (known_since > %(known)s
                   OR (%(as_of)s::timestamptz IS NOT NULL
                       AND earliest_occurred_at <= %(as_of)s AND latest_occurred_at > %(as_of)s))
            """,
            params,
        )
    }
    folded = [
        state
        for state in _refolded(conn, tenant_id, refold, known_history, known_at, as_of)
        if state.status not in NOT_JUDGED
    ]
    return _grouped(rows, folded, judged_at)


def _config_fits(
    conn: psycopg.Connection[Any],
    tenant_id: str,
    history: ConfigHistory,
    known_history: ConfigHistory,
    known_at: datetime,
    as_of: datetime | None,
) -> bool:
    """Return whether the configuration versions the rows consulted are those a fold of the
    events recorded by `known_at` (and happened by `as_of`) builds."""
    positions = history.positions()
    if not positions:
        return True
    times = {
        position: (recorded_at, occurred_at)
        for position, recorded_at, occurred_at in conn.execute(
            "SELECT position, recorded_at, occurred_at FROM events "
            "WHERE tenant_id = %s AND position = ANY(%s)",
            (tenant_id, positions),
        )
    }
    recorded = {position for position, (at, _) in times.items() if at <= known_at}
    if recorded != set(known_history.positions()):
        return False
    return as_of is None or all(times[position][1] <= as_of for position in recorded)


def _refolded(
    conn: psycopg.Connection[Any],
    tenant_id: str,
    streams: set[str],
    history: ConfigHistory,
    known_at: datetime,
    as_of: datetime | None,
) -> list[SlaState]:
    """Fold `streams` from their events recorded by `known_at` (and happened by `as_of`).

    In log order, as the projector folds them: a transaction that took its id first but
    committed last puts a stream's later version before an earlier one.
    """
    if not streams:
        return []
    parked = tenant_parked_positions(conn, "sla", tenant_id)
    states: dict[str, SlaState | None] = {}
    with conn.cursor() as cur:
        cur.execute(
            f"""
            SELECT {EVENT_COLUMNS} FROM events
            WHERE tenant_id = %(tenant)s AND stream_id = ANY(%(streams)s)
              AND recorded_at <= %(known)s
              AND (%(as_of)s::timestamptz IS NULL OR occurred_at <= %(as_of)s)
            ORDER BY tx_id, position
            """,
            {"tenant": tenant_id, "streams": list(streams), "known": known_at, "as_of": as_of},
        )
        for row in cur:
            event = row_to_event(row)
            if event.position in parked or event.event_type not in lc.INCIDENT_EVENT_TYPES:
                continue
            states[event.stream_id] = evolve_sla(states.get(event.stream_id), event, history)
    return [state for state in states.values() if state is not None]


def _grouped(
    rows: list[Any], folded: list[SlaState], judged_at: datetime
) -> dict[str, dict[str | None, SlaCounts]]:
    """Add the per-group counts of a GROUPING SETS query and of folded states."""
    set_of = {1: "category", 2: "department"}
    result: dict[str, dict[str | None, SlaCounts]] = {}
    for grouping, column in GROUPINGS.items():
        groups: dict[str | None, SlaCounts] = defaultdict(SlaCounts)
        for grouped, category, department, total, with_target, still_open, breached in rows:
            if set_of[grouped] != grouping:
                continue
            key = category if grouping == "category" else department
            groups[key] += SlaCounts(total, with_target, still_open, breached)
        for state in folded:
            groups[getattr(state, column)] += SlaCounts(
                1,
                int(state.resolution_due_at is not None),
                int(state.resolved_at is None),
                int(resolution_breached(state, judged_at)),
            )
        result[grouping] = dict(groups)
    return result
