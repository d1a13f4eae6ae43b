"""SLA escalations: SlaWarningReached and SlaBreached events when a clock passes its times.

The scheduler's escalation job reads the SLA read model for open incidents judged by a
policy whose warning or due time has passed and that have no escalation of that kind for
that clock yet, and appends one event each. An escalation's event id derives from the
incident, kind, target and clock, and its payload and valid time from the read model's
row. So two schedulers that escalate the same incident at once append one event, because
the second append is an idempotent replay. A reopen that restarts the clock may escalate again.

NOTE: incidents that keep their report's own target (imported city cases) are not
escalated: their targets belong to the city's own process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg_pool import ConnectionPool

from ledger.database import Database
from ledger.errors import IdempotencyKeyReused, LedgerError
from ledger.events import NewEvent
from ledger.ids import derived_id, incident_stream_id
from ledger.lifecycle import SLA_BREACHED, SLA_WARNING_REACHED
from ledger.store import PostgresEventStore
from projections.sla import NOT_JUDGED, RESOLUTION_BREACHED_SQL, RESOLUTION_WARNING_SQL

logger = logging.getLogger(__name__)

ESCALATION_METADATA = {"actor": "scheduler", "role": "system"}
# Escalations read per query; the job pages through all of them in one run.
BATCH_SIZE = 500

# (kind, target, time column, condition) for each escalation. The resolution conditions
# are the read model's SQL judgements, so an escalation fires exactly when the judgement
# of the same row at the same clock value turns true.
_CHECKS = [
    (SLA_WARNING_REACHED, "resolution", "resolution_warning_at", RESOLUTION_WARNING_SQL),
    (SLA_BREACHED, "resolution", "resolution_due_at", RESOLUTION_BREACHED_SQL),
    (
        SLA_WARNING_REACHED,
        "first_response",
        "first_response_warning_at",
        "first_response_at IS NULL AND %(now)s > first_response_warning_at",
    ),
    (
        SLA_BREACHED,
        "first_response",
        "first_response_due_at",
        "first_response_at IS NULL AND %(now)s > first_response_due_at",
    ),
]


@dataclass
class EscalationReport:
    """The outcome of one run of the escalation job."""

    appended: int = 0
    already_stored: int = 0
    failed: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Due:
    tenant_id: str
    incident_id: UUID
    kind: str
    target: str
    clock: int
    crossed_at: datetime
    policy_id: str
    policy_version: int


def find_due(
    conn: psycopg.Connection[Any], now: datetime, limit: int, offset: int = 0
) -> list[Due]:
    """Return escalations whose time has passed at `now` and that are not recorded yet.

    Returns up to `limit` of each kind and target, skipping the first `offset`.
    """
    found: list[Due] = []
    for kind, target, column, condition in _CHECKS:
        clock = "clock" if target == "resolution" else "1"
        rows = conn.execute(
            f"""
            SELECT tenant_id, incident_id, {clock}, {column}, policy_id, policy_version
            FROM incident_sla
            WHERE policy_id IS NOT NULL AND resolved_at IS NULL
              AND status <> ALL(%(not_judged)s)
              AND {column} IS NOT NULL
              AND ({condition})
              AND NOT escalations ? (%(prefix)s || {clock}::text)
            ORDER BY {column}, tenant_id, incident_id
            LIMIT %(limit)s OFFSET %(offset)s
            """,
            {
                "now": now,
                "not_judged": list(NOT_JUDGED),
                "prefix": f"{kind}:{target}:",
                "limit": limit,
                "offset": offset,
            },
        ).fetchall()
        found.extend(
            Due(tenant, incident, kind, target, int(number), crossed, policy, version)
            for tenant, incident, number, crossed, policy, version in rows
        )
    return found


def escalation_event(due: Due) -> NewEvent:
    """Build the escalation event; the same escalation always builds the same event."""
    return NewEvent(
        due.kind,
        {
            "target": due.target,
            "clock": due.clock,
            "policy_id": due.policy_id,
            "policy_version": due.policy_version,
            "crossed_at": due.crossed_at.isoformat(),
        },
        # Valid time: when the clock crossed the time, however late the job ran.
        due.crossed_at,
        event_id=derived_id(
            due.tenant_id, str(due.incident_id), "escalation", due.kind, due.target, str(due.clock)
        ),
        metadata=dict(ESCALATION_METADATA),
    )


def escalate(
    database: Database,
    now: datetime,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    batch_size: int = BATCH_SIZE,
) -> EscalationReport:
    """Append the escalations due at `now`. `should_stop` is checked between incidents.

    Connection failures are raised. An incident whose append fails otherwise is logged
    with its ids and retried at the next run.
    """
    report = EscalationReport()
    pool: ConnectionPool[Any] = ConnectionPool(
        database.worker_conninfo,
        min_size=1,
        max_size=1,
        open=True,
        kwargs={"application_name": "civicpulse-escalation"},
    )
    with pool:
        store = PostgresEventStore(pool)
        # Pages by offset: the rows just escalated stay in the query until the projector
        # records them. A row that moves between pages waits for the next run, and one
        # read twice is an idempotent replay.
        offset = 0
        while not should_stop():
            with database.connect_worker(autocommit=True) as conn:
                pending = find_due(conn, now, batch_size, offset)
            if not pending:
                break
            for due in pending:
                if should_stop():
                    logger.info("escalation run stopped before incident %s", due.incident_id)
                    break
                _append(store, due, report)
            offset += batch_size
    return report


def _append(store: PostgresEventStore, due: Due, report: EscalationReport) -> None:
    stream_id = incident_stream_id(due.incident_id)
    try:
        result = store.append(
            due.tenant_id, stream_id, [escalation_event(due)], expected_version=None
        )
    except IdempotencyKeyReused:
        # Stored before with other times: the due time moved after this escalation fired.
        report.already_stored += 1
        return
    except psycopg.OperationalError:
        raise
    except (LedgerError, psycopg.Error) as error:
        logger.error(
            "escalation %s (%s, clock %d) of incident %s of tenant %s failed: %s; "
            "the next run retries it",
            due.kind,
            due.target,
            due.clock,
            due.incident_id,
            due.tenant_id,
            error,
        )
        report.failed[f"{due.tenant_id}/{due.incident_id}"] = str(error)
        return
    if result.replayed:
        report.already_stored += 1
    else:
        report.appended += 1
        logger.info(
            "escalated incident %s of tenant %s: %s (%s, clock %d)",
            due.incident_id,
            due.tenant_id,
            due.kind,
            due.target,
            due.clock,
        )
