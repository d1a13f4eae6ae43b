"""Audit endpoints for officers: filtered events and their exports, incident histories as
known at a past moment, and who changed what between two moments."""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at run
# time.

import logging
from collections.abc import AsyncIterator, Generator
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from uuid import UUID

import anyio
from fastapi import Depends, FastAPI, Query
from psycopg_pool import ConnectionPool
from pydantic import BaseModel, Field
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from api.auth import allow
from ledger.audit import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    AuditFilter,
    AuditPage,
    EventChanges,
    audit_transaction,
    incident_history,
    parse_time,
    read_changes,
    read_page,
)
from ledger.audit_export import MEDIA_TYPES, ExportFormat, event_record, export_events
from ledger.errors import InvalidRequest
from ledger.keys import Principal, Role
from ledger.store import PostgresEventStore
from ledger.tenants import TENANT_ID_PATTERN, require_tenant

logger = logging.getLogger(__name__)

AUDIT = "/tenants/{tenant_id}/audit"
TenantPath = Annotated[str, Field(pattern=TENANT_ID_PATTERN.pattern)]

# The audit trail records what staff and admins did, so only officers read it: the people
# it watches do not. Staff keep each incident's history through GET .../incidents/{id}/events.
Officer = Annotated[Principal, allow(Role.OFFICER, action="read the audit trail")]

TIME_HELP = (
    "ISO 8601; a time without an offset is read in the tenant's time zone. In a URL, write "
    "a '+' offset as %2B."
)


class AuditEventOut(BaseModel):
    """An event with its metadata spelled out. Times are ISO 8601 in UTC."""

    position: int
    tx_id: int = Field(description="Transaction that appended the event; pages sort by it first")
    recorded_at: str = Field(description="Transaction time: when the ledger stored the event")
    occurred_at: str = Field(description="Valid time: when it happened in the world")
    event_type: str
    schema_version: int
    stream_id: str
    stream_version: int
    incident_id: str | None
    actor: str | None
    role: str | None
    actor_id: str | None = Field(description="Id of the API key that made the request")
    channel: str | None
    correlation_id: str | None
    event_id: str
    payload: dict[str, Any]
    metadata: dict[str, Any]
    hash: str = Field(description="SHA-256 chaining the event to the one before it, in hex")


class AuditPageOut(BaseModel):
    tenant_id: str
    events: list[AuditEventOut]
    next_cursor: str = Field(
        description="Send as `cursor`, with the same filters, for the next page. It also "
        "works once has_more is false, to read the events appended since."
    )
    has_more: bool = Field(description="False when this page reached the last event so far")


class IncidentHistoryOut(BaseModel):
    tenant_id: str
    incident_id: UUID
    known_at: datetime = Field(description="Transaction time the history is read at")
    as_of: datetime | None = Field(description="Valid time limit, when one was given")
    state: dict[str, Any] | None = Field(
        description="The incident folded from these events; null when none were known"
    )
    events: list[AuditEventOut]


class FieldChangeOut(BaseModel):
    field: str
    before: Any = Field(description="The value before the event; null for payload changes")
    after: Any


class EventChangesOut(BaseModel):
    position: int
    tx_id: int
    recorded_at: str
    occurred_at: str
    actor: str | None
    role: str | None
    actor_id: str | None
    event_type: str
    stream_id: str
    incident_id: str | None
    event_id: str
    source: Literal["state", "payload"] = Field(
        description="state: fields of the incident that differ before and after the event; "
        "payload: the event's payload fields, for events outside incidents"
    )
    changes: list[FieldChangeOut]


class ChangesPageOut(BaseModel):
    tenant_id: str
    recorded_from: datetime
    recorded_to: datetime | None = Field(description="null when `to` was not given")
    changes: list[EventChangesOut]
    next_cursor: str
    has_more: bool


class FilterParams:
    """Query parameters that select events, shared by the event and change endpoints."""

    def __init__(
        self,
        actor: Annotated[
            str | None, Query(description="Actor name in the event's metadata (exact match)")
        ] = None,
        role: Annotated[
            str | None,
            Query(description="Actor role: reporter, staff, officer, admin, or system (imports)"),
        ] = None,
        event_type: Annotated[
            list[str] | None,
            Query(
                description="Event type, such as IncidentAssigned; repeat it or separate "
                "types with commas to match any of them"
            ),
        ] = None,
        incident_id: Annotated[UUID | None, Query(description="Events of one incident")] = None,
        stream: Annotated[
            str | None, Query(description="Events of one stream, such as keys-TENANT")
        ] = None,
        category: Annotated[
            str | None,
            Query(description="Events of incidents reported with this category (exact match)"),
        ] = None,
        occurred_from: Annotated[
            str | None, Query(description="Valid time from (included). " + TIME_HELP)
        ] = None,
        occurred_to: Annotated[
            str | None, Query(description="Valid time to (excluded). " + TIME_HELP)
        ] = None,
    ) -> None:
        self.actor = actor
        self.role = role
        self.event_types = tuple(
            name.strip() for value in event_type or () for name in value.split(",") if name
        )
        self.incident_id = incident_id
        self.stream = stream
        self.category = category
        self.occurred_from = occurred_from
        self.occurred_to = occurred_to

    def build(
        self,
        time_zone: str,
        *,
        recorded_from: datetime | None = None,
        recorded_to: datetime | None = None,
    ) -> AuditFilter:
        return AuditFilter(
            actor=self.actor,
            role=self.role,
            event_types=self.event_types,
            incident_id=self.incident_id,
            stream_id=self.stream,
            category=self.category,
            occurred_from=parse_time("occurred_from", self.occurred_from, time_zone),
            occurred_to=parse_time("occurred_to", self.occurred_to, time_zone),
            recorded_from=recorded_from,
            recorded_to=recorded_to,
        )


