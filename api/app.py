"""The FastAPI application: command, query and SLA endpoints."""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at run
# time, including the body types chosen per command in a loop.

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any
from uuid import UUID, uuid4

from fastapi import Body, Depends, FastAPI, Header, Query, Request, Response
from psycopg_pool import ConnectionPool
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from api.audit import add_audit_routes
from api.auth import actor_of, allow, document_roles
from api.problems import install_problem_handlers
from ledger.commands import IncidentCommands
from ledger.database import Database
from ledger.errors import IncidentNotFound, InvalidRequest
from ledger.ids import incident_stream_id
from ledger.keys import Principal, Role, issue_key, list_keys, revoke_key
from ledger.lifecycle import COMMANDS
from ledger.store import PostgresEventStore
from ledger.tenants import require_tenant
from projections.runtime import projection_progress
from projections.sla_queries import SlaCounts, consistent_snapshot, sla_summary

logger = logging.getLogger(__name__)

TENANT = "/tenants/{tenant_id}"
TenantPath = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{1,62}$")]


PERSONAL_FIELDS = frozenset(
    {"name", "email", "phone", "reporter", "reporter_name", "reporter_email", "reporter_phone"}
)


class ProblemOut(BaseModel):
    """An RFC 9457 problem-details document, as every error response carries."""

    type: str
    title: str
    status: int
    detail: str
    instance: str


def _problem_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "model": ProblemOut,
        "content": {"application/problem+json": {}},
    }


PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: _problem_response("API key missing, malformed, unknown, revoked or expired"),
    403: _problem_response("The key's role may not do this"),
    404: _problem_response("Tenant or incident not found (also for other tenants' ids)"),
    422: _problem_response("Invalid request: each error names the field and the value"),
}
COMMAND_RESPONSES: dict[int | str, dict[str, Any]] = {
    **PROBLEM_RESPONSES,
    409: _problem_response(
        "Version conflict (If-Match is stale) or a command that does not fit the state"
    ),
}


