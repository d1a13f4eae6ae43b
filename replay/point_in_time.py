"""Incident read models at a past time, from their live rows and a few refolds.

As of a valid time T (`occurred_at`): a row whose events all happened by T is already the
state at T. Rows whose events all happened after T did not exist yet. The SLA model keeps
versions of its rows by valid time for the incidents with events on both sides of T
(projections/versions.py, read by projections/sla_queries.py); for the trends model they
are folded again from the log, using just their events that happened by T.

As known at a transaction time K (`recorded_at`): a row whose `known_since` is at or
before K (its events and the configuration versions its fold read were all recorded by K)
is already what a fold of the events recorded by K gives. Only the incidents that changed
after K, and those with events the projector has not applied yet, are folded again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

from ledger import lifecycle as lc
from ledger.events import RecordedEvent
from ledger.ids import incident_stream_id
from ledger.parking import tenant_parked_positions
from ledger.sla_policy import SLA_CONFIG_EVENT_TYPES
from ledger.store import EVENT_COLUMNS, row_to_event
from projections.base import INCIDENT_STREAM_PREFIX
from projections.sla import (
    SLA_CONFIGS,
    TENANT_STREAM_PREFIX,
    ConfigHistory,
    evolve_sla,
    load_histories,
)
from projections.trends import TREND_CONFIGS, TrendState, evolve_trend


@dataclass(frozen=True, slots=True)
class IncidentModel:
    """An incident row model folded with the tenant's configuration: its table, its
    configuration versions table, its projection's name and its fold of one event."""

    table: str
    configs: sql.Identifier
    projection: str
    fold_event: Callable[[Any, RecordedEvent, ConfigHistory | None], Any]


SLA_MODEL = IncidentModel("incident_sla", SLA_CONFIGS, "sla", evolve_sla)
TRENDS_MODEL = IncidentModel("incident_trends", TREND_CONFIGS, "trends", evolve_trend)


def known_sql(alias: str = "") -> str:
    """Return the condition that selects the rows `known_at_states` leaves to SQL.

    It takes the parameters of `KnownAt.params`. `alias` is the table's alias with its dot.
    """
    return f"{alias}known_since <= %(known)s AND {alias}incident_id <> ALL(%(lagging)s)"


@dataclass(frozen=True, slots=True)
class KnownAt:
    """A model as known at a transaction time: the rows that `known_sql` selects are counted
    as stored, and `folded` contains the states of the other incidents that existed."""

    known_at: datetime
    lagging: list[UUID]
    folded: list[Any]

    def params(self) -> dict[str, Any]:
        return {"known": self.known_at, "lagging": self.lagging}


