"""The FastAPI application: command, query and SLA endpoints."""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at run
# time, including the body types chosen per command in a loop.

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from uuid import UUID

import psycopg
from fastapi import Body, Depends, FastAPI, Header, Query, Request, Response
from fastapi.responses import PlainTextResponse
from psycopg_pool import AsyncConnectionPool, ConnectionPool
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from api.audit import add_audit_routes
from api.auth import actor_of, allow, document_roles
from api.config_routes import add_config_routes
from api.dashboards import add_dashboard_routes
from api.grouping import add_grouping_routes
from api.observability import RequestContext, new_request_id, readiness_checks
from api.open311 import add_open311_routes
from api.problems import install_problem_handlers
from api.trends import add_trends_routes
from api.what_if import add_what_if_routes
from ledger.audit import parse_time
from ledger.commands import IncidentCommands
from ledger.database import Database, checked_async_pool, checked_pool, set_tenant
from ledger.errors import (
    ContactNotGiven,
    Forbidden,
    IncidentNotFound,
    InvalidRequest,
    NotProjectedYet,
)
from ledger.group_commit import GroupCommitter
from ledger.ids import incident_stream_id
from ledger.keys import KeyCache, Principal, Role, issue_key, list_keys, revoke_key
from ledger.lifecycle import COMMANDS
from ledger.metrics import PROJECTION_LAG, metrics_text
from ledger.personal import erase_reporter, record_contact_access
from ledger.seals import latest_seal
from ledger.store import PostgresEventStore
from ledger.tenants import cache_tenant_configs, require_tenant
from ledger.verification import verify_on
from projections.runtime import projection_progress, projection_status
from projections.sla import (
    SlaState,
    first_response_breached,
    resolution_breached,
    sla_projection,
)
from projections.sla_queries import (
    SlaCounts,
    consistent_snapshot,
    sla_summary,
    sla_summary_known_at,
    summarize_states,
)
from replay.time_travel import incident_at, replay

logger = logging.getLogger(__name__)

TENANT = "/tenants/{tenant_id}"
# Largest request body accepted; larger ones get 413. Reports are a few KiB at most.
MAX_BODY_BYTES = 64 * 1024
# Threads of the event loop's executor, as many as FastAPI's own thread pool has.
EXECUTOR_THREADS = 40
# Connections of each API process for checks of cached keys on the event loop, beside the
# pool of `pool_size`. A check keeps one for a single round trip. In a thread, a check
# handed the interpreter lock back and forth with the group commit thread. A perf profile
# of the server at 900 reports/s put a quarter of its CPU time in the kernel's thread
# switches, most of them waits for that lock.
KEY_POOL_SIZE = 4
TenantPath = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{1,62}$")]


# Personal data outside the `reporter` object, where it would be stored in plain text.
PERSONAL_FIELDS = frozenset(
    {"name", "email", "phone", "reporter_name", "reporter_email", "reporter_phone", "contact"}
)