Filters = Annotated[FilterParams, Depends()]
Limit = Annotated[
    int | None,
    Query(
        ge=1,
        le=MAX_PAGE_SIZE,
        description=f"Events per page, 1 to {MAX_PAGE_SIZE} (default {DEFAULT_PAGE_SIZE})",
    ),
]
Cursor = Annotated[
    str | None, Query(description="next_cursor of the previous page; the filters must match")
]


class ExportResponse(StreamingResponse):
    """Streams a blocking generator of chunks, and closes it however the response ends.

    The generator keeps a pool connection checked out, with an open transaction. When a client
    disconnects, Starlette stops iterating but does not close the generator, which would
    keep the connection until the garbage collector finalizes it. Closing it here returns
    the connection to the pool at once.
    """

    def __init__(
        self,
        chunks: Generator[bytes, None, None],
        first: bytes,
        *,
        media_type: str,
        headers: dict[str, str],
    ) -> None:
        self.chunks = chunks
        super().__init__(self._stream(first), media_type=media_type, headers=headers)

    async def _stream(self, first: bytes) -> AsyncIterator[bytes]:
        yield first
        while True:
            # anyio lets the thread finish before a cancellation takes effect, so the
            # generator is never running when __call__ closes it.
            chunk = await anyio.to_thread.run_sync(_next_chunk, self.chunks)
            if chunk is None:
                return
            yield chunk

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # After a disconnect this runs in a cancelled scope, where an await that is not
            # shielded would be cancelled before the generator is closed.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.chunks.close)


def _next_chunk(chunks: Generator[bytes, None, None]) -> bytes | None:
    return next(chunks, None)


def _page_out(tenant_id: str, page: AuditPage) -> AuditPageOut:
    return AuditPageOut(
        tenant_id=tenant_id,
        events=[AuditEventOut(**event_record(event)) for event in page.events],
        next_cursor=page.next_cursor,
        has_more=page.has_more,
    )


def _changes_out(item: EventChanges) -> EventChangesOut:
    record = event_record(item.event)
    return EventChangesOut(
        position=record["position"],
        tx_id=record["tx_id"],
        recorded_at=record["recorded_at"],
        occurred_at=record["occurred_at"],
        actor=record["actor"],
        role=record["role"],
        actor_id=record["actor_id"],
        event_type=record["event_type"],
        stream_id=record["stream_id"],
        incident_id=record["incident_id"],
        event_id=record["event_id"],
        source="state" if item.source == "state" else "payload",
        changes=[
            FieldChangeOut(field=change.name, before=change.before, after=change.after)
            for change in item.fields
        ],
    )


