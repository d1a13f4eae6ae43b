"""Queries over the SLA read model: per-incident verdicts and summaries, as of a valid time."""

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

from ledger.database import set_tenant
from projections.sla import NOT_JUDGED, RESOLUTION_BREACHED_SQL, SlaState, resolution_breached
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
    result: dict[str, dict[str | None, SlaCounts]] = {}
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
    set_of = {1: "category", 2: "department"}
    for grouping, column in GROUPINGS.items():
        groups: dict[str | None, SlaCounts] = defaultdict(SlaCounts)
        for grouped, category, department, total, with_target, still_open, breached in rows:
            if set_of[grouped] != grouping:
                continue
            key = category if grouping == "category" else department
            groups[key] += SlaCounts(total, with_target, still_open, breached)
        for state in straddling:
            groups[getattr(state, column)] += SlaCounts(
                1,
                int(state.resolution_due_at is not None),
                int(state.resolved_at is None),
                int(resolution_breached(state, as_of)),
            )
        result[grouping] = dict(groups)
    return result


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
