"""Read models fed by the event log, and the contract they follow to take part in replay.

A projection streams (`apply`), and for rebuilds, time travel and snapshots it also folds
events in memory (`fold`), writes folded states in bulk (`write_states`), reads them back
(`read_states`) and serializes them canonically (`to_records`, `from_records`). The
replay machinery treats the folded states as an opaque mapping from a row key to a state.
`IncidentRowProjection` implements the whole contract for one-row-per-incident models.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import operator
import types
import typing
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from itertools import repeat
from typing import Any, Generic, TypeVar
from uuid import UUID

import orjson
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from ledger.events import RecordedEvent
from ledger.lifecycle import INCIDENT_EVENT_TYPES

logger = logging.getLogger(__name__)

State = TypeVar("State")

INCIDENT_STREAM_PREFIX = "incident-"
EMPTY_JSON_ARRAY = "[]"
# Column types that psycopg writes in binary COPY form from the values a state dataclass
# contains: str, UUID, aware datetime, float, int and bool. jsonb columns are encoded by
# `_binary_row` and sent as bytea.
BINARY_COPY_TYPES = frozenset({"text", "uuid", "timestamptz", "float8", "int4", "int8", "bool"})
# jsonb's binary form is a format version byte, 1, followed by the JSON text.
JSONB_VERSION = b"\x01"
EMPTY_JSONB = JSONB_VERSION + b"[]"


# Folded states of a projection: row key -> state. The key's first element is the tenant id.
Folded = dict[tuple[str, Any], Any]


class Projection:
    """A read model fed by the event log. `apply` runs inside the checkpoint's transaction.

    Replay (rebuilds, time travel, snapshots) needs the methods below `apply` too. They fold
    only from their arguments: the clock, random ids and tenant rules come from events, so
    a fold of the same events gives the same states wherever it runs. A what-if replay
    passes a projection built with another rule set; nothing else changes.
    """

    name: str
    tables: tuple[str, ...]
    # True when each row depends only on the events of its own stream and of the tenant's
    # streams that have no row (its configuration). A rebuild may then fold a tenant's
    # incident streams in several processes, and time travel may refold single streams
    # on top of a snapshot.
    stream_keyed: bool = False
    # False for a model that implements only `apply` so far: rebuilds, time travel and
    # snapshots refuse it with a clear error instead of failing half-way.
    replayable: bool = False
    # False for a model that must hold every event, which operators then cannot park.
    parkable: bool = True
    # The event types whose payload and metadata `apply` reads; None for all. The
    # streaming projector still passes every event, and the others come with empty
    # payload and metadata, which spares decoding JSON the model ignores.
    payload_types: frozenset[str] | None = None

    def apply(self, conn: psycopg.Connection[Any], events: list[RecordedEvent]) -> None:
        raise NotImplementedError

    def fold(self, events: Iterable[RecordedEvent], initial: Folded | None = None) -> Folded:
        """Fold events, in the order given, onto `initial` (or nothing) and return the states.

        The events are one tenant's log in (tx_id, position) order, configuration streams
        included, possibly filtered by valid or transaction time.
        """
        raise NotImplementedError

    def stream_key(self, tenant_id: str, stream_id: str) -> tuple[str, Any] | None:
        """Return the row key a stream's events fold into, or None for a stream without a
        row of its own. Only stream-keyed models need it."""
        raise NotImplementedError

    def retarget(self, schema: str, tables: dict[str, str]) -> Projection:
        """Return a copy that applies and writes to `tables` (live name -> new name) in
        `schema`: how a rebuild fills its shadow tables."""
        raise NotImplementedError

    def write_states(self, conn: psycopg.Connection[Any], states: Folded) -> None:
        """Bulk-write folded states into this projection's tables, which hold none of them."""
        raise NotImplementedError

    def write_folded(self, conn: psycopg.Connection[Any], events: list[RecordedEvent]) -> int:
        """Fold events from nothing, bulk-write the states and return how many there are.

        A rebuild calls it in its workers. A model that keeps more than its final states,
        such as row versions, writes those too.
        """
        states = self.fold(events)
        self.write_states(conn, states)
        return len(states)

    def write_log_rows(self, conn: psycopg.Connection[Any], events: list[RecordedEvent]) -> None:
        """Bulk-write the rows that come from the events themselves rather than from the
        folded states, such as stored configuration versions. The default writes none.

        A rebuild calls it once per tenant with that tenant's events, configuration
        streams included, after `write_states`.
        """

    def read_states(self, conn: psycopg.Connection[Any], tenant_id: str) -> Folded:
        """Read one tenant's rows back as states."""
        raise NotImplementedError

    def to_records(self, states: Folded) -> list[dict[str, Any]]:
        """Serialize states to JSON objects in a canonical order, for snapshots and output."""
        raise NotImplementedError

    def from_records(self, tenant_id: str, records: list[dict[str, Any]]) -> Folded:
        """Read back what `to_records` wrote for one tenant."""
        raise NotImplementedError

    def to_snapshot(self, states: Folded) -> Any:
        """Serialize states to the JSON value a snapshot stores, in a canonical order.

        The default is `to_records`' list. A model whose rows are costly to read back that
        way returns an object instead, which only its `from_snapshot` reads.
        """
        return self.to_records(states)

    def from_snapshot(self, tenant_id: str, document: Any) -> Folded:
        """Read back a snapshot's JSON value: `to_records`' list, or this model's own object.

        Raises ValueError, KeyError or TypeError for a value this model cannot read, such as
        one written before its state type gained a field.
        """
        if not isinstance(document, list):
            raise ValueError(f"snapshot of {self.name} is not a list of records")
        return self.from_records(tenant_id, document)