def add_audit_routes(
    app: FastAPI,
    *,
    pool: ConnectionPool[Any],
    store: PostgresEventStore,
    responses: dict[int | str, dict[str, Any]],
) -> None:
    """Add the officers' audit endpoints under /tenants/{tenant_id}/audit to `app`.

    `responses` documents the problem responses, as the app's other routes do.
    """

    def export(
        tenant_id: str, audit_filter: AuditFilter, export_format: ExportFormat
    ) -> ExportResponse:
        def chunks() -> Generator[bytes, None, None]:
            with pool.connection() as conn:
                yield from export_events(conn, tenant_id, audit_filter, export_format)

        # NOTE: each running export keeps one pool connection until it ends, so as many
        # simultaneous exports as the pool has connections make other requests wait.
        stream = chunks()
        # The first chunk comes after the query has run, so a bad filter or a database
        # error still gets a problem document rather than a cut-off 200.
        # A generator that raises is finished, and has returned its connection.
        first = next(stream, b"")
        filename = f"{tenant_id}-audit-events.{export_format}"
        return ExportResponse(
            stream,
            first,
            media_type=MEDIA_TYPES[export_format],
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )

    @app.get(
        AUDIT + "/events",
        response_model=AuditPageOut,
        responses={
            **responses,
            200: {
                "description": "A page of events (format=json), or every matching event as "
                "a CSV or JSON Lines download (format=csv or jsonl)",
                "content": {"text/csv": {}, "application/x-ndjson": {}},
            },
        },
        tags=["audit"],
    )
    def get_audit_events(
        tenant_id: TenantPath,
        principal: Officer,
        filters: Filters,
        recorded_from: Annotated[
            str | None, Query(description="Transaction time from (included). " + TIME_HELP)
        ] = None,
        recorded_to: Annotated[
            str | None, Query(description="Transaction time to (excluded). " + TIME_HELP)
        ] = None,
        limit: Limit = None,
        cursor: Cursor = None,
        export_format: Annotated[
            Literal["json", "csv", "jsonl"],
            Query(
                alias="format",
                description="json: one page, continued with next_cursor. csv or jsonl: "
                "every matching event, streamed (limit and cursor do not apply).",
            ),
        ] = "json",
    ) -> Any:
        """List the tenant's events that match every filter given, oldest transaction first.

        Pages hold events up to the transaction horizon: an event appears once no
        transaction that started writing before it is still running. Exports stream every
        event committed when they start."""
        tenant = require_tenant(store, tenant_id)
        audit_filter = filters.build(
            tenant.time_zone,
            recorded_from=parse_time("recorded_from", recorded_from, tenant.time_zone),
            recorded_to=parse_time("recorded_to", recorded_to, tenant.time_zone),
        )
        if export_format != "json":
            if limit is not None or cursor is not None:
                raise InvalidRequest(
                    f"limit and cursor apply to format=json pages, not format={export_format}: "
                    "an export streams every matching event, so leave them out"
                )
            logger.info(
                "key %s exports audit events of tenant %s as %s",
                principal.key_id,
                tenant_id,
                export_format,
            )
            return export(tenant_id, audit_filter, export_format)
        with pool.connection() as conn, audit_transaction(conn, tenant_id):
            page = read_page(
                conn, tenant_id, audit_filter, cursor=cursor, limit=limit or DEFAULT_PAGE_SIZE
            )
        return _page_out(tenant_id, page)

    @app.get(
        AUDIT + "/incidents/{incident_id}",
        response_model=IncidentHistoryOut,
        responses=responses,
        tags=["audit"],
    )
    def get_audit_incident(
        tenant_id: TenantPath,
        incident_id: UUID,
        _: Officer,
        known_at: Annotated[
            str | None,
            Query(description="Transaction time: what the ledger knew then. " + TIME_HELP),
        ] = None,
        as_of: Annotated[
            str | None,
            Query(description="Valid time: keep only events that happened by then. " + TIME_HELP),
        ] = None,
    ) -> IncidentHistoryOut:
        """Return the incident's events and state as the ledger knew them at known_at
        (default: now), limited to what had happened by as_of when it is given."""
        tenant = require_tenant(store, tenant_id)
        known = parse_time("known_at", known_at, tenant.time_zone) or datetime.now(UTC)
        valid = parse_time("as_of", as_of, tenant.time_zone)
        with pool.connection() as conn, audit_transaction(conn, tenant_id):
            history = incident_history(conn, tenant_id, incident_id, known_at=known, as_of=valid)
        state = None
        if history.state is not None:
            state = asdict(history.state)
            state.pop("resume_status", None)
        return IncidentHistoryOut(
            tenant_id=tenant_id,
            incident_id=incident_id,
            known_at=known,
            as_of=valid,
            state=state,
            events=[AuditEventOut(**event_record(event)) for event in history.events],
        )

    @app.get(
        AUDIT + "/changes",
        response_model=ChangesPageOut,
        responses=responses,
        tags=["audit"],
    )
    def get_audit_changes(
        tenant_id: TenantPath,
        _: Officer,
        filters: Filters,
        recorded_from: Annotated[
            str,
            Query(
                alias="from",
                description="Transaction time from (included). " + TIME_HELP,
            ),
        ],
        recorded_to: Annotated[
            str | None,
            Query(alias="to", description="Transaction time to (excluded). " + TIME_HELP),
        ] = None,
        limit: Limit = None,
        cursor: Cursor = None,
    ) -> ChangesPageOut:
        """List who changed what: each event recorded in [from, to) with its actor and the
        fields it changed, derived by folding the incident before and after the event."""
        tenant = require_tenant(store, tenant_id)
        start = parse_time("from", recorded_from, tenant.time_zone)
        assert start is not None
        # No default of now for `to`: the filter must stay the same from page to page, or
        # the next page's cursor would not match it.
        end = parse_time("to", recorded_to, tenant.time_zone)
        audit_filter = filters.build(tenant.time_zone, recorded_from=start, recorded_to=end)
        with pool.connection() as conn, audit_transaction(conn, tenant_id):
            changes, page = read_changes(
                conn, tenant_id, audit_filter, cursor=cursor, limit=limit or DEFAULT_PAGE_SIZE
            )
        return ChangesPageOut(
            tenant_id=tenant_id,
            recorded_from=start,
            recorded_to=end,
            changes=[_changes_out(item) for item in changes],
            next_cursor=page.next_cursor,
            has_more=page.has_more,
        )
