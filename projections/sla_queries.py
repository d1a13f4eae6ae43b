"""Queries over the SLA read model: per-incident verdicts and summaries, as of a valid time
and as known at a transaction time."""

from __future__ import annotations

import dataclasses
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
from replay.point_in_time import SLA_MODEL, known_at_states, known_sql

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
    return {
        row[0]: row[1]
        for row in conn.execute(
            f"""
            SELECT incident_id, {RESOLUTION_BREACHED_SQL}
            FROM ({_rows_at("incident_id, status, resolution_due_at, resolved_at, paused_since")})
              AS at_time
            WHERE status <> ALL(%(not_judged)s)
            """,
            {"tenant": tenant_id, "now": as_of, "not_judged": list(NOT_JUDGED)},
        )
    }


def _rows_at(columns: str) -> str:
    """Return a query of `columns` of the tenant's incident_sla rows as of the valid time
    `now`: the live row of each incident whose events all happened by then, and the version
    of each incident with events on both sides of it (projections/versions.py).

    It takes the parameters `tenant` and `now`.
    """
    return f"""
        SELECT {columns} FROM incident_sla
        WHERE tenant_id = %(tenant)s AND latest_occurred_at <= %(now)s
        UNION ALL
        SELECT {columns} FROM incident_sla_versions
        WHERE tenant_id = %(tenant)s AND valid_from <= %(now)s AND valid_to > %(now)s
    """


def sla_states_at(
    conn: psycopg.Connection[Any], tenant_id: str, as_of: datetime
) -> dict[UUID, SlaState]:
    """Return the tenant's SLA rows as of the valid time `as_of`, by incident: a fold of
    the events that happened by then, read from the live rows and their versions."""
    columns = ", ".join(field.name for field in dataclasses.fields(SlaState))
    with consistent_snapshot(conn):
        set_tenant(conn, tenant_id)
        rows = conn.execute(_rows_at(columns), {"tenant": tenant_id, "now": as_of}).fetchall()
    return {row[0]: SlaState(*row) for row in rows}


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
    rows = _counted_rows(conn, _rows_at(_COUNTED_COLUMNS), {"tenant": tenant_id, "now": as_of})
    return _grouped(rows, [], as_of)


# The columns `_counted_rows` reads.
_COUNTED_COLUMNS = "category, department, status, resolution_due_at, resolved_at, paused_since"


def _counted_rows(conn: psycopg.Connection[Any], rows: str, params: dict[str, Any]) -> list[Any]:
    """Count the judged rows that the query `rows` returns, by category and by department,
    judged at the `now` parameter. `rows` selects the `_COUNTED_COLUMNS` of SLA rows.

    One scan of the read model counts both groupings. GROUPING() returns 1 for the rows of
    the category set (department not grouped) and 2 for those of the department set.
    """
    return conn.execute(
        f"""
        SELECT GROUPING(category, department), category, department,
               count(*),
               count(*) FILTER (WHERE resolution_due_at IS NOT NULL),
               count(*) FILTER (WHERE resolved_at IS NULL),
               count(*) FILTER (WHERE {RESOLUTION_BREACHED_SQL})
        FROM ({rows}) AS counted
        WHERE status <> ALL(%(not_judged)s)
        GROUP BY GROUPING SETS ((category), (department))
        """,
        {**params, "not_judged": list(NOT_JUDGED)},
    ).fetchall()


def summarize_states(
    states: Iterable[SlaState], judged_at: datetime
) -> dict[str, dict[str | None, SlaCounts]]:
    """Count folded SLA states as `sla_summary` counts the read model, judged at `judged_at`.

    Time travel folds states from the log; this gives them the same figures.
    """
    judged = [state for state in states if state.status not in NOT_JUDGED]
    return _grouped([], judged, judged_at)


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
    applied yet, are folded again. Returns None when the configuration history prevents
    this split, and the caller then folds the whole tenant. `known_at_states` lists the
    cases.
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
    known = known_at_states(conn, SLA_MODEL, tenant_id, known_at, as_of)
    if known is None:
        return None
    judged_at = as_of or known_at
    known_rows = f"""
        SELECT {_COUNTED_COLUMNS} FROM incident_sla
        WHERE tenant_id = %(tenant)s AND {known_sql()}
          AND (%(as_of)s::timestamptz IS NULL OR latest_occurred_at <= %(as_of)s)
    """
    params = {"tenant": tenant_id, "as_of": as_of, "now": judged_at, **known.params()}
    rows = _counted_rows(conn, known_rows, params)
    folded = [state for state in known.folded if state.status not in NOT_JUDGED]
    return _grouped(rows, folded, judged_at)


def _grouped(
    rows: list[Any], folded: list[SlaState], judged_at: datetime
) -> dict[str, dict[str | None, SlaCounts]]:
    """Add the per-group counts of a GROUPING SETS query and of folded states."""
    set_of = {1: "category", 2: "department"}
    # [total, with target, open, breached] by grouping and key: ints, because building a
    # SlaCounts per state and grouping costs more than the query for thousands of states.
    counts: dict[str, dict[str | None, list[int]]] = {name: {} for name in GROUPINGS}
    for grouped, category, department, total, with_target, still_open, breached in rows:
        grouping = set_of[grouped]
        key = category if grouping == "category" else department
        _add(counts[grouping], key, (total, with_target, still_open, breached))
    for state in folded:
        figures = (
            1,
            int(state.resolution_due_at is not None),
            int(state.resolved_at is None),
            int(resolution_breached(state, judged_at)),
        )
        _add(counts["category"], state.category, figures)
        _add(counts["department"], state.department, figures)
    return {
        grouping: {key: SlaCounts(*figures) for key, figures in groups.items()}
        for grouping, groups in counts.items()
    }


def _add(groups: dict[str | None, list[int]], key: str | None, figures: tuple[int, ...]) -> None:
    group = groups.get(key)
    if group is None:
        groups[key] = list(figures)
    else:
        for index, value in enumerate(figures):
            group[index] += value
