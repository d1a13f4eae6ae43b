"""The Open311 GeoReport v2 facade of each tenant, under /tenants/{tenant_id}/open311/v2/.

Services are the tenant's categories, service requests are its incidents as the incidents
read model contains them, and POST requests submits a report as the REST API does. Every
error is a GeoReport error list, `[{"code": 400, "description": "..."}]`, in the format
of the request's path (`.json` or `.xml`).
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at run time.

import logging
from datetime import UTC, datetime
from typing import Annotated, Any
from uuid import UUID

import psycopg
from fastapi import Depends, FastAPI, Form, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from api.auth import Allow, Credentials, actor_of
from api.open311_errors import RESPONSES, Open311Error, Open311Errors
from api.open311_format import (
    document_response,
    errors_document,
    request_entry,
    service_codes,
    service_entry,
    xml_bytes,
)
from api.open311_input import (
    MAX_REQUESTS,
    check_format,
    code_conditions,
    parse_ids,
    parse_time,
    report_from_form,
    request_window,
    split_values,
    status_conditions,
    unknown_code,
)
from ledger.commands import IncidentCommands
from ledger.database import set_tenant
from ledger.errors import AuthenticationFailed, IncidentNotFound, LedgerError
from ledger.keys import Principal, Role
from ledger.lifecycle import REPORT_SUBMITTED
from ledger.store import PostgresEventStore
from ledger.tenants import TenantConfig, require_tenant

logger = logging.getLogger(__name__)

PREFIX = "/tenants/{tenant_id}/open311/v2"
ANY_ROLE = (Role.REPORTER, Role.STAFF, Role.OFFICER, Role.ADMIN)


class Open311Allow(Allow):
    """Authenticate a GeoReport request by its `api_key` parameter or a bearer header.

    A key that is given but unusable gets 403, the spec's code for an invalid api_key.
    With `public_reads`, a request without a key passes as anonymous (None) when the
    tenant has published its Open311 reads.
    """

    def __init__(self, *roles: Role, action: str, public_reads: bool = False) -> None:
        super().__init__(*roles, action=action)
        self.public_reads = public_reads

    async def __call__(  # type: ignore[override]
        self, request: Request, credentials: Credentials
    ) -> Principal | None:
        token = request.query_params.get("api_key")
        if request.method == "POST":
            form = await request.form()
            # The route reads the field names too: GeoReport attributes come as attribute[code].
            request.state.open311_fields = list(form.keys())
            value = form.get("api_key")
            if token is None and isinstance(value, str):
                token = value
        if token:
            credentials = HTTPAuthorizationCredentials(scheme="Bearer", credentials=token)
        if credentials is None and self.public_reads:
            tenant = await run_in_threadpool(_published_tenant, request)
            if tenant is not None:
                return None
        try:
            principal: Principal = await Allow.__call__(self, request, credentials)
        except AuthenticationFailed as error:
            if credentials is None:
                raise
            raise Open311Error(403, f"invalid api_key: {error}") from error
        return principal


def _published_tenant(request: Request) -> TenantConfig | None:
    """Return the path's tenant when it serves Open311 reads without a key."""
    store: PostgresEventStore = request.app.state.commands.store
    tenant_id = request.path_params.get("tenant_id", "")
    try:
        tenant = require_tenant(store, tenant_id)
    except LedgerError:
        return None
    return tenant if tenant.open311_public_reads else None


def _allow(*roles: Role, action: str, public_reads: bool = False) -> Any:
    return Depends(Open311Allow(*roles, action=action, public_reads=public_reads))


ReadPrincipal = Annotated[
    Principal | None,
    _allow(*ANY_ROLE, action="read Open311 services and requests", public_reads=True),
]


_REQUEST_COLUMNS = """
    i.incident_id, i.status, i.category, i.department, i.description, i.address,
    i.latitude, i.longitude, i.submitted_at, i.updated_at, i.rejection_reason,
    i.redirect_to, i.closure_reason, i.duplicate_of, s.resolution_due_at
"""


def _select_requests(
    conn: psycopg.Connection[Any], tenant_id: str, conditions: list[str], params: list[Any]
) -> list[dict[str, Any]]:
    where = " AND ".join(["i.tenant_id = %s", *conditions])
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"""
            SELECT {_REQUEST_COLUMNS}
            FROM incidents i
            LEFT JOIN incident_sla s
              ON s.tenant_id = i.tenant_id AND s.incident_id = i.incident_id
            WHERE {where}
            ORDER BY i.submitted_at DESC, i.incident_id
            LIMIT {MAX_REQUESTS}
            """,
            [tenant_id, *params],
        )
        return cur.fetchall()