class IncidentRowProjection(Projection, Generic[State]):
    """A table with one row per incident whose columns are the fields of a state dataclass.

    Each batch loads the rows of the incidents it touches, folds the new events into them
    in log order and writes them back with one upsert.
    """

    stream_keyed = True
    replayable = True

    def __init__(
        self,
        name: str,
        table: str,
        state_type: type[State],
        evolve: Callable[[State | None, RecordedEvent], State | None],
    ) -> None:
        self.name = name
        self.table = table
        self.schema: str | None = None
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
        self._decoders = {name: _decoder(hints[name]) for name in self.columns}
        # Binary COPY types of tenant_id and the columns by qualified table name, or None
        # for a table with a column type outside BINARY_COPY_TYPES and jsonb.
        self._copy_types: dict[str, list[str] | None] = {}

    @property
    def _target(self) -> sql.Identifier:
        if self.schema is None:
            return sql.Identifier(self.table)
        return sql.Identifier(self.schema, self.table)

    def stream_key(self, tenant_id: str, stream_id: str) -> tuple[str, UUID] | None:
        if not stream_id.startswith(INCIDENT_STREAM_PREFIX):
            return None
        return (tenant_id, UUID(stream_id.removeprefix(INCIDENT_STREAM_PREFIX)))

    def retarget(self, schema: str, tables: dict[str, str]) -> IncidentRowProjection[State]:
        clone = copy.copy(self)
        clone.schema = schema
        clone.table = tables[self.table]
        clone.tables = (clone.table,)
        return clone

    def fold(
        self, events: Iterable[RecordedEvent], initial: Folded | None = None
    ) -> dict[tuple[str, UUID], State]:
        """Fold events onto `initial`: the table this projection should hold for them."""
        states: dict[tuple[str, Any], State | None] = dict(initial or {})
        keys = StreamKeys(self)
        for event in events:
            if event.event_type in INCIDENT_EVENT_TYPES:
                key = keys.of(event)
                states[key] = self.evolve(states.get(key), event)
        return keys.result(states)

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
        ).format(self._column_list, self._target)
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
        target = self._target
        rows = [
            (tenant_id, state, ()) for (tenant_id, _), state in states.items() if state is not None
        ]
        updates = sql.SQL(", ").join(
            sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(name))
            for name in self.columns
            if name != "incident_id"
        )
        self.insert_staged(
            conn,
            target,
            f"{self.table}_batch",
            ["tenant_id", *self.columns],
            rows,
            sql.SQL("ON CONFLICT (tenant_id, incident_id) DO UPDATE SET {}").format(updates),
        )
        removed = [key for key, state in states.items() if state is None]
        with conn.cursor() as cur:
            for tenant_id, stream_id in removed:
                cur.execute(
                    sql.SQL("DELETE FROM {} WHERE tenant_id = %s AND incident_id = %s").format(
                        target
                    ),
                    (tenant_id, stream_id.removeprefix(INCIDENT_STREAM_PREFIX)),
                )

    def insert_staged(
        self,
        conn: psycopg.Connection[Any],
        target: sql.Identifier,
        staging_name: str,
        columns: list[str],
        rows: list[tuple[str, State, tuple[Any, ...]]],
        on_conflict: sql.Composable | None = None,
    ) -> None:
        """Insert rows, as `copy_rows` takes them, into `target` through the temporary table
        `staging_name`: one COPY, then one INSERT with `on_conflict`.

        The live tables have row-level security, which COPY does not support. The staging
        table is emptied after the INSERT, because one transaction may write several batches.
        """
        staging = sql.Identifier(staging_name)
        conn.execute(
            sql.SQL(
                "CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS) "
                "ON COMMIT DELETE ROWS"
            ).format(staging, target)
        )
        self.copy_rows(conn, staging, columns, rows)
        column_list = sql.SQL(", ").join(map(sql.Identifier, columns))
        insert = sql.SQL("INSERT INTO {target} ({columns}) SELECT {columns} FROM {staging}").format(
            target=target, columns=column_list, staging=staging
        )
        if on_conflict is not None:
            insert = sql.SQL(" ").join([insert, on_conflict])
        conn.execute(insert)
        conn.execute(sql.SQL("TRUNCATE {}").format(staging))

    def copy_rows(
        self,
        conn: psycopg.Connection[Any],
        target: sql.Identifier,
        columns: list[str],
        rows: list[tuple[str, State, tuple[Any, ...]]],
    ) -> None:
        """COPY rows of (tenant_id, state, extra values) into `columns` of `target`: tenant_id,
        the state's fields, then a column for each extra value.

        Binary when the table's column types allow it, else text. Formatting a datetime is
        the costliest step of a text row. Over the trends rows of one Boston copy, a binary
        COPY took 0.6 s of client CPU and a text COPY 1.3 s. Binary is stricter, though. A
        value of another type than its column (an int in a text column, a naive datetime)
        raises TypeError where the server would convert its text, so a savepoint undoes the
        COPY and the rows go out as text.
        """
        column_list = sql.SQL(", ").join(map(sql.Identifier, columns))
        types = self._binary_copy_types(conn, target, columns)
        if types is not None:
            statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
                target, column_list
            )
            try:
                with conn.transaction(), conn.cursor() as cur, cur.copy(statement) as copy_:
                    copy_.set_types(types)
                    for tenant_id, state, extra in rows:
                        copy_.write_row((tenant_id, *self._binary_row(state), *extra))
                return
            except (TypeError, ValueError, OverflowError) as error:
                logger.warning(
                    "binary COPY of %d rows into %s failed, copying them as text: %s",
                    len(rows),
                    target.as_string(conn),
                    error,
                )
        statement = sql.SQL("COPY {} ({}) FROM STDIN").format(target, column_list)
        with conn.cursor() as cur, cur.copy(statement) as copy_:
            for tenant_id, state, extra in rows:
                copy_.write_row((tenant_id, *self._row(state), *extra))

    def _binary_copy_types(
        self, conn: psycopg.Connection[Any], target: sql.Identifier, columns: list[str]
    ) -> list[str] | None:
        """Return the types to COPY `columns` of `target` as, read once per table from the
        catalog (jsonb columns as bytea, because `_binary_row` encodes them), or None when
        a column's type has no binary form here."""
        name = target.as_string(conn)
        if name not in self._copy_types:
            found = dict(
                conn.execute(
                    "SELECT a.attname, t.typname FROM pg_attribute a "
                    "JOIN pg_type t ON t.oid = a.atttypid "
                    "WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped",
                    (name,),
                ).fetchall()
            )
            column_types = [found.get(column) for column in columns]
            usable = all(kind in BINARY_COPY_TYPES or kind == "jsonb" for kind in column_types)
            self._copy_types[name] = (
                ["bytea" if kind == "jsonb" else str(kind) for kind in column_types]
                if usable
                else None
            )
        return self._copy_types[name]

    def _binary_row(self, state: State) -> list[Any]:
        """Return the values of `state` for a binary COPY, JSON fields in jsonb's binary form."""
        row = list(self._values(state))
        for index in self._json_indexes:
            value = row[index]
            if value is not None:
                row[index] = EMPTY_JSONB if value == [] else JSONB_VERSION + orjson.dumps(value)
        return row

    def _row(self, state: State) -> tuple[Any, ...]:
        """Return the values of `state` as a row for a text-format COPY."""
        values: tuple[Any, ...] = self._values(state)
        # Most rows (every imported incident) have no JSON value, and a rebuild writes them
        # without copying the tuple.
        if all(values[index] is None for index in self._json_indexes):
            return values
        row = list(values)
        for index in self._json_indexes:
            value = row[index]
            if value is not None:
                # An empty array goes out as its text, which COPY's jsonb input reads,
                # because most list fields are empty and psycopg's str dumper costs less
                # than its JSON dumper, which is written in Python.
                row[index] = EMPTY_JSON_ARRAY if value == [] else Jsonb(value)
        return tuple(row)

    def write_states(self, conn: psycopg.Connection[Any], states: Folded) -> None:
        columns = sql.SQL(", ").join(map(sql.Identifier, ["tenant_id", *self.columns]))
        with (
            conn.cursor() as cur,
            cur.copy(sql.SQL("COPY {} ({}) FROM STDIN").format(self._target, columns)) as copy_,
        ):
            for (tenant_id, _), state in states.items():
                copy_.write_row((tenant_id, *self._row(state)))

    def read_all(self, conn: psycopg.Connection[Any]) -> dict[tuple[str, UUID], State]:
        """Read the whole table back as states, for comparisons with a fresh fold."""
        return self._read(conn, None)

    def read_states(
        self, conn: psycopg.Connection[Any], tenant_id: str
    ) -> dict[tuple[str, UUID], State]:
        return self._read(conn, tenant_id)

    def _read(
        self, conn: psycopg.Connection[Any], tenant_id: str | None
    ) -> dict[tuple[str, UUID], State]:
        query = sql.SQL("SELECT tenant_id, {} FROM {}").format(self._column_list, self._target)
        params: tuple[Any, ...] = ()
        if tenant_id is not None:
            query += sql.SQL(" WHERE tenant_id = %s")
            params = (tenant_id,)
        loaded: dict[tuple[str, UUID], State] = {}
        with conn.cursor() as cur:
            cur.execute(query, params)
            for row_tenant, *values in cur:
                loaded[(row_tenant, values[0])] = self.state_type(*values)
        return loaded

    def to_records(self, states: Folded) -> list[dict[str, Any]]:
        """Serialize states as JSON objects sorted by tenant and incident id.

        Times are written in UTC with microseconds, ids as text, so equal states give equal
        bytes whatever time zone a connection used to read them.
        """
        records = []
        for tenant_id, incident_id in sorted(states, key=lambda key: (key[0], str(key[1]))):
            state = states[(tenant_id, incident_id)]
            record: dict[str, Any] = {"tenant_id": tenant_id}
            for name, value in zip(self.columns, self._values(state), strict=True):
                record[name] = _encode(value)
            records.append(record)
        return records

    def from_records(
        self, tenant_id: str, records: list[dict[str, Any]]
    ) -> dict[tuple[str, UUID], State]:
        states: dict[tuple[str, UUID], State] = {}
        for record in records:
            values = [self._decoders[name](record[name]) for name in self.columns]
            states[(tenant_id, values[0])] = self.state_type(*values)
        return states

    def to_snapshot(self, states: Folded) -> dict[str, Any]:
        """Serialize states by column: {"columns": field names, "values": one array per
        field}, rows sorted by incident id, values in `to_records`' forms. It reads back
        without an object per row, and with one parse per time or id that is not null."""
        ordered = [states[key] for key in sorted(states, key=lambda key: str(key[1]))]
        rows = [[_encode(value) for value in self._values(state)] for state in ordered]
        values = [list(column) for column in zip(*rows, strict=True)] if rows else []
        return {"columns": self.columns, "values": values or [[] for _ in self.columns]}

    def from_snapshot(self, tenant_id: str, document: Any) -> dict[tuple[str, UUID], State]:
        if isinstance(document, list):
            return self.from_records(tenant_id, document)
        if not isinstance(document, dict) or document.get("columns") != self.columns:
            raise ValueError(
                f"snapshot of {self.name} has other columns than {self.state_type.__name__}"
            )
        columns = document.get("values")
        if (
            not isinstance(columns, list)
            or len(columns) != len(self.columns)
            or len({len(column) for column in columns}) > 1
        ):
            raise ValueError(f"snapshot of {self.name} lacks one array of values per column")
        decoded = []
        for name, column in zip(self.columns, columns, strict=True):
            parse = _PARSERS.get(self._decoders[name])
            if parse is None:
                decoded.append(column)
            else:
                decoded.append([None if value is None else parse(value) for value in column])
        states: list[State] = list(map(self.state_type, *decoded))
        keys = zip(repeat(tenant_id, len(states)), decoded[0], strict=True)
        return dict(zip(keys, states, strict=True))