def known_at_states(
    conn: psycopg.Connection[Any],
    model: IncidentModel,
    tenant_id: str,
    known_at: datetime,
    as_of: datetime | None = None,
) -> KnownAt | None:
    """Split `model` as known at `known_at` (and as of `as_of`, when given) into rows SQL
    counts as stored and incidents folded again, or return None when it cannot be split.

    Together they equal a fold of the tenant's events recorded by `known_at` (and happened
    by `as_of`). The rows counted in SQL must also satisfy `latest_occurred_at <= as_of`.
    Returns None, and the caller folds the whole tenant, when a configuration event
    recorded by `known_at` follows one recorded after it in the log, when the projector has
    not applied one yet, or, with `as_of`, when one happened after `as_of`. Run it in the
    transaction of the queries that count the rows.
    """
    checkpoint = conn.execute(
        "SELECT tx_id::text, position FROM projection_checkpoints WHERE projection = %s",
        (model.projection,),
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

    history = load_histories(conn, [tenant_id], model.configs).get(tenant_id)
    history = history or ConfigHistory(tenant_id)
    known_history = history.known_by(known_at)
    if not _config_fits(conn, tenant_id, history, known_history, known_at, as_of):
        return None

    # NOTE: for the SLA model, an incident that straddles as_of and whose row version at
    # as_of has known_since <= known_at could be counted from incident_sla_versions instead
    # of being folded here; only the summary without known_at reads the versions so far.
    refold = lagging | {
        incident_stream_id(row[0])
        for row in conn.execute(
            sql.SQL(
                """
                SELECT incident_id FROM {}
                WHERE tenant_id = %(tenant)s AND earliest_recorded_at <= %(known)s
                  AND (known_since > %(known)s
                       OR (%(as_of)s::timestamptz IS NOT NULL
                           AND earliest_occurred_at <= %(as_of)s
                           AND latest_occurred_at > %(as_of)s))
                """
            ).format(sql.Identifier(model.table)),
            {"tenant": tenant_id, "known": known_at, "as_of": as_of},
        )
    }
    return KnownAt(
        known_at,
        [UUID(stream.removeprefix(INCIDENT_STREAM_PREFIX)) for stream in lagging],
        _refolded(conn, model, tenant_id, refold, known_history, known_at, as_of),
    )


def _config_fits(
    conn: psycopg.Connection[Any],
    tenant_id: str,
    history: ConfigHistory,
    known_history: ConfigHistory,
    known_at: datetime,
    as_of: datetime | None,
) -> bool:
    """Return whether the configuration versions the rows read are those that a fold of the
    events recorded by `known_at` (and happened by `as_of`) builds."""
    places = history.places()
    if not places:
        return True
    # By primary key: the events of the configuration versions, few for any tenant.
    times = {
        position: (recorded_at, occurred_at)
        for position, recorded_at, occurred_at in conn.execute(
            """
            SELECT e.position, e.recorded_at, e.occurred_at
            FROM unnest(%s::text[]::xid8[], %s::bigint[]) AS v (tx_id, position)
            JOIN events AS e
              ON e.tenant_id = %s AND e.tx_id = v.tx_id AND e.position = v.position
            """,
            ([str(tx_id) for tx_id, _ in places], [position for _, position in places], tenant_id),
        )
    }
    recorded = {position for position, (at, _) in times.items() if at <= known_at}
    if recorded != {position for _, position in known_history.places()}:
        return False
    return as_of is None or all(times[position][1] <= as_of for position in recorded)


def _refolded(
    conn: psycopg.Connection[Any],
    model: IncidentModel,
    tenant_id: str,
    streams: set[str],
    history: ConfigHistory,
    known_at: datetime,
    as_of: datetime | None,
) -> list[Any]:
    """Fold `streams` from their events recorded by `known_at` (and happened by `as_of`)."""
    if not streams:
        return []
    query = f"""
        SELECT {EVENT_COLUMNS} FROM events
        WHERE tenant_id = %(tenant)s AND stream_id = ANY(%(streams)s)
          AND recorded_at <= %(known)s
          AND (%(as_of)s::timestamptz IS NULL OR occurred_at <= %(as_of)s)
        ORDER BY tx_id, position
    """
    params = {"tenant": tenant_id, "streams": list(streams), "known": known_at, "as_of": as_of}
    return _folded_streams(conn, model, tenant_id, history, query, params)


def straddling_trend_states(
    conn: psycopg.Connection[Any], tenant_id: str, as_of: datetime
) -> list[TrendState]:
    """Fold the trends state at `as_of` of each incident with events before and after it."""
    return straddling_states(conn, TRENDS_MODEL, tenant_id, as_of)


def straddling_states(
    conn: psycopg.Connection[Any], model: IncidentModel, tenant_id: str, as_of: datetime
) -> list[Any]:
    """Fold the state at `as_of` of each incident of `model` with events on both sides of
    it, from its events that happened by then.

    The configuration version in force for each event comes from its log position, as in
    the streaming fold, whatever the valid time asked about.
    """
    ids = [
        row[0]
        for row in conn.execute(
            sql.SQL(
                """
                SELECT incident_id FROM {}
                WHERE tenant_id = %s AND earliest_occurred_at <= %s AND latest_occurred_at > %s
                """
            ).format(sql.Identifier(model.table)),
            (tenant_id, as_of, as_of),
        )
    ]
    if not ids:
        return []
    # Two queries rather than a join of the model and the log: the planner cannot tell how
    # many rows straddle as_of, and joined, it read the tenant's whole log index per row.
    query = f"""
        SELECT {EVENT_COLUMNS} FROM events
        WHERE tenant_id = %(tenant)s AND stream_id = ANY(%(streams)s) AND occurred_at <= %(as_of)s
        ORDER BY tx_id, position
    """
    params = {
        "tenant": tenant_id,
        "streams": [incident_stream_id(incident_id) for incident_id in ids],
        "as_of": as_of,
    }
    history = load_histories(conn, [tenant_id], model.configs).get(tenant_id)
    return _folded_streams(conn, model, tenant_id, history, query, params)


def _folded_streams(
    conn: psycopg.Connection[Any],
    model: IncidentModel,
    tenant_id: str,
    history: ConfigHistory | None,
    query: str,
    params: dict[str, Any],
) -> list[Any]:
    """Fold, by stream, the events that `query` returns in log order.

    Leaves out the events the model's projection skips (parked) and those it does not fold.
    Log order is the order the projector folded them in: a transaction that took its id
    first but committed last puts a stream's later version before an earlier one.
    """
    parked = tenant_parked_positions(conn, model.projection, tenant_id)
    states: dict[str, Any] = {}
    with conn.cursor() as cur:
        cur.execute(query, params)
        for row in cur:
            event = row_to_event(row)
            if event.position in parked or event.event_type not in lc.INCIDENT_EVENT_TYPES:
                continue
            states[event.stream_id] = model.fold_event(states.get(event.stream_id), event, history)
    return [state for state in states.values() if state is not None]
