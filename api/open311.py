"""The Open311 GeoReport v2 facade of each tenant, under /tenants/{tenant_id}/open311/v2/.

Services are the tenant's categories, service requests are its incidents as the incidents
read model contains them, and POST requests submits a report as the REST API does. Every
error is a GeoReport error list, `[{"code": 400, "description": "..."}]`, in the format
of the request's path (`.json` or `.xml`).
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at run time.

import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from uuid import UUID
from zoneinfo import ZoneInfo

import psycopg
from fastapi import Depends, FastAPI, Form, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import Allow, Credentials, actor_of
from api.open311_format import (
    CATEGORY_SLUG_SQL,
    FORMATS,
    OPEN311_OPEN_STATUSES,
    document_response,
    errors_document,
    request_entry,
    service_codes,
    service_entry,
    xml_bytes,
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
# The GeoReport v2 limits on GET requests: a window of at most 90 days, 90 days back from
# now when no date is given, and at most 1000 requests, the most recent first.
MAX_WINDOW = timedelta(days=90)
MAX_REQUESTS = 1000
MAX_DESCRIPTION = 4000
ANY_ROLE = (Role.REPORTER, Role.STAFF, Role.OFFICER, Role.ADMIN)

# Fields of a GeoReport POST that would identify the reporter's device or account. The
# ledger has no place for them that erasure reaches, so they are accepted and dropped.
DROPPED_FIELDS = ("device_id", "account_id", "address_id")


_ERROR_LIST_SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"code": {"type": "integer"}, "description": {"type": "string"}},
        "required": ["code", "description"],
    },
}
_DOCUMENT: dict[str, Any] = {"application/json": {}, "application/xml": {}}
_ERRORS = {"application/json": {"schema": _ERROR_LIST_SCHEMA}, "application/xml": {}}
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The document, as JSON or GeoReport XML", "content": _DOCUMENT},
    400: {"description": "Invalid parameter: the description names it", "content": _ERRORS},
    401: {"description": "No api_key, and the tenant's reads are not public", "content": _ERRORS},
    403: {"description": "Invalid api_key, or its role may not do this", "content": _ERRORS},
    404: {"description": "Tenant, service, request or token not found", "content": _ERRORS},
    413: {"description": "Request body over 64 KiB", "content": _ERRORS},
    503: {"description": "Database unavailable: retry later", "content": _ERRORS},
}


class Open311Error(LedgerError):
    """An error returned as a GeoReport error list with the spec's status code."""

    def __init__(self, status: int, description: str) -> None:
        self.status = status
        super().__init__(description)


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
            principal: Principal = await run_in_threadpool(
                Allow.__call__, self, request, credentials
            )
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


def _format(value: str) -> str:
    if value not in FORMATS:
        raise Open311Error(404, f"unsupported format {value!r}: end the path with .json or .xml")
    return value


def _split(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def _parse_time(name: str, value: str, zone: ZoneInfo) -> datetime:
    """Read a W3C date and time; without an offset it is read in the tenant's time zone."""
    text = value.strip()
    # An unescaped "+" in a query string arrives as a space: "...T05:00:00 00:00".
    date_part, _, offset = text.partition(" ")
    if "T" in date_part and offset[:2].isdigit():
        text = f"{date_part}+{offset}"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as error:
        raise Open311Error(
            400, f"invalid {name} {value!r}: use the W3C form, such as 2024-05-01T00:00:00Z"
        ) from error
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=zone)


def request_window(
    start: datetime | None, end: datetime | None, now: datetime
) -> tuple[datetime, datetime]:
    """Return the [start, end] window of GET requests, at most 90 days long."""
    if start is None and end is None:
        return now - MAX_WINDOW, now
    if start is None:
        assert end is not None
        return end - MAX_WINDOW, end
    if end is None:
        return start, start + MAX_WINDOW
    if end < start:
        raise Open311Error(
            400, f"end_date {end.isoformat()} is before start_date {start.isoformat()}"
        )
    if end - start > MAX_WINDOW:
        raise Open311Error(
            400,
            f"start_date {start.isoformat()} to end_date {end.isoformat()} spans more than "
            "90 days: ask for 90 days at most, in several requests if needed",
        )
    return start, end


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