class StreamKeys:
    """Row keys of incident streams for a fold, built once per stream: making a UUID from
    the stream id costs more than folding one event."""

    def __init__(self, projection: Projection) -> None:
        self.projection = projection
        self.keys: dict[tuple[str, str], tuple[str, Any]] = {}

    def of(self, event: RecordedEvent) -> tuple[str, Any]:
        """Return the row key of an incident event's stream."""
        key = self.keys.get((event.tenant_id, event.stream_id))
        if key is None:
            key = self.projection.stream_key(event.tenant_id, event.stream_id)
            assert key is not None, event.stream_id
            self.keys[(event.tenant_id, event.stream_id)] = key
        return key

    def result(self, states: dict[tuple[str, Any], Any]) -> dict[tuple[str, Any], Any]:
        """Return the folded states keyed by (tenant, state.incident_id), without the rows
        whose state became None. Only the streams folded here are checked, because the rows
        of `initial` are keyed that way already."""
        if all(
            states[key] is not None and states[key].incident_id == key[1]
            for key in self.keys.values()
        ):
            return states
        return {
            (tenant_id, state.incident_id): state
            for (tenant_id, _), state in states.items()
            if state is not None
        }


def qualified(schema: str | None, table: str) -> sql.Identifier:
    """Return the identifier of `table`, in `schema` when one is given."""
    return sql.Identifier(table) if schema is None else sql.Identifier(schema, table)


