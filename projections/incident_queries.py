"""Lists of incidents for staff: filters over the incidents, SLA and grouping read models.

A list never contains the reporter's contact details, encrypted or not, nor the report's
description: staff read those one incident at a time.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson
import psycopg
from psycopg import sql

from ledger.database import set_tenant
from ledger.errors import InvalidRequest
from projections.sla import RESOLUTION_BREACHED_SQL, RESOLUTION_WARNING_SQL

SLA_FILTERS = ("breached", "near_breach", "on_track")
DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 1000
# Beyond this, page with filters instead; it also keeps the value inside a bigint.
MAX_LIST_OFFSET = 10_000_000
EXPORT_BATCH_ROWS = 2000

INCIDENT_COLUMNS = (
    "incident_id",
    "version",
    "status",
    "category",
    "department",
    "severity",
    "assignee",
    "title",
    "submitted_at",
    "updated_at",
    "resolution_due_at",
    "resolved_at",
    "breached",
    "near_breach",
    "group_id",
    "group_reports",
)


@dataclass(frozen=True, slots=True)
class IncidentFilter:
    """Conditions of an incident list; None matches any value."""

    statuses: tuple[str, ...] = ()
    category: str | None = None
    department: str | None = None
    sla: str | None = None  # one of SLA_FILTERS
    group_id: UUID | None = None

    def __post_init__(self) -> None:
        if self.sla is not None and self.sla not in SLA_FILTERS:
            raise InvalidRequest(f"invalid sla {self.sla!r}: use {', '.join(SLA_FILTERS)}")


def _query(incident_filter: IncidentFilter) -> sql.Composed:
    conditions: list[sql.Composable] = [sql.SQL("i.tenant_id = %(tenant)s")]
    if incident_filter.statuses:
        conditions.append(sql.SQL("i.status = ANY(%(statuses)s)"))
    if incident_filter.category is not None:
        conditions.append(sql.SQL("i.category = %(category)s"))
    if incident_filter.department is not None:
        conditions.append(sql.SQL("i.department = %(department)s"))
    if incident_filter.group_id is not None:
        conditions.append(sql.SQL("g.group_id = %(group_id)s"))
    if incident_filter.sla == "breached":
        conditions.append(sql.SQL("s.breached"))
    elif incident_filter.sla == "near_breach":
        conditions.append(sql.SQL("s.warning AND NOT s.breached"))
    elif incident_filter.sla == "on_track":
        conditions.append(sql.SQL("NOT COALESCE(s.breached OR s.warning, false)"))
    # Inside the lateral subquery the SLA expressions' bare column names are incident_sla's.
    query = sql.SQL(
        """
        SELECT i.incident_id, i.version, i.status, i.category, i.department, i.severity,
               i.assignee, i.title, i.submitted_at, i.updated_at, s.resolution_due_at,
               i.resolved_at, COALESCE(s.breached, false), COALESCE(s.warning AND NOT s.breached,
               false), g.group_id,
               (SELECT count(*) FROM grouping_reports AS m
                WHERE m.tenant_id = g.tenant_id AND m.group_id = g.group_id)
        FROM incidents AS i
        LEFT JOIN LATERAL (
            SELECT resolution_due_at, {breached} AS breached, {warning} AS warning
            FROM incident_sla
            WHERE incident_sla.tenant_id = i.tenant_id AND incident_sla.incident_id = i.incident_id
        ) AS s ON true
        LEFT JOIN grouping_reports AS g
            ON g.tenant_id = i.tenant_id AND g.incident_id = i.incident_id
        WHERE {conditions}
        ORDER BY i.submitted_at DESC NULLS LAST, i.incident_id
        """
    ).format(
        breached=sql.SQL(RESOLUTION_BREACHED_SQL),
        warning=sql.SQL(RESOLUTION_WARNING_SQL),
        conditions=sql.SQL(" AND ").join(conditions),
    )
    return query


def _params(tenant_id: str, incident_filter: IncidentFilter, now: datetime) -> dict[str, Any]:
    return {
        "tenant": tenant_id,
        "now": now,
        "statuses": list(incident_filter.statuses),
        "category": incident_filter.category,
        "department": incident_filter.department,
        "group_id": incident_filter.group_id,
    }


def _record(row: tuple[Any, ...]) -> dict[str, Any]:
    record = dict(zip(INCIDENT_COLUMNS, row, strict=True))
    for name in ("incident_id", "group_id"):
        if record[name] is not None:
            record[name] = str(record[name])
    return record


def list_incidents(
    conn: psycopg.Connection[Any],
    tenant_id: str,
    incident_filter: IncidentFilter,
    *,
    now: datetime,
    limit: int = DEFAULT_LIST_LIMIT,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """Return one page of matching incidents, newest first; SLA states are judged at `now`."""
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise InvalidRequest(f"invalid limit {limit}: use 1 to {MAX_LIST_LIMIT}")
    if not 0 <= offset <= MAX_LIST_OFFSET:
        raise InvalidRequest(
            f"invalid offset {offset}: use 0 to {MAX_LIST_OFFSET:,}, or narrow the list with "
            "filters"
        )
    query = _query(incident_filter)
    paged = sql.SQL("{} LIMIT %(limit)s OFFSET %(offset)s").format(query)
    params = {**_params(tenant_id, incident_filter, now), "limit": limit, "offset": offset}
    with conn.transaction():
        set_tenant(conn, tenant_id)
        rows = conn.execute(paged, params).fetchall()
    return [_record(row) for row in rows]


def export_incidents(
    conn: psycopg.Connection[Any],
    tenant_id: str,
    incident_filter: IncidentFilter,
    export_format: str,
    *,
    now: datetime,
    batch_size: int = EXPORT_BATCH_ROWS,
) -> Generator[bytes, None, None]:
    """Yield every matching incident as CSV or JSON Lines, batch by batch.

    A server-side cursor fetches `batch_size` rows per round trip inside one read-only
    transaction, so memory does not grow with the list. Close the generator when stopping
    early, so the transaction ends.
    """
    if export_format not in ("csv", "jsonl"):
        raise InvalidRequest(f"invalid format {export_format!r}: use json, csv or jsonl")
    query = _query(incident_filter)
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        set_tenant(conn, tenant_id)
        with conn.cursor(name="incident_export") as cursor:
            cursor.execute(query, _params(tenant_id, incident_filter, now))
            if export_format == "csv":
                yield csv_line(list(INCIDENT_COLUMNS))
            while rows := cursor.fetchmany(batch_size):
                yield b"".join(_encode(_record(row), export_format) for row in rows)


def _encode(record: dict[str, Any], export_format: str) -> bytes:
    if export_format == "jsonl":
        return orjson.dumps(record) + b"\n"
    return csv_line([_csv_value(value) for value in record.values()])


def _csv_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else value


def csv_line(values: list[Any]) -> bytes:
    """Encode one CSV row (RFC 4180 quoting, CRLF line end)."""
    buffer = io.StringIO()
    csv.writer(buffer).writerow(values)
    return buffer.getvalue().encode()


def csv_rows(columns: list[str], rows: list[list[Any]]) -> Iterator[bytes]:
    """Encode a header and rows as CSV, one line per chunk."""
    yield csv_line(columns)
    for row in rows:
        yield csv_line([_csv_value(value) for value in row])