def add_open311_routes(
    app: FastAPI,
    *,
    pool: ConnectionPool[Any],
    commands: IncidentCommands,
) -> None:
    """Declare the GeoReport v2 endpoints on `app` and return their errors as error lists."""
    store = commands.store
    app.add_middleware(Open311Errors)

    @app.exception_handler(Open311Error)
    async def open311_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, Open311Error)
        response_format = "xml" if request.url.path.endswith(".xml") else "json"
        return document_response(
            "errors",
            errors_document(error.status, [str(error)]),
            response_format,
            status_code=error.status,
        )

    def tenant_codes(tenant_id: str) -> tuple[TenantConfig, dict[str, Any]]:
        tenant = require_tenant(store, tenant_id)
        return tenant, service_codes(tenant.categories)

    @app.get(PREFIX + "/services.{format}", responses=RESPONSES, tags=["open311"])
    def open311_services(tenant_id: str, format: str, _principal: ReadPrincipal) -> Response:
        """GeoReport GET services: the tenant's categories as services."""
        response_format = check_format(format)
        _, codes = tenant_codes(tenant_id)
        services = [service_entry(code, category) for code, category in codes.items()]
        return document_response("services", services, response_format)

    @app.get(PREFIX + "/services/{service_code}.{format}", responses=RESPONSES, tags=["open311"])
    def open311_service_definition(
        tenant_id: str, service_code: str, format: str, _principal: ReadPrincipal
    ) -> Response:
        """GeoReport GET service definition. No service takes attributes."""
        response_format = check_format(format)
        _, codes = tenant_codes(tenant_id)
        if service_code not in codes:
            raise Open311Error(404, unknown_code(service_code, codes))
        definition = {"service_code": service_code, "attributes": []}
        if response_format == "xml":
            return Response(
                xml_bytes("service_definition", definition), media_type="application/xml"
            )
        return document_response("definition", definition, response_format)

    @app.get(PREFIX + "/requests.{format}", responses=RESPONSES, tags=["open311"])
    def open311_requests(
        tenant_id: str,
        format: str,
        _principal: ReadPrincipal,
        service_request_id: str | None = None,
        service_code: str | None = None,
        start_date: str | None = None,
        end_date: str | None = None,
        status: str | None = None,
    ) -> Response:
        """GeoReport GET service requests, the most recent first, 1000 at most.

        `service_request_id` (comma separated) overrides every other filter. Without dates,
        the last 90 days are listed; a window may not span more than 90 days.
        """
        response_format = check_format(format)
        tenant, codes = tenant_codes(tenant_id)
        conditions: list[str] = []
        params: list[Any] = []
        if service_request_id is not None:
            conditions.append("i.incident_id = ANY(%s)")
            params.append(parse_ids(service_request_id))
        else:
            conditions.extend(code_conditions(split_values(service_code), codes, params))
            conditions.extend(status_conditions(split_values(status), params))
            start = parse_time("start_date", start_date, tenant.zone) if start_date else None
            end = parse_time("end_date", end_date, tenant.zone) if end_date else None
            low, high = request_window(start, end, datetime.now(UTC))
            conditions.append("i.submitted_at BETWEEN %s AND %s")
            params.extend([low, high])
        with pool.connection() as conn:
            set_tenant(conn, tenant_id)
            rows = _select_requests(conn, tenant_id, conditions, params)
        entries = [request_entry(row, codes) for row in rows]
        return document_response("requests", entries, response_format)

    @app.get(
        PREFIX + "/requests/{service_request_id}.{format}",
        responses=RESPONSES,
        tags=["open311"],
    )
    def open311_request(
        tenant_id: str, service_request_id: str, format: str, _principal: ReadPrincipal
    ) -> Response:
        """GeoReport GET service request: one request, as a list of one."""
        response_format = check_format(format)
        _, codes = tenant_codes(tenant_id)
        ids = parse_ids(service_request_id)
        if len(ids) != 1:
            raise Open311Error(400, "give one service_request_id in the path")
        incident_id = ids[0]
        with pool.connection() as conn:
            set_tenant(conn, tenant_id)
            rows = _select_requests(conn, tenant_id, ["i.incident_id = %s"], [incident_id])
        if not rows:
            # The projector may not have applied a request just submitted: fold its stream.
            rows = [_row_from_stream(commands, tenant_id, incident_id)]
        return document_response("requests", [request_entry(rows[0], codes)], response_format)

    @app.get(PREFIX + "/tokens/{token}.{format}", responses=RESPONSES, tags=["open311"])
    def open311_token(
        tenant_id: str, token: str, format: str, _principal: ReadPrincipal
    ) -> Response:
        """GeoReport GET request id from a token: the token POST requests returned."""
        response_format = check_format(format)
        require_tenant(store, tenant_id)
        try:
            event_id = UUID(token)
        except ValueError:
            raise Open311Error(
                404, f"token {token[:100]!r} not found: use the token POST requests returned"
            ) from None
        with pool.connection() as conn:
            set_tenant(conn, tenant_id)
            row = conn.execute(
                "SELECT payload->>'incident_id' FROM events "
                "WHERE tenant_id = %s AND event_id = %s AND event_type = %s",
                (tenant_id, event_id, REPORT_SUBMITTED),
            ).fetchone()
        if row is None:
            raise Open311Error(404, f"token {token!r} not found in tenant {tenant_id!r}")
        entry = {"token": token, "service_request_id": row[0]}
        return document_response("requests", [entry], response_format)

    @app.post(PREFIX + "/requests.{format}", status_code=201, responses=RESPONSES, tags=["open311"])
    def open311_post_request(
        tenant_id: str,
        format: str,
        request: Request,
        principal: Annotated[
            Principal | None,
            _allow(Role.REPORTER, Role.STAFF, action="submit Open311 service requests"),
        ],
        # device_id, account_id and address_id are accepted and dropped: the first two
        # identify the reporter's device or account, where erasure could not reach them.
        service_code: Annotated[str | None, Form()] = None,
        description: Annotated[str | None, Form()] = None,
        lat: Annotated[str | None, Form()] = None,
        long: Annotated[str | None, Form()] = None,
        address_string: Annotated[str | None, Form()] = None,
        email: Annotated[str | None, Form()] = None,
        first_name: Annotated[str | None, Form()] = None,
        last_name: Annotated[str | None, Form()] = None,
        phone: Annotated[str | None, Form()] = None,
        media_url: Annotated[str | None, Form()] = None,
        api_key: Annotated[str | None, Form(description="The tenant API key")] = None,
        jurisdiction_id: Annotated[
            str | None, Form(description="Accepted and ignored: the path names the tenant")
        ] = None,
        idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    ) -> Response:
        """GeoReport POST service request: submit a report (form-encoded).

        The reporter's name, e-mail and phone are stored encrypted, as the REST API stores
        them. Returns the new request's id and a token for GET tokens."""
        response_format = check_format(format)
        assert principal is not None  # submitting never passes without a key
        _, codes = tenant_codes(tenant_id)
        attributes = [name for name in getattr(request.state, "open311_fields", []) if "[" in name]
        if attributes:
            raise Open311Error(
                400,
                f"service {service_code!r} takes no attributes: remove {attributes[0][:100]}",
            )
        report, reporter = report_from_form(
            codes,
            service_code=service_code,
            description=description,
            lat=lat,
            long=long,
            address_string=address_string,
            media_url=media_url,
            reporter={
                "name": " ".join(part for part in (first_name, last_name) if part) or None,
                "email": email,
                "phone": phone,
            },
        )
        result = commands.submit(
            tenant_id,
            report,
            reporter=reporter,
            actor=actor_of(principal),
            idempotency_key=idempotency_key,
            correlation_id=getattr(request.state, "request_id", None),
        )
        with pool.connection() as conn:
            set_tenant(conn, tenant_id)
            token = conn.execute(
                "SELECT event_id FROM events WHERE tenant_id = %s AND position = %s",
                (tenant_id, result.append.positions[0]),
            ).fetchone()
        entry = {
            "service_request_id": str(result.incident_id),
            "token": str(token[0]) if token else None,
            "service_notice": None,
            "account_id": None,
        }
        return document_response("requests", [entry], response_format, status_code=201)


def _row_from_stream(
    commands: IncidentCommands, tenant_id: str, incident_id: UUID
) -> dict[str, Any]:
    try:
        state = commands.load(tenant_id, incident_id)
    except IncidentNotFound:
        raise Open311Error(
            404, f"service request {incident_id} not found in tenant {tenant_id!r}"
        ) from None
    row = {field: getattr(state, field) for field in state.__dataclass_fields__}
    row["resolution_due_at"] = None
    return row