class ReportIn(BaseModel):
    """A report submitted by a resident, tenant or staff member."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    description: str = Field(min_length=1, max_length=5000)
    title: str | None = Field(default=None, max_length=200)
    category: str | None = Field(default=None, max_length=200)
    address: str | None = Field(default=None, max_length=500)
    latitude: float | None = Field(default=None, ge=-90, le=90, allow_inf_nan=False)
    longitude: float | None = Field(default=None, ge=-180, le=180, allow_inf_nan=False)
    source_channel: str = Field(default="api", max_length=50)

    @model_validator(mode="before")
    @classmethod
    def _no_personal_data(cls, data: Any) -> Any:
        # NOTE: events are never deleted, so personal data must not enter them until it can
        # be stored encrypted with a key that can be destroyed.
        if isinstance(data, dict):
            personal = sorted(PERSONAL_FIELDS & set(data))
            if personal:
                raise PydanticCustomError(
                    "personal_data",
                    "personal data ({fields}) is not accepted yet: reports cannot store a "
                    "reporter's contact details; leave these fields out",
                    {"fields": ", ".join(personal)},
                )
        return data


class AssignIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    assignee: str = Field(min_length=1, max_length=200)
    department: str | None = Field(default=None, max_length=200)


class QuestionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1, max_length=2000)


class ResponseIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    response: str = Field(min_length=1, max_length=2000)


class NoteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    note: str | None = Field(default=None, max_length=2000)


class ReasonIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(default=None, max_length=2000)


class RequiredReasonIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=2000)


class RejectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=2000)
    redirect_to: str = Field(
        min_length=1,
        max_length=500,
        description="Where the reporter should go instead: an agency, a phone number or a URL.",
    )


class DuplicateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    duplicate_of: UUID


class EmptyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")


COMMAND_BODIES: dict[str, type[BaseModel]] = {
    "acknowledge": EmptyIn,
    "assign": AssignIn,
    "start-work": EmptyIn,
    "request-information": QuestionIn,
    "reporter-responded": ResponseIn,
    "resolve": NoteIn,
    "reopen": RequiredReasonIn,
    "close": ReasonIn,
    "reject": RejectIn,
    "mark-duplicate": DuplicateIn,
}
assert set(COMMAND_BODIES) == set(COMMANDS)


class AppendOut(BaseModel):
    incident_id: UUID
    version: int
    replayed: bool


class SlaCountsOut(BaseModel):
    key: str | None
    total: int
    with_target: int
    open: int
    breached: int
    on_time: int
    on_time_rate: float | None


class SlaSummaryOut(BaseModel):
    tenant_id: str
    as_of: datetime
    caught_up: bool = Field(
        description="False while the projector is still applying events: the figures are "
        "then partial. GET /status shows its progress."
    )
    projected_position: int = Field(
        description="Log position up to which the SLA read model has applied events."
    )
    totals: SlaCountsOut
    by_category: list[SlaCountsOut]
    by_department: list[SlaCountsOut]


def _counts_out(key: str | None, counts: SlaCounts) -> SlaCountsOut:
    return SlaCountsOut(
        key=key,
        total=counts.total,
        with_target=counts.with_target,
        open=counts.open,
        breached=counts.breached,
        on_time=counts.on_time,
        on_time_rate=counts.on_time_rate,
    )


def get_commands(request: Request) -> IncidentCommands:
    commands: IncidentCommands = request.app.state.commands
    return commands


Commands = Annotated[IncidentCommands, Depends(get_commands)]

_ETAG = re.compile(r'^\s*(W/)?"?(\d{1,20})"?\s*$')
MAX_VERSION = 2**31 - 1  # stream versions are PostgreSQL integers


def parse_if_match(value: str | None) -> int | None:
    """Read the expected stream version from an If-Match header (`"3"`, or `3`).

    `*` matches any version, as no header does.
    """
    if value is None or value.strip() == "*":
        return None
    match = _ETAG.fullmatch(value)
    if not match:
        raise InvalidRequest(
            f"invalid If-Match header {value!r}: send the ETag that GET on the incident "
            'returned, a quoted version number such as "3"'
        )
    if match.group(1):
        raise InvalidRequest(
            f"invalid If-Match header {value!r}: a weak ETag never matches If-Match; send "
            "the strong ETag that GET on the incident returned"
        )
    version = int(match.group(2))
    if not 1 <= version <= MAX_VERSION:
        raise InvalidRequest(
            f"invalid If-Match header {value!r}: versions run from 1 to {MAX_VERSION}"
        )
    return version


def parse_as_of(value: str | None, zone_name: str) -> datetime:
    """Read an ISO 8601 time; a time without an offset is read in the tenant's time zone."""
    from zoneinfo import ZoneInfo

    if value is None:
        return datetime.now(UTC)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as error:
        raise InvalidRequest(
            f"invalid as_of {value!r}: use ISO 8601, such as 2016-01-13T00:00 or "
            "2016-01-13T05:00:00Z"
        ) from error
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=ZoneInfo(zone_name))
    return moment


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    role: Role
    name: str = Field(min_length=1, max_length=200, description="Who holds the key")
    expires_at: datetime | None = Field(
        default=None, description="When the key stops working (ISO 8601 with an offset)"
    )


class KeyOut(BaseModel):
    key_id: UUID
    role: Role
    name: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


class IssuedKeyOut(KeyOut):
    token: str = Field(description="The key itself. It is shown this once and never again.")


class RevokeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(default=None, max_length=2000)


Reporter = Role.REPORTER
Staff = Role.STAFF
Officer = Role.OFFICER
Admin = Role.ADMIN


def _request_id(request: Request) -> str:
    return request.headers.get("x-request-id") or str(uuid4())