def _parse_ids(value: str) -> list[UUID]:
    ids = []
    for part in _split(value):
        try:
            ids.append(UUID(part))
        except ValueError:
            raise Open311Error(
                400,
                f"invalid service_request_id {part[:100]!r}: use the ids that POST requests "
                "and GET requests return",
            ) from None
    if len(ids) > MAX_REQUESTS:
        raise Open311Error(
            400, f"{len(ids)} service_request_id values: ask for {MAX_REQUESTS} at most"
        )
    return ids


def add_open311_routes(
    app: FastAPI,
    *,
    pool: ConnectionPool[Any],
    commands: IncidentCommands,
) -> None:
    """Declare the GeoReport v2 endpoints on `app` and answer their errors as error lists."""
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
        response_format = _format(format)
        _, codes = tenant_codes(tenant_id)
        services = [service_entry(code, category) for code, category in codes.items()]
        return document_response("services", services, response_format)

    @app.get(PREFIX + "/services/{service_code}.{format}", responses=RESPONSES, tags=["open311"])
    def open311_service_definition(
        tenant_id: str, service_code: str, format: str, _principal: ReadPrincipal
    ) -> Response:
        """GeoReport GET service definition. No service takes attributes."""
        response_format = _format(format)
        _, codes = tenant_codes(tenant_id)
        if service_code not in codes:
            raise Open311Error(404, _unknown_code(service_code, codes))
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
        response_format = _format(format)
        tenant, codes = tenant_codes(tenant_id)
        conditions: list[str] = []
        params: list[Any] = []
        if service_request_id is not None:
            conditions.append("i.incident_id = ANY(%s)")
            params.append(_parse_ids(service_request_id))
        else:
            conditions.extend(_code_conditions(_split(service_code), codes, params))
            conditions.extend(_status_conditions(_split(status), params))
            start = _parse_time("start_date", start_date, tenant.zone) if start_date else None
            end = _parse_time("end_date", end_date, tenant.zone) if end_date else None
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
        response_format = _format(format)
        _, codes = tenant_codes(tenant_id)
        ids = _parse_ids(service_request_id)
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
        response_format = _format(format)
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
        response_format = _format(format)
        assert principal is not None  # submitting never passes without a key
        _, codes = tenant_codes(tenant_id)
        attributes = [name for name in getattr(request.state, "open311_fields", []) if "[" in name]
        if attributes:
            raise Open311Error(
                400,
                f"service {service_code!r} takes no attributes: remove {attributes[0][:100]}",
            )
        report, reporter = _report_from_form(
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


def _unknown_code(code: str, codes: dict[str, Any]) -> str:
    known = ", ".join(codes) or "none: the tenant has no categories configured"
    return f"unknown service_code {code[:100]!r}; the tenant's service codes are {known}"


def _code_conditions(requested: list[str], codes: dict[str, Any], params: list[Any]) -> list[str]:
    if not requested:
        return []
    names = [codes[code].name for code in requested if code in codes]
    # Incidents may carry categories the configuration no longer lists (imports, renames):
    # those match by the slug of their name.
    params.extend([names, requested])
    return [
        f"(i.category = ANY(%s) OR {CATEGORY_SLUG_SQL.replace('category', 'i.category')} = ANY(%s))"
    ]


def _status_conditions(requested: list[str], params: list[Any]) -> list[str]:
    wanted = set(requested)
    unknown = sorted(wanted - {"open", "closed"})
    if unknown:
        raise Open311Error(400, f"invalid status {unknown[0][:100]!r}: use open or closed")
    if not wanted or wanted == {"open", "closed"}:
        return []
    params.append(sorted(OPEN311_OPEN_STATUSES))
    return ["i.status = ANY(%s)" if wanted == {"open"} else "NOT i.status = ANY(%s)"]


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


def _report_from_form(
    codes: dict[str, Any],
    *,
    service_code: str | None,
    description: str | None,
    lat: str | None,
    long: str | None,
    address_string: str | None,
    media_url: str | None,
    reporter: dict[str, str | None],
) -> tuple[dict[str, Any], dict[str, str] | None]:
    """Check a GeoReport POST and return the report and the reporter's contact details."""
    if not service_code:
        raise Open311Error(400, "missing service_code: use a code that GET services lists")
    if service_code not in codes:
        raise Open311Error(400, _unknown_code(service_code, codes))
    report: dict[str, Any] = {"category": codes[service_code].name, "source_channel": "open311"}
    if (lat is None) != (long is None):
        raise Open311Error(400, "lat and long go together: send both, or neither")
    if lat is not None and long is not None:
        report["latitude"] = _coordinate("lat", lat, 90)
        report["longitude"] = _coordinate("long", long, 180)
    if address_string and address_string.strip():
        report["address"] = _text("address_string", address_string, 500)
    if "latitude" not in report and "address" not in report:
        raise Open311Error(
            400, "missing location: send lat and long, or address_string, with the request"
        )
    if description and description.strip():
        report["description"] = _text("description", description, MAX_DESCRIPTION)
    if media_url and media_url.strip():
        url = _text("media_url", media_url, 2000)
        if not url.startswith(("https://", "http://")):
            raise Open311Error(400, f"invalid media_url {url[:100]!r}: use an http(s) URL")
        report["media_url"] = url
    contact = {key: _text(key, value, 254) for key, value in reporter.items() if value}
    return report, contact or None


def _text(name: str, value: str, limit: int) -> str:
    text = value.strip()
    if len(text) > limit:
        raise Open311Error(400, f"{name} is {len(text)} characters long: send {limit} at most")
    if "\x00" in text:
        raise Open311Error(400, f"invalid {name}: it contains a NUL character")
    return text


def _coordinate(name: str, value: str, limit: float) -> float:
    try:
        number = float(value)
    except ValueError:
        raise Open311Error(
            400, f"invalid {name} {value[:50]!r}: send a decimal number of degrees (WGS84)"
        ) from None
    if not -limit <= number <= limit:
        raise Open311Error(400, f"invalid {name} {value[:50]!r}: use -{limit} to {limit}")
    return number


class Open311Errors:
    """ASGI middleware: answer errors under an Open311 path as GeoReport error lists.

    Authentication, validation and database errors are problem-details documents
    elsewhere. Under PREFIX they become `[{"code", "description"}]` in the path's format,
    and 422 becomes the spec's 400.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if "/open311/v2/" not in path:
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def send_converted(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                if headers.get(b"content-type", b"").startswith(b"application/problem+json"):
                    start = message
                    return
                await send(message)
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            await _send_error_list(send, start, b"".join(chunks), path)

        await self.app(scope, receive, send_converted)


async def _send_error_list(send: Send, start: Message, body: bytes, path: str) -> None:
    try:
        problem = json.loads(body)
        status = int(problem["status"])
        descriptions = [str(problem["detail"])]
    except (ValueError, KeyError, TypeError):
        status, descriptions = int(start["status"]), ["the request failed"]
    if status == 422:
        status = 400
    document = errors_document(status, descriptions)
    if path.endswith(".xml"):
        content, media_type = xml_bytes("errors", document), b"application/xml"
    else:
        content, media_type = json.dumps(document).encode(), b"application/json"
    kept = [
        (name, value)
        for name, value in start.get("headers", [])
        if name.lower() not in (b"content-type", b"content-length")
    ]
    headers = [
        *kept,
        (b"content-type", media_type),
        (b"content-length", str(len(content)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})
