"""Read models kept as one row per incident, folded from the incident's events."""

from __future__ import annotations

import dataclasses
import operator
import types
import typing
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from ledger.events import RecordedEvent
from ledger.lifecycle import INCIDENT_EVENT_TYPES

State = TypeVar("State")

INCIDENT_STREAM_PREFIX = "incident-"


class Projection:
    """A read model fed by the event log. `apply` runs inside the checkpoint's transaction."""

    name: str
    tables: tuple[str, ...]

    def apply(self, conn: psycopg.Connection[Any], events: list[RecordedEvent]) -> None:
        raise NotImplementedError


class IncidentRowProjection(Projection, Generic[State]):
    """A table with one row per incident whose columns are the fields of a state dataclass.

    Each batch loads the rows of the incidents it touches, folds the new events into them
    in log order and writes them back with one upsert.
    """

    def __init__(
        self,
        name: str,
        table: str,
        state_type: type[State],
        evolve: Callable[[State | None, RecordedEvent], State | None],
    ) -> None:
        self.name = name
        self.table = table
        self.tables = (table,)
        self.state_type = state_type
        self.evolve = evolve
        self.columns = [field.name for field in dataclasses.fields(state_type)]  # type: ignore[arg-type]
        if self.columns[0] != "incident_id":
            raise ValueError(f"{state_type.__name__} must start with its incident_id field")
        self._column_list = sql.SQL(", ").join(map(sql.Identifier, self.columns))
        self._values = operator.attrgetter(*self.columns)
        # COPY cannot adapt a dict, so fields typed as JSON objects go out wrapped as jsonb.
        hints = typing.get_type_hints(state_type)
        self._json_indexes = [
            index for index, name in enumerate(self.columns) if _is_json_object(hints[name])
        ]

    def fold(self, events: Iterable[RecordedEvent]) -> dict[tuple[str, UUID], State]:
        """Fold events from nothing: the table this projection should hold for them."""
        states: dict[tuple[str, str], State | None] = {}
        for event in events:
            if event.event_type in INCIDENT_EVENT_TYPES:
                key = (event.tenant_id, event.stream_id)
                states[key] = self.evolve(states.get(key), event)
        return {
            (tenant_id, state.incident_id): state  # type: ignore[attr-defined]
            for (tenant_id, _), state in states.items()
            if state is not None
        }

    def apply(self, conn: psycopg.Connection[Any], events: list[RecordedEvent]) -> None:
        # States are keyed by (tenant, stream id): the stream id is already on every event,
        # and building a UUID per event costs more than the fold itself.
        relevant = [event for event in events if event.event_type in INCIDENT_EVENT_TYPES]
        if not relevant:
            return
        states: dict[tuple[str, str], State | None] = dict(
            self.load(conn, {(event.tenant_id, event.stream_id) for event in relevant})
        )
        for event in relevant:
            key = (event.tenant_id, event.stream_id)
            states[key] = self.evolve(states.get(key), event)
        self.write(conn, states)

    def load(
        self, conn: psycopg.Connection[Any], keys: set[tuple[str, str]]
    ) -> dict[tuple[str, str], State]:
        """Read the stored states of the given (tenant, stream id) keys that have rows."""
        by_tenant: dict[str, list[str]] = defaultdict(list)
        for tenant_id, stream_id in keys:
            by_tenant[tenant_id].append(stream_id.removeprefix(INCIDENT_STREAM_PREFIX))
        loaded: dict[tuple[str, str], State] = {}
        query = sql.SQL(
            "SELECT {} FROM {} WHERE tenant_id = %s AND incident_id = ANY(%s::uuid[])"
        ).format(self._column_list, sql.Identifier(self.table))
        with conn.cursor() as cur:
            for tenant_id, ids in by_tenant.items():
                cur.execute(query, (tenant_id, ids))
                for row in cur:
                    state = self.state_type(*row)
                    key = (tenant_id, INCIDENT_STREAM_PREFIX + str(row[0]))
                    loaded[key] = state
        return loaded

    def write(
        self, conn: psycopg.Connection[Any], states: dict[tuple[str, str], State | None]
    ) -> None:
        """Upsert the given states and delete the rows whose state is None."""
        columns = ["tenant_id", *self.columns]
        staging = sql.Identifier(f"{self.table}_batch")
        target = sql.Identifier(self.table)
        conn.execute(
            sql.SQL(
                "CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS) "
                "ON COMMIT DELETE ROWS"
            ).format(staging, target)
        )
        column_list = sql.SQL(", ").join(map(sql.Identifier, columns))
        with conn.cursor() as cur:
            with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN").format(staging, column_list)) as copy:
                for (tenant_id, _), state in states.items():
                    if state is not None:
                        copy.write_row((tenant_id, *self._row(state)))
            updates = sql.SQL(", ").join(
                sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(name))
                for name in self.columns
                if name != "incident_id"
            )
            cur.execute(
                sql.SQL(
                    "INSERT INTO {target} ({columns}) SELECT {columns} FROM {staging} "
                    "ON CONFLICT (tenant_id, incident_id) DO UPDATE SET {updates}"
                ).format(target=target, columns=column_list, staging=staging, updates=updates)
            )
            cur.execute(sql.SQL("TRUNCATE {}").format(staging))
            removed = [key for key, state in states.items() if state is None]
            for tenant_id, stream_id in removed:
                cur.execute(
                    sql.SQL("DELETE FROM {} WHERE tenant_id = %s AND incident_id = %s").format(
                        target
                    ),
                    (tenant_id, stream_id.removeprefix(INCIDENT_STREAM_PREFIX)),
                )

    def _row(self, state: State) -> tuple[Any, ...]:
        values: tuple[Any, ...] = self._values(state)
        # Most rows (every imported incident) have no JSON value, and a rebuild writes them
        # without copying the tuple.
        if all(values[index] is None for index in self._json_indexes):
            return values
        row = list(values)
        for index in self._json_indexes:
            if row[index] is not None:
                row[index] = Jsonb(row[index])
        return tuple(row)

    def read_all(self, conn: psycopg.Connection[Any]) -> dict[tuple[str, UUID], State]:
        """Read the whole table back as states, for comparisons with a fresh fold."""
        loaded: dict[tuple[str, UUID], State] = {}
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL("SELECT tenant_id, {} FROM {}").format(
                    self._column_list, sql.Identifier(self.table)
                )
            )
            for tenant_id, *values in cur:
                loaded[(tenant_id, values[0])] = self.state_type(*values)
        return loaded


def _is_json_object(hint: Any) -> bool:
    """Return True when a field's type is a dict or a list, or an optional one, stored as jsonb."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is_json_object(member) for member in typing.get_args(hint))
    return hint in (dict, list) or typing.get_origin(hint) in (dict, list)