def create_app(database: Database, *, pool: ConnectionPool[Any] | None = None) -> FastAPI:
    """Build the API over `database`. The app opens its own pool unless one is given."""
    owned_pool = pool is None
    pool = pool or ConnectionPool(database.app_conninfo, min_size=1, max_size=10, open=False)
    store = PostgresEventStore(pool)
    commands = IncidentCommands(store)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if owned_pool:
            pool.open(wait=True)
        try:
            yield
        finally:
            if owned_pool:
                pool.close()

    app = FastAPI(
        title="CivicPulse",
        summary="An append-only incident ledger with SLA tracking",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_problem_handlers(app)
    app.state.commands = commands
    app.state.pool = pool

    @app.get("/health", tags=["operations"])
    def health() -> dict[str, str]:
        with pool.connection() as conn:
            conn.execute("SELECT 1")
        return {"status": "ok"}

    @app.get("/status", tags=["operations"])
    def status() -> dict[str, Any]:
        """Report each projection's checkpoint and whether it has read the whole log."""
        with pool.connection() as conn:
            progress = projection_progress(conn)
        return {
            "projections": [
                {
                    "name": item.name,
                    "tx_id": item.checkpoint.tx_id,
                    "position": item.checkpoint.position,
                    "updated_at": item.updated_at,
                    "caught_up": item.caught_up,
                }
                for item in progress.values()
            ]
        }

    @app.post(
        TENANT + "/incidents",
        status_code=201,
        response_model=AppendOut,
        responses=COMMAND_RESPONSES,
        tags=["commands"],
    )
    def submit_report(
        tenant_id: TenantPath,
        report: ReportIn,
        request: Request,
        response: Response,
        service: Commands,
        principal: Annotated[Principal, allow(Reporter, Staff, action="submit reports")],
        idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    ) -> AppendOut:
        """Submit a report. Send an Idempotency-Key to make retries safe."""
        result = service.submit(
            tenant_id,
            report.model_dump(exclude_none=True),
            actor=actor_of(principal),
            idempotency_key=idempotency_key,
            correlation_id=_request_id(request),
        )
        response.headers["ETag"] = f'"{result.append.stream_version}"'
        response.headers["Location"] = f"/tenants/{tenant_id}/incidents/{result.incident_id}"
        if result.append.replayed:
            response.headers["Idempotent-Replayed"] = "true"
        return AppendOut(
            incident_id=result.incident_id,
            version=result.append.stream_version,
            replayed=result.append.replayed,
        )

    def add_command_route(name: str, body_type: type[BaseModel]) -> None:
        # Reporters answer the questions asked about their own reports; staff do the rest.
        roles = (Reporter, Staff) if name == "reporter-responded" else (Staff,)
        marker = allow(*roles, action=f"run the {name} command")

        # A command whose arguments are all optional may be sent without a body.
        optional = not any(field.is_required() for field in body_type.model_fields.values())
        body_annotation: Any = body_type | None if optional else body_type
        # Body(...) marks a required body. It is written as a default only so that the body
        # can come after the other parameters.
        body_default: Any = Body(default=None) if optional else Body(...)

        def run_command(
            tenant_id: TenantPath,
            incident_id: UUID,
            request: Request,
            response: Response,
            service: Commands,
            principal: Annotated[Principal, marker],
            if_match: Annotated[str | None, Header()] = None,
            idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
            body: body_annotation = body_default,
        ) -> AppendOut:
            args = body.model_dump(mode="json", exclude_none=True) if body is not None else {}
            if principal.role == Reporter:
                _require_own(service.load(tenant_id, incident_id), principal, incident_id)
            result = service.execute(
                tenant_id,
                incident_id,
                name,
                args,
                actor=actor_of(principal),
                expected_version=parse_if_match(if_match),
                idempotency_key=idempotency_key,
                correlation_id=_request_id(request),
            )
            response.headers["ETag"] = f'"{result.append.stream_version}"'
            if result.append.replayed:
                response.headers["Idempotent-Replayed"] = "true"
            return AppendOut(
                incident_id=incident_id,
                version=result.append.stream_version,
                replayed=result.append.replayed,
            )

        run_command.__name__ = name.replace("-", "_")
        run_command.__doc__ = (
            f"Run the {name} command. Send If-Match with the incident's ETag to make sure "
            "no one changed it since you read it; a stale version answers 409."
        )
        app.add_api_route(
            TENANT + f"/incidents/{{incident_id}}/{name}",
            run_command,
            methods=["POST"],
            response_model=AppendOut,
            responses=COMMAND_RESPONSES,
            tags=["commands"],
        )

    for command_name, body_model in COMMAND_BODIES.items():
        add_command_route(command_name, body_model)

    @app.get(TENANT + "/incidents/{incident_id}", responses=PROBLEM_RESPONSES, tags=["queries"])
    def get_incident(
        tenant_id: TenantPath,
        incident_id: UUID,
        response: Response,
        service: Commands,
        principal: Annotated[Principal, allow(Reporter, Staff, Officer, action="read incidents")],
    ) -> dict[str, Any]:
        """Return the incident's current state, folded from its stream (never stale).

        Reporters see only the incidents their own key submitted."""
        state = service.load(tenant_id, incident_id)
        if principal.role == Reporter:
            _require_own(state, principal, incident_id)
        response.headers["ETag"] = f'"{state.version}"'
        return {"tenant_id": tenant_id, **_state_dict(state)}

    @app.get(
        TENANT + "/incidents/{incident_id}/events", responses=PROBLEM_RESPONSES, tags=["queries"]
    )
    def get_incident_events(
        tenant_id: TenantPath,
        incident_id: UUID,
        service: Commands,
        _: Annotated[Principal, allow(Staff, Officer, action="read incident histories")],
    ) -> list[dict[str, Any]]:
        """Return the incident's event history in stream order."""
        service.load(tenant_id, incident_id)
        events = store.read_stream(tenant_id, incident_stream_id(incident_id))
        return [
            {
                "position": event.position,
                "stream_version": event.stream_version,
                "event_id": str(event.event_id),
                "event_type": event.event_type,
                "schema_version": event.schema_version,
                "occurred_at": event.occurred_at,
                "recorded_at": event.recorded_at,
                "payload": event.payload,
                "metadata": {k: v for k, v in event.metadata.items() if k != "request_hash"},
                "hash": event.hash.hex(),
            }
            for event in events
        ]

    @app.get(
        TENANT + "/sla/summary",
        response_model=SlaSummaryOut,
        responses=PROBLEM_RESPONSES,
        tags=["queries"],
    )
    def get_sla_summary(
        tenant_id: TenantPath,
        _: Annotated[Principal, allow(Staff, Officer, Admin, action="read SLA figures")],
        as_of: Annotated[
            str | None,
            Query(
                description="Valid time to judge at (ISO 8601); without an offset it is read "
                "in the tenant's time zone. Defaults to now."
            ),
        ] = None,
    ) -> SlaSummaryOut:
        """Count incidents and breaches of their resolution targets, by type and department."""
        tenant = require_tenant(store, tenant_id)
        moment = parse_as_of(as_of, tenant.time_zone)
        with pool.connection() as conn, consistent_snapshot(conn):
            summary = sla_summary(conn, tenant_id, moment)
            progress = projection_progress(conn).get("sla")
        totals = SlaCounts()
        for counts in summary["category"].values():
            totals += counts
        return SlaSummaryOut(
            tenant_id=tenant_id,
            as_of=moment,
            caught_up=progress.caught_up if progress else False,
            projected_position=progress.checkpoint.position if progress else 0,
            totals=_counts_out(None, totals),
            by_category=[_counts_out(k, v) for k, v in _sorted(summary["category"])],
            by_department=[_counts_out(k, v) for k, v in _sorted(summary["department"])],
        )

    @app.get(
        TENANT + "/keys", response_model=list[KeyOut], responses=PROBLEM_RESPONSES, tags=["keys"]
    )
    def get_keys(
        tenant_id: TenantPath,
        _: Annotated[Principal, allow(Admin, action="manage API keys")],
    ) -> list[KeyOut]:
        """List the tenant's API keys, revoked and expired ones included, without secrets."""
        return [KeyOut(**key.to_json()) for key in list_keys(store, tenant_id)]

    @app.post(
        TENANT + "/keys",
        status_code=201,
        response_model=IssuedKeyOut,
        responses=PROBLEM_RESPONSES,
        tags=["keys"],
    )
    def post_key(
        tenant_id: TenantPath,
        key_in: KeyIn,
        principal: Annotated[Principal, allow(Admin, action="manage API keys")],
    ) -> IssuedKeyOut:
        """Issue a key. Its token is in this response only: store it now."""
        key, token = issue_key(
            store,
            tenant_id,
            role=key_in.role,
            name=key_in.name,
            expires_at=key_in.expires_at,
            issued_by=f"key:{principal.key_id}",
        )
        return IssuedKeyOut(**key.to_json(), token=token)

    @app.post(
        TENANT + "/keys/{key_id}/revoke",
        response_model=KeyOut,
        responses=PROBLEM_RESPONSES,
        tags=["keys"],
    )
    def post_key_revoke(
        tenant_id: TenantPath,
        key_id: UUID,
        principal: Annotated[Principal, allow(Admin, action="manage API keys")],
        revoke_in: Annotated[RevokeIn | None, Body()] = None,
    ) -> KeyOut:
        """Revoke a key at once. Revoking a revoked key changes nothing."""
        key = revoke_key(
            store,
            tenant_id,
            key_id,
            revoked_by=f"key:{principal.key_id}",
            reason=revoke_in.reason if revoke_in else None,
        )
        return KeyOut(**key.to_json())

    add_audit_routes(app, pool=pool, store=store, responses=PROBLEM_RESPONSES)
    document_roles(app)
    return app


def _require_own(state: Any, principal: Principal, incident_id: UUID) -> None:
    """Answer 404 when a reporter's key did not submit the incident."""
    if state.submitted_by != str(principal.key_id):
        raise IncidentNotFound(principal.tenant_id, str(incident_id))


def _sorted(groups: dict[str | None, SlaCounts]) -> list[tuple[str | None, SlaCounts]]:
    return sorted(groups.items(), key=lambda item: (-item[1].total, item[0] or ""))


def _state_dict(state: Any) -> dict[str, Any]:
    from dataclasses import asdict

    data = asdict(state)
    data.pop("resume_status", None)
    return data