def copy_config_versions(
    conn: psycopg.Connection[Any], target: sql.Composable, rows: dict[tuple[str, int], Any]
) -> None:
    """COPY configuration versions, {(tenant, version): (tx_id, position, payloads,
    known_since)}, into `target`, a table with the columns of sla_configs."""
    with (
        conn.cursor() as cur,
        cur.copy(
            sql.SQL(
                "COPY {} (tenant_id, version, tx_id, position, payloads, known_since) FROM STDIN"
            ).format(target)
        ) as copy_,
    ):
        for (tenant_id, version), (tx_id, position, payloads, known_since) in rows.items():
            copy_.write_row(
                (tenant_id, version, str(tx_id), position, Jsonb(payloads), known_since)
            )


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    if isinstance(value, UUID):
        return str(value)
    return value


def _decoder(hint: Any) -> Callable[[Any], Any]:
    """Return the function that reads a field of type `hint` back from `_encode`'s form."""
    members = set(typing.get_args(hint)) if _is_union(hint) else {hint}
    if datetime in members:
        return _decode_datetime
    if UUID in members:
        return _decode_uuid
    return _decode_as_is


# Module-level functions, not lambdas: a rebuild pickles projections to its worker processes.
def _decode_datetime(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _decode_uuid(value: str | None) -> UUID | None:
    return None if value is None else UUID(value)


def _decode_as_is(value: Any) -> Any:
    return value


# The parse of a non-null value for each decoder, for decoding whole columns.
_PARSERS: dict[Callable[[Any], Any], Callable[[str], Any]] = {
    _decode_datetime: datetime.fromisoformat,
    _decode_uuid: UUID,
}


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _is_json_object(hint: Any) -> bool:
    """Return True when a field's type is a dict or a list, or an optional one, stored as jsonb."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is_json_object(member) for member in typing.get_args(hint))
    return hint in (dict, list) or typing.get_origin(hint) in (dict, list)
