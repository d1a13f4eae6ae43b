"""Dashboard routes: dashboards as JSON and CSV, the public page, the staff page, incident lists.

Public routes (under /public) take no key and serve only widgets marked public. The
routes under /tenants/{tenant_id} take a key and serve every widget.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at run
# time.

import logging
from collections.abc import Generator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from uuid import UUID
from zoneinfo import ZoneInfo

import jinja2
import orjson
from fastapi import Body, FastAPI, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from psycopg_pool import ConnectionPool
from pydantic import BaseModel, Field
from starlette.staticfiles import StaticFiles

from api.audit import ExportResponse
from api.auth import allow
from ledger import lifecycle as lc
from ledger.audit import parse_time
from ledger.config_sections import apply_config, current_payloads
from ledger.dashboards import Dashboard, find_dashboard, tenant_dashboards
from ledger.database import set_tenant
from ledger.errors import InvalidRequest
from ledger.keys import Principal, Role
from ledger.store import PostgresEventStore
from ledger.tenants import TENANT_ID_PATTERN, TenantConfig, require_tenant
from projections.dashboard_queries import (
    DashboardContext,
    recent_seals,
    widget_table,
    widget_tables,
)
from projections.incident_queries import (
    DEFAULT_LIST_LIMIT,
    MAX_LIST_LIMIT,
    SLA_FILTERS,
    IncidentFilter,
    csv_rows,
    export_incidents,
    list_incidents,
)
from projections.runtime import projection_progress

logger = logging.getLogger(__name__)

TENANT = "/tenants/{tenant_id}"
PUBLIC = "/public/tenants/{tenant_id}"
HERE = Path(__file__).resolve().parent
TenantPath = Annotated[str, Field(pattern=TENANT_ID_PATTERN.pattern)]
NamePath = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
AsOfQuery = Annotated[
    str | None,
    Query(
        description="Valid time to judge the figures at (ISO 8601; without an offset, in the "
        "tenant's time zone). Default: now.",
    ),
]
KnownAtQuery = Annotated[
    str | None,
    Query(
        description="Transaction time: count only the events the ledger had recorded by then, "
        "folded from the log. Default: everything recorded.",
    ),
]
MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson"}

_templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


class WidgetOut(BaseModel):
    id: str
    kind: str
    title: str
    public: bool
    options: dict[str, Any] = Field(description="The widget's configuration besides its id")
    columns: list[str]
    rows: list[list[Any]]


class DashboardOut(BaseModel):
    tenant_id: str
    name: str
    title: str
    as_of: datetime = Field(description="The valid time the figures are judged at")
    known_at: datetime | None
    snapshot_id: int | None = Field(description="Snapshot a replay (known_at) started from")
    caught_up: bool = Field(description="False while the projector is still applying events")
    widgets: list[WidgetOut]


class DashboardSummaryOut(BaseModel):
    name: str
    title: str
    widgets: list[str]
    public_widgets: list[str]


class AppliedOut(BaseModel):
    version: int
    changed: list[str]


class SealView(BaseModel):
    seal: int
    sealed_at: datetime
    events: int
    merkle_root: str
    previous_root: str | None


def _csv_name(tenant_id: str, dashboard: str, widget_id: str) -> str:
    return f"{tenant_id}-{dashboard}-{widget_id}.csv"


def end_of_day(day: date, zone: str) -> datetime:
    """Return the local midnight that ends `day` in `zone`."""
    following = day + timedelta(days=1)
    return datetime(following.year, following.month, following.day, tzinfo=ZoneInfo(zone))


def add_dashboard_routes(
    app: FastAPI,
    *,
    pool: ConnectionPool[Any],
    store: PostgresEventStore,
    responses: dict[int | str, dict[str, Any]],
) -> None:
    """Declare the dashboard, public page, staff page and incident list routes on `app`."""
    readers = allow(Role.STAFF, Role.OFFICER, Role.ADMIN, action="read dashboards")
    admin = allow(Role.ADMIN, action="change dashboards")
    listers = allow(Role.STAFF, Role.OFFICER, action="list incidents")

    def caught_up() -> bool:
        with pool.connection() as conn:
            progress = projection_progress(conn)
        return all(progress[name].caught_up for name in ("sla", "trends") if name in progress)

    def compute(
        tenant: TenantConfig,
        dashboard: Dashboard,
        *,
        as_of: datetime | None,
        known_at: datetime | None,
        public_only: bool,
    ) -> DashboardOut:
        moment = as_of or known_at or datetime.now(UTC)
        visible = [widget for widget in dashboard.widgets if widget.public or not public_only]
        with pool.connection() as conn:
            context = DashboardContext(
                conn, tenant.tenant_id, tenant.time_zone, moment, known_at, fold_pool=pool
            )
            tables = widget_tables(context, visible)
        widgets = [
            WidgetOut(
                id=widget.id,
                kind=widget.kind,
                title=widget.heading,
                public=widget.public,
                options=widget.model_dump(mode="json", exclude={"id", "kind", "title", "public"}),
                columns=table.columns,
                rows=table.rows,
            )
            for widget, table in zip(visible, tables, strict=True)
        ]
        return DashboardOut(
            tenant_id=tenant.tenant_id,
            name=dashboard.name,
            title=dashboard.heading,
            as_of=moment,
            known_at=known_at,
            snapshot_id=context.snapshot_id,
            caught_up=known_at is not None or caught_up(),
            widgets=widgets,
        )

    def widget_csv(
        tenant: TenantConfig,
        dashboard: Dashboard,
        widget_id: str,
        *,
        as_of: datetime | None,
        known_at: datetime | None,
        public_only: bool,
    ) -> Response:
        widget = dashboard.widget(tenant.tenant_id, widget_id, public_only=public_only)
        moment = as_of or known_at or datetime.now(UTC)
        with pool.connection() as conn:
            context = DashboardContext(
                conn, tenant.tenant_id, tenant.time_zone, moment, known_at, fold_pool=pool
            )
            table = widget_table(context, widget)
        filename = _csv_name(tenant.tenant_id, dashboard.name, widget.id)
        return Response(
            b"".join(csv_rows(table.columns, table.rows)),
            media_type=MEDIA_TYPES["csv"],
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )

    def latest_seal_view(tenant: TenantConfig) -> SealView | None:
        # The latest seal now, whatever day the page shows: it is the root a reader copies.
        with pool.connection() as conn, conn.transaction():
            set_tenant(conn, tenant.tenant_id)
            context = DashboardContext(
                conn, tenant.tenant_id, tenant.time_zone, datetime.now(UTC), None
            )
            latest = recent_seals(context, 1)
        if not latest:
            return None
        seal, recorded_at = latest[0]
        return SealView(
            seal=seal.stream_version,
            sealed_at=recorded_at,
            events=seal.event_count,
            merkle_root=seal.merkle_root.hex(),
            previous_root=seal.previous_root.hex() if seal.previous_root else None,
        )

    def times(tenant: TenantConfig, as_of: str | None, known_at: str | None) -> dict[str, Any]:
        return {
            "as_of": parse_time("as_of", as_of, tenant.time_zone),
            "known_at": parse_time("known_at", known_at, tenant.time_zone),
        }

    # Static files: the page's own scripts and styles, and the Plotly bundle that the
    # plotly package ships (no CDN at run time).
    app.mount("/static/dashboards", StaticFiles(directory=HERE / "static"), name="dashboards")

    def plotly_bundle(_: Request) -> FileResponse:
        import plotly

        path = Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"
        return FileResponse(
            path,
            media_type="text/javascript",
            headers={"Cache-Control": "public, max-age=86400"},
        )

    app.add_route("/static/plotly.min.js", plotly_bundle, methods=["GET"])

    @app.get(
        TENANT + "/dashboards",
        response_model=list[DashboardSummaryOut],
        responses=responses,
        tags=["dashboards"],
    )
    def get_dashboards(
        tenant_id: TenantPath, _: Annotated[Principal, readers]
    ) -> list[DashboardSummaryOut]:
        """List the tenant's dashboards and which of their widgets are public."""
        tenant = require_tenant(store, tenant_id)
        return [
            DashboardSummaryOut(
                name=item.name,
                title=item.heading,
                widgets=[widget.id for widget in item.widgets],
                public_widgets=[widget.id for widget in item.widgets if widget.public],
            )
            for item in tenant_dashboards(tenant)
        ]

    @app.get(
        TENANT + "/dashboards/{dashboard}",
        response_model=DashboardOut,
        responses=responses,
        tags=["dashboards"],
    )
    def get_dashboard(
        tenant_id: TenantPath,
        dashboard: NamePath,
        _: Annotated[Principal, readers],
        as_of: AsOfQuery = None,
        known_at: KnownAtQuery = None,
    ) -> DashboardOut:
        """Compute every widget of a dashboard as of a valid time and as known at a
        transaction time."""
        tenant = require_tenant(store, tenant_id)
        found = find_dashboard(tenant, dashboard, public_only=False)
        return compute(tenant, found, **times(tenant, as_of, known_at), public_only=False)

    @app.put(
        TENANT + "/dashboards/{dashboard}",
        response_model=AppliedOut,
        responses=responses,
        tags=["dashboards"],
    )
    def put_dashboard(
        tenant_id: TenantPath,
        dashboard: NamePath,
        principal: Annotated[Principal, admin],
        body: Annotated[
            dict[str, Any],
            Body(
                description="The dashboard: optional title and a list of widgets, as in the "
                "dashboards section of the configuration (docs/dashboards.md)"
            ),
        ],
    ) -> AppliedOut:
        """Create or replace one dashboard; this appends a new version of the dashboards
        section of the tenant's configuration."""
        tenant = require_tenant(store, tenant_id)
        if "name" in body and body["name"] != dashboard:
            raise InvalidRequest(
                f"the body names dashboard {body['name']!r} but the path names {dashboard!r}: "
                "leave name out of the body or make them equal"
            )
        section = current_payloads(tenant).get("dashboards", {}).get("dashboards", [])
        replaced = [item for item in section if item["name"] != dashboard]
        position = next(
            (index for index, item in enumerate(section) if item["name"] == dashboard),
            len(replaced),
        )
        replaced.insert(position, {**body, "name": dashboard})
        result = apply_config(
            store,
            tenant_id,
            {"dashboards": replaced},
            occurred_at=datetime.now(UTC),
            actor=principal.name,
        )
        return AppliedOut(version=result.version, changed=result.changed)

    @app.get(
        TENANT + "/dashboards/{dashboard}/widgets/{widget_id}.csv",
        responses={**responses, 200: {"content": {"text/csv": {}}}},
        response_class=Response,
        tags=["dashboards"],
    )
    def get_widget_csv(
        tenant_id: TenantPath,
        dashboard: NamePath,
        widget_id: NamePath,
        _: Annotated[Principal, readers],
        as_of: AsOfQuery = None,
        known_at: KnownAtQuery = None,
    ) -> Response:
        """Download one widget's table as CSV."""
        tenant = require_tenant(store, tenant_id)
        found = find_dashboard(tenant, dashboard, public_only=False)
        return widget_csv(
            tenant, found, widget_id, **times(tenant, as_of, known_at), public_only=False
        )

    @app.get(
        PUBLIC + "/dashboards/{dashboard}",
        response_model=DashboardOut,
        responses=responses,
        tags=["public"],
    )
    def get_public_dashboard(
        tenant_id: TenantPath,
        dashboard: NamePath,
        as_of: AsOfQuery = None,
        known_at: KnownAtQuery = None,
    ) -> DashboardOut:
        """Compute the public widgets of a dashboard; no key needed."""
        tenant = require_tenant(store, tenant_id)
        found = find_dashboard(tenant, dashboard, public_only=True)
        return compute(tenant, found, **times(tenant, as_of, known_at), public_only=True)

    @app.get(
        PUBLIC + "/dashboards/{dashboard}/widgets/{widget_id}.csv",
        responses={**responses, 200: {"content": {"text/csv": {}}}},
        response_class=Response,
        tags=["public"],
    )
    def get_public_widget_csv(
        tenant_id: TenantPath,
        dashboard: NamePath,
        widget_id: NamePath,
        as_of: AsOfQuery = None,
        known_at: KnownAtQuery = None,
    ) -> Response:
        """Download one public widget's table as CSV; no key needed."""
        tenant = require_tenant(store, tenant_id)
        found = find_dashboard(tenant, dashboard, public_only=True)
        return widget_csv(
            tenant, found, widget_id, **times(tenant, as_of, known_at), public_only=True
        )

    @app.get(PUBLIC, response_class=HTMLResponse, responses=responses, tags=["public"])
    def get_public_page(
        tenant_id: TenantPath,
        day: Annotated[
            str | None,
            Query(
                description="Show the figures as of the end of this day (YYYY-MM-DD, the "
                "tenant's time zone). Default: now."
            ),
        ] = None,
    ) -> HTMLResponse:
        """Render the tenant's public page: every public widget as a chart and a table."""
        # NOTE: public routes have no rate limit. A past day costs a fold of the incidents
        # that straddle it (about 0.7 s at a million events), and a public JSON request
        # with known_at replays the tenant's log from its nearest snapshot.
        tenant = require_tenant(store, tenant_id)
        zone = ZoneInfo(tenant.time_zone)
        today = datetime.now(zone).date()
        as_of: datetime | None = None
        if day:
            try:
                chosen = date.fromisoformat(day)
            except ValueError:
                raise InvalidRequest(
                    f"invalid day {day!r}: use a date such as 2015-06-30 (YYYY-MM-DD)"
                ) from None
            as_of = end_of_day(chosen, tenant.time_zone) if chosen < today else None

        dashboards = [
            compute(tenant, item, as_of=as_of, known_at=None, public_only=True)
            for item in tenant_dashboards(tenant)
            if any(widget.public for widget in item.widgets)
        ]
        moment = dashboards[0].as_of if dashboards else (as_of or datetime.now(UTC))
        seal = latest_seal_view(tenant)
        local = moment.astimezone(zone)
        shown_day = (local - timedelta(microseconds=1)).date() if as_of else local.date()
        html = _templates.get_template("public.html").render(
            tenant_name=tenant.name,
            tenant_id=tenant_id,
            time_zone=tenant.time_zone,
            as_of=moment.isoformat(),
            as_of_text=(
                f"the end of {shown_day.isoformat()}" if as_of else local.strftime("%Y-%m-%d %H:%M")
            ),
            is_past=as_of is not None,
            caught_up=all(item.caught_up for item in dashboards),
            day=shown_day.isoformat(),
            today=today.isoformat(),
            dashboards=[item.model_dump(mode="json") for item in dashboards],
            seal=seal.model_dump(mode="json") if seal else None,
        )
        return HTMLResponse(html)

    @app.get(
        "/staff/tenants/{tenant_id}",
        response_class=HTMLResponse,
        responses=responses,
        tags=["staff"],
    )
    def get_staff_page(tenant_id: TenantPath) -> HTMLResponse:
        """Render the staff page, whose script sends the staff key typed into it with each
        call of the JSON API. The page itself contains no data."""
        tenant = require_tenant(store, tenant_id)
        html = _templates.get_template("staff.html").render(
            tenant_name=tenant.name,
            tenant_id=tenant_id,
            statuses=sorted(_statuses()),
            sla_filters=SLA_FILTERS,
        )
        return HTMLResponse(html)

    @app.get(
        TENANT + "/incidents",
        responses={
            **responses,
            200: {
                "description": "A page of incidents (format=json), or every matching incident "
                "as a streamed CSV or JSON Lines download (format=csv or jsonl)",
                "content": {"text/csv": {}, "application/x-ndjson": {}},
            },
        },
        tags=["queries"],
    )
    def get_incidents(
        tenant_id: TenantPath,
        _: Annotated[Principal, listers],
        status: Annotated[
            list[str] | None, Query(description="Incident status; repeatable")
        ] = None,
        category: Annotated[str | None, Query(max_length=200)] = None,
        department: Annotated[str | None, Query(max_length=200)] = None,
        sla: Annotated[
            str | None, Query(description="breached, near_breach (warning reached) or on_track")
        ] = None,
        group: Annotated[UUID | None, Query(description="Duplicate group id")] = None,
        format: Annotated[Literal["json", "csv", "jsonl"], Query()] = "json",
        limit: Annotated[int, Query(description=f"1 to {MAX_LIST_LIMIT}; json only")] = (
            DEFAULT_LIST_LIMIT
        ),
        offset: Annotated[int, Query(description="Rows to skip; json only")] = 0,
    ) -> Any:
        """List incidents with filters, newest first, with their SLA state judged now."""
        require_tenant(store, tenant_id)
        known = _statuses()
        unknown = sorted(set(status or ()) - known)
        if unknown:
            raise InvalidRequest(
                f"invalid status {', '.join(unknown)}: use one of {', '.join(sorted(known))}"
            )
        incident_filter = IncidentFilter(
            statuses=tuple(status or ()),
            category=category,
            department=department,
            sla=sla,
            group_id=group,
        )
        now = datetime.now(UTC)
        if format == "json":
            with pool.connection() as conn:
                rows = list_incidents(
                    conn, tenant_id, incident_filter, now=now, limit=limit, offset=offset
                )
            return Response(
                orjson.dumps(
                    {
                        "tenant_id": tenant_id,
                        "now": now.isoformat(),
                        "incidents": rows,
                        "limit": limit,
                        "offset": offset,
                    }
                ),
                media_type="application/json",
            )

        def chunks() -> Generator[bytes, None, None]:
            with pool.connection() as conn:
                yield from export_incidents(conn, tenant_id, incident_filter, format, now=now)

        # NOTE: each running export keeps one pool connection until it ends.
        stream = chunks()
        # The first chunk comes after the query ran, so an error still gets a problem document.
        first = next(stream, b"")
        return ExportResponse(
            stream,
            first,
            media_type=MEDIA_TYPES[format],
            headers={
                "Content-Disposition": f'attachment; filename="{tenant_id}-incidents.{format}"'
            },
        )


def _statuses() -> set[str]:
    return set(lc.WORKABLE | {lc.RESOLVED, lc.CLOSED, lc.REJECTED, lc.DUPLICATE})