class ReporterIn(BaseModel):
    """The reporter's contact details, stored encrypted under a key that erasure destroys."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    name: str | None = Field(default=None, min_length=1, max_length=200)
    email: str | None = Field(default=None, min_length=3, max_length=254)
    phone: str | None = Field(default=None, min_length=3, max_length=32)


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

    description: str = Field(min_length=1, max_length=4000)
    title: str | None = Field(default=None, max_length=200)
    category: str | None = Field(default=None, max_length=200)
    address: str | None = Field(default=None, max_length=500)
    latitude: float | None = Field(default=None, ge=-90, le=90, allow_inf_nan=False)
    longitude: float | None = Field(default=None, ge=-180, le=180, allow_inf_nan=False)
    source_channel: str = Field(default="api", max_length=50)
    area: str | None = Field(
        default=None,
        max_length=200,
        description="The neighbourhood, ward or district, as the tenant's routing rules and "
        "the trends by area name it.",
    )
    severity: Literal["low", "medium", "high", "critical"] | None = Field(
        default=None,
        description="Staff only: the severity that SLA policies match on. Without it, the "
        "classifier sets one.",
    )
    department: str | None = Field(
        default=None,
        max_length=200,
        description="Staff only: the responsible department, which routing rules then "
        "leave as it is.",
    )
    reporter: ReporterIn | None = Field(
        default=None,
        description="Contact details of the reporter, encrypted at rest; shown to staff, to "
        "officers with a recorded reason, and never in public views.",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_personal_data(cls, data: Any) -> Any:
        # Events are never deleted, so personal data may enter them only encrypted, under a
        # key that erasure destroys: through the `reporter` object.
        if isinstance(data, dict):
            personal = sorted(PERSONAL_FIELDS & set(data))
            if personal:
                raise PydanticCustomError(
                    "personal_data",
                    "personal data ({fields}) outside the reporter object would be stored "
                    "in plain text; send it as reporter.name, reporter.email or reporter.phone",
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


class ReclassifyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    category: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="One of the tenant's categories, when it has configured any.",
    )
    severity: Literal["low", "medium", "high", "critical"] | None = None


class EmptyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MergeGroupIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    with_incident: UUID = Field(
        description="Another incident whose duplicate group joins this incident's group."
    )


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
    "reclassify": ReclassifyIn,
    "merge-group": MergeGroupIn,
    "split-group": EmptyIn,
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
    as_of: datetime = Field(description="Valid time the incidents were judged at.")
    known_at: datetime | None = Field(
        default=None,
        description="Transaction time: only events recorded by then were counted, as a fold "
        "of those events from the log would count them.",
    )
    snapshot_id: int | None = Field(
        default=None,
        description="Snapshot the fold started from, when known_at is set and the tenant was "
        "folded from the log from a snapshot; null when the read model answered.",
    )
    caught_up: bool = Field(
        description="False while the projector is still applying events: the figures are "
        "then partial. GET /status shows its progress. Always true with known_at, whose "
        "figures come from the log itself."
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


async def get_commands(request: Request) -> IncidentCommands:
    commands: IncidentCommands = request.app.state.commands
    return commands


Commands = Annotated[IncidentCommands, Depends(get_commands)]

_ETAG = re.compile(r'^\s*(W/)?"?(\d{1,20})"?\s*$')
MAX_VERSION = 2**31 - 1  # stream versions are PostgreSQL integers
IF_MATCH_PATTERN = r'^(\*|"?[1-9][0-9]{0,8}"?)$'  # up to 999,999,999, below MAX_VERSION


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


AsOfQuery = Annotated[
    str | None,
    Query(
        description="Valid time (RFC 3339): the state of the world at that moment, from the "
        "events that had happened by then. Without an offset it is read in the tenant's time "
        "zone. Defaults to now.",
        json_schema_extra={"format": "date-time"},
    ),
]
KnownAtQuery = Annotated[
    str | None,
    Query(
        description="Transaction time (RFC 3339): count only the events the ledger had "
        "recorded by then. Without an offset it is read in the tenant's time zone. Defaults "
        "to everything recorded.",
        json_schema_extra={"format": "date-time"},
    ),
]


def parse_as_of(value: str | None, zone_name: str, name: str = "as_of") -> datetime:
    """Read an ISO 8601 time; a time without an offset is read in the tenant's time zone.

    `name` is the parameter or option that the error message names.
    """
    from zoneinfo import ZoneInfo

    if value is None:
        return datetime.now(UTC)
    # An unescaped "+" in a query string arrives as a space: "...05:00:00 00:00".
    date_and_time, _, offset = value.partition(" ")
    if "T" in date_and_time and offset[:2].isdigit() and " " not in offset:
        value = value.replace(" ", "+")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as error:
        raise InvalidRequest(
            f"invalid {name} {value!r}: use ISO 8601, such as 2016-01-13T00:00 or "
            "2016-01-13T05:00:00Z"
        ) from error
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=ZoneInfo(zone_name))
    return moment


class ContactOut(BaseModel):
    reporter_id: UUID
    erased: bool
    erased_at: datetime | None = None
    name: str | None = None
    email: str | None = None
    phone: str | None = None


class EraseIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(
        min_length=1,
        max_length=2000,
        description="Why, for the record. It is kept for good: write no personal data in it.",
    )


class ErasureOut(BaseModel):
    reporter_id: UUID
    erased_at: datetime
    already_erased: bool


class SealOut(BaseModel):
    stream_version: int
    position: int
    event_count: int
    merkle_root: str = Field(description="SHA-256 Merkle root (RFC 6962), hex")
    previous_root: str | None
    through_position: int


class MismatchOut(BaseModel):
    message: str
    kind: str
    stream_id: str | None
    stream_version: int | None
    position: int | None
    event_id: UUID | None
    seal_version: int | None


class VerificationOut(BaseModel):
    ok: bool
    streams: int
    events: int
    seals: int
    unsealed_events: int
    latest_seal: SealOut | None
    mismatches: list[MismatchOut]
    truncated: bool = Field(description="True when checking stopped at 100 mismatches")


def _seal_out(seal: Any) -> SealOut:
    return SealOut(
        stream_version=seal.stream_version,
        position=seal.position,
        event_count=seal.event_count,
        merkle_root=seal.merkle_root.hex(),
        previous_root=seal.previous_root.hex() if seal.previous_root else None,
        through_position=seal.through.position,
    )


def _mismatch_fields(item: Any) -> dict[str, Any]:
    return {
        "kind": str(item.kind),
        "stream_id": item.stream_id,
        "stream_version": item.stream_version,
        "position": item.position,
        "event_id": item.event_id,
        "seal_version": item.seal_version,
    }


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
    """Return the id RequestContext gave the request; it becomes the correlation id."""
    request_id: str = getattr(request.state, "request_id", None) or new_request_id()
    return request_id


def create_app(
    database: Database,
    *,
    pool: ConnectionPool[Any] | None = None,
    max_lag: int = 10_000,
    group_commit: bool = True,
    group_commit_workers: int = 1,
    pool_size: int = 10,
) -> FastAPI:
    """Build the API over `database`. The app opens its own pool of `pool_size` connections
    unless one is given.

    `max_lag` is the number of events a projection may be behind before GET /ready fails.
    With `group_commit`, appends of concurrent requests are committed together in batches
    (ledger.group_commit) by `group_commit_workers` threads, and each request is answered
    once its own batch committed.
    """
    owned_pool = pool is None
    # A checked pool replaces the connections a database restart closed.
    pool = pool or checked_pool(database.app_conninfo, min_size=1, max_size=pool_size, name="api")
    committer = (
        GroupCommitter(pool, workers=group_commit_workers, name="api-group-commit")
        if group_commit
        else None
    )
    store = PostgresEventStore(pool, committer=committer)
    # Each request still reads the versions of the key's and the tenant's streams, so a
    # revoked key and a configuration change take effect on the next request.
    cache_tenant_configs(store)
    commands = IncidentCommands(store)

    # The pools of key checks, one per event loop that runs the app's lifespan, because an
    # async pool belongs to the loop that opened it. uvicorn runs one loop per process, but
    # test clients may run several, one after the other or at once.
    key_pools: dict[asyncio.AbstractEventLoop, AsyncConnectionPool[Any]] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Key checks and the submits that read first run in the loop's own executor, and a
        # submit keeps its thread until its batch commits. With asyncio's default (the CPU
        # count plus 4 threads), a dozen waiting submits held up every other key check.
        executor = ThreadPoolExecutor(max_workers=EXECUTOR_THREADS, thread_name_prefix="api")
        loop = asyncio.get_running_loop()
        loop.set_default_executor(executor)
        if owned_pool:
            pool.open(wait=True)
        key_pool = checked_async_pool(
            database.app_conninfo, min_size=1, max_size=KEY_POOL_SIZE, name="api-keys"
        )
        await key_pool.open(wait=True)
        key_pools[loop] = key_pool
        try:
            yield
        finally:
            del key_pools[loop]
            if committer is not None:
                committer.stop()
            await key_pool.close()
            if owned_pool:
                pool.close()
            executor.shutdown(wait=False)

    app = FastAPI(
        title="CivicPulse",
        summary="An append-only incident ledger with SLA tracking",
        version="0.1.0",
        lifespan=lifespan,
        # The API has metrics (/metrics) and access logs of its own. FastAPI's OpenTelemetry
        # hooks (on by default in FastAPI 0.165) look up the global providers on every
        # request, about 3% of the server's CPU time per report in a py-spy profile, and
        # record nothing while no provider is configured.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    install_problem_handlers(app)
    app.state.commands = commands
    app.state.pool = pool
    app.state.keys = KeyCache()
    app.state.key_pools = key_pools

    app.add_middleware(RequestContext, max_body_bytes=MAX_BODY_BYTES)

    @app.get("/health", tags=["operations"])
    def health() -> dict[str, str]:
        """Liveness: the process responds. It does not touch the database, so a database
        outage makes the API unready (GET /ready) without getting it restarted."""
        return {"status": "ok"}

    @app.get(
        "/ready",
        tags=["operations"],
        responses={503: {"description": "Not ready; `checks` names the failing checks"}},
    )
    def ready(response: Response) -> dict[str, Any]:
        """Readiness: the database responds, its schema is current and no projection is more
        than CIVICPULSE_READY_MAX_LAG_EVENTS events behind."""
        checks = readiness_checks(pool, max_lag)
        ok = all(check["ok"] for check in checks.values())
        if not ok:
            response.status_code = 503
        return {"status": "ready" if ok else "not ready", "checks": checks}

    @app.get("/metrics", tags=["operations"], response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        """Prometheus metrics of this process, with projection lag measured now."""
        try:
            with pool.connection() as conn:
                for name, item in projection_progress(conn).items():
                    PROJECTION_LAG.labels(name).set(item.events_behind)
        except psycopg.Error as error:
            logger.warning("could not measure projection lag for /metrics: %s", error)
        body, content_type = metrics_text()
        return PlainTextResponse(body, media_type=content_type)

    @app.get("/status", tags=["operations"])
    def status() -> dict[str, Any]:
        """Report each projection's checkpoint, lag and last error, and the classifier pools."""
        with pool.connection() as conn:
            progress = projection_status(conn)
            classifiers = conn.execute(
                """
                SELECT pool_id, classifier, state, reason, paused_until, started_at, updated_at,
                       updated_at > now() - interval '1 minute' AS current
                FROM classifier_pools
                WHERE state <> 'exited' AND updated_at > now() - interval '1 day'
                ORDER BY started_at
                """
            ).fetchall()
        return {
            # Pools write their state every few seconds while they run; one that has not
            # written for a minute is shown with current = false (its process may be gone).
            "classifier_pools": [
                dict(
                    zip(
                        (
                            "pool_id",
                            "classifier",
                            "state",
                            "reason",
                            "paused_until",
                            "started_at",
                            "updated_at",
                            "current",
                        ),
                        row,
                        strict=True,
                    )
                )
                for row in classifiers
            ],
            "projections": [
                {
                    "name": item.name,
                    "tx_id": item.checkpoint.tx_id,
                    "position": item.checkpoint.position,
                    "updated_at": item.updated_at,
                    "caught_up": item.events_behind == 0,
                    "events_behind": item.events_behind,
                    "lag_seconds": item.lag_seconds,
                    "last_error": item.last_error,
                    "last_error_at": item.last_error_at,
                    # None: no running projector owns it, so nothing applies its events.
                    "owner": item.owner,
                }
                for item in progress
            ],
        }

    @app.post(
        TENANT + "/incidents",
        status_code=201,
        response_model=AppendOut,
        responses=COMMAND_RESPONSES,
        tags=["commands"],
    )
    async def submit_report(
        tenant_id: TenantPath,
        report: ReportIn,
        request: Request,
        response: Response,
        service: Commands,
        principal: Annotated[Principal, allow(Reporter, Staff, action="submit reports")],
        idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    ) -> AppendOut:
        """Submit a report. Send an Idempotency-Key to make retries safe."""
        if principal.role == Reporter:
            # Staff decide the severity the SLA judges a report by and the department responsible.
            staff_fields = [name for name in ("severity", "department") if getattr(report, name)]
            if staff_fields:
                raise Forbidden(
                    principal.role.value,
                    [Staff.value],
                    f"set {' or '.join(staff_fields)} on a report; leave "
                    f"{'them' if len(staff_fields) > 1 else 'it'} out",
                )
        result = await service.submit_async(
            tenant_id,
            report.model_dump(exclude_none=True, exclude={"reporter"}),
            reporter=report.reporter.model_dump(exclude_none=True) if report.reporter else None,
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
            if_match: Annotated[
                str | None,
                Header(
                    description='The ETag GET returned, such as "3"; a stale one gets 409',
                    # Documented, not enforced here: parse_if_match explains what is wrong
                    # with a value better than a pattern mismatch would.
                    json_schema_extra={"pattern": IF_MATCH_PATTERN},
                ),
            ] = None,
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
        as_of: AsOfQuery = None,
        known_at: KnownAtQuery = None,
    ) -> dict[str, Any]:
        """Return the incident's current state, folded from its stream (never stale), or its
        state at a past valid time and as known at a past transaction time.

        Reporters see only the incidents their own key submitted. The ETag, the version to
        send with a command, comes with the current state only."""
        if as_of is None and known_at is None:
            state = service.load(tenant_id, incident_id)
        else:
            zone = require_tenant(store, tenant_id).time_zone
            with pool.connection() as conn:
                state = incident_at(
                    conn,
                    tenant_id,
                    incident_id,
                    as_of=parse_time("as_of", as_of, zone),
                    known_at=parse_time("known_at", known_at, zone),
                )
        if principal.role == Reporter:
            _require_own(state, principal, incident_id)
        data = _state_dict(state)
        if principal.role == Reporter:
            data.pop("reporter_id")
        if as_of is None and known_at is None:
            response.headers["ETag"] = f'"{state.version}"'
        return {"tenant_id": tenant_id, **data}

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
                "payload": _without_ciphertext(event.payload),
                "metadata": {k: v for k, v in event.metadata.items() if k != "request_hash"},
                "hash": event.hash.hex(),
            }
            for event in events
        ]

    @app.get(
        TENANT + "/incidents/{incident_id}/sla",
        responses={
            **PROBLEM_RESPONSES,
            503: _problem_response("The projector has not applied the report yet"),
        },
        tags=["queries"],
    )
    def get_incident_sla(
        tenant_id: TenantPath,
        incident_id: UUID,
        service: Commands,
        _: Annotated[Principal, allow(Staff, Officer, action="read SLA records")],
    ) -> dict[str, Any]:
        """Return the incident's row of the SLA model: the policy and configuration version
        that judge it, due and warning times, pauses and escalations, and whether it is
        breached now."""
        projection = sla_projection()
        with pool.connection() as conn, conn.transaction():
            set_tenant(conn, tenant_id)
            progress = projection_progress(conn).get("sla")
            found = projection.load(conn, {(tenant_id, incident_stream_id(incident_id))})
        if not found:
            # Only a missing row costs the fold that tells an unknown incident from one the
            # projector has not reached.
            service.load(tenant_id, incident_id)  # raises IncidentNotFound
            raise NotProjectedYet("SLA", f"incident {incident_id}")
        (state,) = found.values()
        now = datetime.now(UTC)
        return {
            "tenant_id": tenant_id,
            **asdict(state),
            "judged_at": now,
            "resolution_breached": resolution_breached(state, now),
            "first_response_breached": first_response_breached(state, now),
            "caught_up": progress.caught_up if progress else False,
        }

    @app.get(
        TENANT + "/sla/summary",
        response_model=SlaSummaryOut,
        responses=PROBLEM_RESPONSES,
        tags=["queries"],
    )
    def get_sla_summary(
        tenant_id: TenantPath,
        _: Annotated[Principal, allow(Staff, Officer, Admin, action="read SLA figures")],
        as_of: AsOfQuery = None,
        known_at: KnownAtQuery = None,
    ) -> SlaSummaryOut:
        """Count incidents and breaches of their resolution targets, by type and department.

        Without `known_at` the figures come from the SLA read model. With it they are those
        of the events recorded by then, judged at `as_of`, or else at `known_at`: the read
        model's rows that were known by then, and the other incidents folded again from the
        log (the whole tenant, from a snapshot, when a configuration change prevents this)."""
        tenant = require_tenant(store, tenant_id)
        known = parse_time("known_at", known_at, tenant.time_zone)
        moment = parse_time("as_of", as_of, tenant.time_zone)
        snapshot_id = None
        with pool.connection() as conn, consistent_snapshot(conn):
            progress = projection_progress(conn).get("sla")
            if known is None:
                moment = moment or datetime.now(UTC)
                summary = sla_summary(conn, tenant_id, moment)
            else:
                known_summary = sla_summary_known_at(conn, tenant_id, known, moment)
                if known_summary is None:
                    replayed = replay(
                        conn, sla_projection(), tenant_id, as_of=moment, known_at=known
                    )
                    states: list[SlaState] = list(replayed.states.values())
                    known_summary = summarize_states(states, moment or known)
                    snapshot_id = replayed.snapshot_id
                summary = known_summary
                moment = moment or known
        totals = SlaCounts()
        for counts in summary["category"].values():
            totals += counts
        return SlaSummaryOut(
            tenant_id=tenant_id,
            as_of=moment,
            known_at=known,
            snapshot_id=snapshot_id,
            caught_up=known is not None or (progress.caught_up if progress else False),
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
            issued_by=principal.name,
            issuer_key_id=principal.key_id,
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
            revoked_by=principal.name,
            revoker_key_id=principal.key_id,
            reason=revoke_in.reason if revoke_in else None,
        )
        return KeyOut(**key.to_json())

    @app.get(
        TENANT + "/incidents/{incident_id}/contact",
        response_model=ContactOut,
        responses=PROBLEM_RESPONSES,
        tags=["personal data"],
    )
    def get_contact(
        tenant_id: TenantPath,
        incident_id: UUID,
        service: Commands,
        principal: Annotated[
            Principal, allow(Staff, Officer, action="read reporters' contact details")
        ],
        reason: Annotated[
            str | None,
            Query(
                max_length=2000,
                description="Why you need the details. Required for officers, and recorded "
                "as a ContactDetailsAccessed event before the details are returned.",
            ),
        ] = None,
    ) -> ContactOut:
        """Return the reporter's contact details, decrypted, or marked erased."""
        state = service.load(tenant_id, incident_id)
        if state.reporter_id is None:
            raise ContactNotGiven(tenant_id, str(incident_id))
        if principal.role == Officer:
            if not reason or not reason.strip():
                raise InvalidRequest(
                    "missing reason: officers must say why they need a reporter's contact "
                    "details, as ?reason=...; the access is recorded"
                )
            record_contact_access(
                store,
                tenant_id,
                incident_id,
                state.reporter_id,
                reason=reason,
                actor=actor_of(principal),
            )
        details = service.contact_details(tenant_id, incident_id)
        assert details is not None
        return ContactOut(**details.as_dict())

    @app.post(
        TENANT + "/reporters/{reporter_id}/erase",
        response_model=ErasureOut,
        responses=PROBLEM_RESPONSES,
        tags=["personal data"],
    )
    def post_erase_reporter(
        tenant_id: TenantPath,
        reporter_id: UUID,
        erase_in: EraseIn,
        principal: Annotated[Principal, allow(Admin, action="erase reporters")],
    ) -> ErasureOut:
        """Destroy the reporter's key: every event stays, and their contact details read
        back as erased from then on. Erasing an erased reporter changes nothing."""
        erasure = erase_reporter(
            store, tenant_id, reporter_id, reason=erase_in.reason, actor=actor_of(principal)
        )
        return ErasureOut(
            reporter_id=erasure.reporter_id,
            erased_at=erasure.erased_at,
            already_erased=erasure.already_erased,
        )

    @app.get(
        TENANT + "/seals/latest",
        response_model=SealOut | None,
        responses=PROBLEM_RESPONSES,
        tags=["audit"],
    )
    def get_latest_seal(
        tenant_id: TenantPath,
        _: Annotated[Principal, allow(Staff, Officer, Admin, action="read seals")],
    ) -> SealOut | None:
        """Return the tenant's latest seal, or null before the first. Copy its root out of
        the ledger: a root that later disappears from it proves a rewrite."""
        require_tenant(store, tenant_id)
        with pool.connection() as conn:
            set_tenant(conn, tenant_id)
            seal = latest_seal(conn, tenant_id)
        return _seal_out(seal) if seal else None

    @app.get(
        TENANT + "/verify",
        response_model=VerificationOut,
        responses=PROBLEM_RESPONSES,
        tags=["audit"],
    )
    def get_verify(
        tenant_id: TenantPath,
        _: Annotated[Principal, allow(Officer, Admin, action="verify the ledger")],
    ) -> VerificationOut:
        """Recompute every hash chain and seal of the tenant and name what does not match.

        It reads every event of the tenant, so it takes seconds for large tenants (about
        10 s for 222,000 events on a 2-vCPU machine)."""
        require_tenant(store, tenant_id)
        with pool.connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            set_tenant(conn, tenant_id)
            result = verify_on(conn, tenant_id)
        checked = result.tenants[0] if result.tenants else None
        return VerificationOut(
            ok=result.ok,
            streams=result.streams,
            events=result.events,
            seals=result.seals,
            unsealed_events=checked.unsealed_events if checked else 0,
            latest_seal=_seal_out(checked.latest_seal) if checked and checked.latest_seal else None,
            mismatches=[
                MismatchOut(message=str(item), **_mismatch_fields(item))
                for item in result.mismatches
            ],
            truncated=result.truncated,
        )

    add_audit_routes(app, pool=pool, store=store, responses=PROBLEM_RESPONSES)
    add_open311_routes(app, pool=pool, commands=commands)
    add_grouping_routes(app, pool=pool, store=store, responses=COMMAND_RESPONSES)
    add_config_routes(app, store=store, responses=PROBLEM_RESPONSES)
    add_trends_routes(app, pool=pool, store=store, responses=PROBLEM_RESPONSES)
    add_dashboard_routes(app, pool=pool, store=store, responses=PROBLEM_RESPONSES)
    add_what_if_routes(app, pool=pool, store=store, responses=PROBLEM_RESPONSES)
    document_roles(app)
    return app


def _require_own(state: Any, principal: Principal, incident_id: UUID) -> None:
    """Answer 404 when a reporter's key did not submit the incident."""
    if state.submitted_by != str(principal.key_id):
        raise IncidentNotFound(principal.tenant_id, str(incident_id))


def _sorted(groups: dict[str | None, SlaCounts]) -> list[tuple[str | None, SlaCounts]]:
    return sorted(groups.items(), key=lambda item: (-item[1].total, item[0] or ""))


def _state_dict(state: Any) -> dict[str, Any]:
    """Return the incident state for the API, without the contact ciphertext."""
    from dataclasses import asdict

    data = asdict(state)
    data.pop("resume_status", None)
    data.pop("contact", None)
    return data


def _without_ciphertext(payload: dict[str, Any]) -> dict[str, Any]:
    """Replace encrypted contact fields by their names: GET .../contact decrypts them."""
    contact = payload.get("contact")
    if not isinstance(contact, dict):
        return payload
    fields = sorted(contact.get("fields") or {})
    return {**payload, "contact": {"reporter_id": contact.get("reporter_id"), "fields": fields}}
