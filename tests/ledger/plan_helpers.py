"""A large event log built on the server, and the plans of the statements run against it.

Shared by the plan test and bench/sql_plans.py, which prints the plans for the docs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from ledger.database import Database, set_tenant
from projections.audit import audit_projection
from projections.runtime import catch_up

# Event types of each generated incident stream, in order.
STREAM_TYPES = ("ReportSubmitted", "IncidentAcknowledged", "IncidentAssigned", "IncidentClosed")
CATEGORIES = 40
ACTORS = 200


def fill_events(conn: psycopg.Connection[Any], tenant_id: str, events: int) -> None:
    """Insert `events` events of `tenant_id` in streams of four, in one statement per
    100,000 events, with the stream heads; then ANALYZE.

    Ids and hashes are derived from the row number, so two calls with another tenant fill
    disjoint streams. The hashes do not chain: these logs are for plans, not `verify`.
    """
    step = 100_000
    for first in range(0, events, step):
        last = min(first + step, events) - 1
        conn.execute(
            """
            INSERT INTO events (tenant_id, stream_id, stream_version, event_type,
                                schema_version, payload, metadata, occurred_at, event_id, hash)
            SELECT %(tenant)s,
                   'incident-' || md5(%(tenant)s || '/' || (n / 4)::text)::uuid,
                   n %% 4 + 1,
                   (%(types)s::text[])[n %% 4 + 1],
                   1,
                   CASE WHEN n %% 4 = 0 THEN jsonb_build_object(
                       'incident_id', md5(%(tenant)s || '/' || (n / 4)::text)::uuid,
                       'category', 'category-' || (n / 4) %% %(categories)s)
                   ELSE '{}'::jsonb END,
                   jsonb_build_object('actor', 'actor-' || n %% %(actors)s,
                                      'role', 'staff', 'channel', 'api'),
                   timestamptz '2015-01-01 00:00+00' + (n / 4) * interval '30 seconds'
                       + (n %% 4) * interval '1 hour',
                   md5(%(tenant)s || '#' || n::text)::uuid,
                   sha256(convert_to(%(tenant)s || n::text, 'UTF8'))
            FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS n
            """,
            {
                "tenant": tenant_id,
                "types": list(STREAM_TYPES),
                "categories": CATEGORIES,
                "actors": ACTORS,
                "first": first,
                "last": last,
            },
        )
        conn.commit()
    conn.execute(
        """
        INSERT INTO streams (stream_id, tenant_id, version, head_hash)
        SELECT stream_id, tenant_id, max(stream_version), NULL FROM events
        WHERE tenant_id = %s GROUP BY stream_id, tenant_id
        """,
        (tenant_id,),
    )
    conn.commit()
    conn.execute("ANALYZE events")
    conn.execute("ANALYZE streams")
    conn.commit()


@dataclass(frozen=True)
class Statement:
    query: Any  # str, bytes or a psycopg sql.Composable
    params: Any


class RecordingCursor(psycopg.Cursor[Any]):
    """A cursor that keeps every statement it runs, for EXPLAIN afterwards."""

    statements: list[Statement] = []

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> RecordingCursor:
        RecordingCursor.statements.append(Statement(query, params))
        super().execute(query, params, **kwargs)
        return self


def statement_text(conn: psycopg.Connection[Any], statement: Statement) -> str:
    if isinstance(statement.query, sql.Composable):
        return statement.query.as_string(conn)
    if isinstance(statement.query, bytes):
        return statement.query.decode()
    return str(statement.query)


def explain(
    conn: psycopg.Connection[Any], statement: Statement, tenant_id: str, *, text: bool = False
) -> Any:
    """Run the statement under EXPLAIN (ANALYZE, BUFFERS) in a transaction that is rolled
    back, so an explained INSERT stores nothing. Returns the JSON plan, or the text one."""
    options = "ANALYZE, BUFFERS" + ("" if text else ", FORMAT JSON")
    prefix = f"EXPLAIN ({options}) "
    query = statement.query
    if isinstance(query, sql.Composable):
        explained: Any = sql.Composed([sql.SQL(prefix), query])
    else:
        explained = prefix + (query.decode() if isinstance(query, bytes) else str(query))
    with conn.transaction(force_rollback=True), conn.cursor() as cur:
        set_tenant(conn, tenant_id)  # the audit view shows the rows of this tenant only
        cur.execute(explained, statement.params)
        rows = cur.fetchall()
    if text:
        return "\n".join(row[0] for row in rows)
    plan = rows[0][0]
    return json.loads(plan) if isinstance(plan, str) else plan


def is_explainable(text: str) -> bool:
    return text.lstrip().split(None, 1)[0].upper() in ("SELECT", "INSERT", "WITH")


def plan_nodes(plan: Any) -> Iterator[dict[str, Any]]:
    """Yield every node of a JSON plan."""
    stack = [node["Plan"] for node in plan] if isinstance(plan, list) else [plan]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.get("Plans", []))


def sequential_scans(plan: Any) -> list[str]:
    """Return the relations that the plan reads with a sequential scan."""
    return [
        node.get("Relation Name", "?")
        for node in plan_nodes(plan)
        if node["Node Type"] == "Seq Scan"
    ]


def index_audit_log(database: Database, timeout: float = 300.0) -> None:
    """Bring the audit projection up to the last event, as a running projector keeps it,
    then ANALYZE its table.

    The projector reads below the server-wide transaction horizon, so this waits while a
    transaction in another database keeps the horizon back.
    """
    projection = audit_projection()
    deadline = time.monotonic() + timeout
    with database.connect_worker() as conn:
        last = conn.execute("SELECT max(position) FROM events").fetchone()
        conn.commit()
    while True:
        catch_up(database, [projection], batch_size=50_000)
        with database.connect_worker() as conn:
            indexed = conn.execute("SELECT max(position) FROM audit_entries").fetchone()
        if last is not None and indexed is not None and indexed[0] == last[0]:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"the audit projection did not reach the log's end in {timeout} s")
        time.sleep(0.5)
    with database.connect_owner() as conn:
        conn.execute("ANALYZE audit_entries")
