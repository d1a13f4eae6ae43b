"""The what-if route: a tenant's SLA record under a proposed policy document."""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at run
# time.

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Body, FastAPI, Query
from psycopg_pool import ConnectionPool
from pydantic import BaseModel, Field

from api.auth import allow
from ledger.audit import parse_time
from ledger.keys import Principal, Role
from ledger.store import PostgresEventStore
from ledger.tenants import require_tenant
from replay.what_if import parse_proposal, what_if

TENANT = "/tenants/{tenant_id}"
TenantPath = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{1,62}$")]
# Each request folds the tenant's whole history twice, so it is not open to every staff key.
Analyst = Annotated[
    Principal, allow(Role.OFFICER, Role.ADMIN, action="compare a proposed SLA policy")
]


class CountsOut(BaseModel):
    total: int
    with_target: int
    open: int
    breached: int
    on_time: int
    on_time_rate: float | None


class ComparedCountsOut(BaseModel):
    in_force: CountsOut = Field(description="Under the policies recorded in the ledger")
    proposed: CountsOut = Field(description="Under the proposed policies")


class CategoryOut(ComparedCountsOut):
    category: str | None


class CaseOut(BaseModel):
    incident_id: str
    category: str | None
    department: str | None
    status: str
    submitted_at: datetime
    resolved_at: datetime | None
    policy_in_force: str | None = Field(description="None: the report keeps its own target")
    due_in_force: datetime | None
    policy_proposed: str | None
    due_proposed: datetime | None


class WhatIfOut(BaseModel):
    tenant_id: str
    as_of: datetime | None
    known_at: datetime | None
    judged_at: datetime = Field(description="Clock value open incidents were judged at")
    events_folded: int
    sections: list[str] = Field(description="Configuration sections the proposal replaces")
    totals: ComparedCountsOut
    categories: list[CategoryOut]
    newly_breached: list[CaseOut] = Field(
        description="Incidents that breach under the proposal and not under the policies in force"
    )
    no_longer_breached: list[CaseOut] = Field(
        description="Incidents that breach under the policies in force and not under the proposal"
    )


def add_what_if_routes(
    app: FastAPI,
    *,
    pool: ConnectionPool[Any],
    store: PostgresEventStore,
    responses: dict[int | str, dict[str, Any]],
) -> None:
    """Add POST /tenants/{tenant_id}/sla/what-if to `app`."""

    @app.post(
        TENANT + "/sla/what-if", response_model=WhatIfOut, responses=responses, tags=["queries"]
    )
    def post_what_if(
        tenant_id: TenantPath,
        _: Analyst,
        document: Annotated[
            dict[str, Any],
            Body(
                description="The proposed `sla_policies` section, and `calendars` when the "
                "policies need other calendars, as POST /tenants/{tenant_id}/config takes "
                "them. Nothing is applied."
            ),
        ],
        as_of: Annotated[
            str | None,
            Query(
                description="Valid time (RFC 3339): keep the events that happened by then "
                "and judge open incidents at it. Without an offset it is read in the "
                "tenant's time zone. Defaults to now.",
                json_schema_extra={"format": "date-time"},
            ),
        ] = None,
        known_at: Annotated[
            str | None,
            Query(
                description="Transaction time (RFC 3339): keep the events recorded by then. "
                "Defaults to everything recorded.",
                json_schema_extra={"format": "date-time"},
            ),
        ] = None,
    ) -> WhatIfOut:
        """Replay the tenant's history under proposed SLA policies and compare the result
        with the policies in force, case by case and per category. Writes nothing."""
        tenant = require_tenant(store, tenant_id)
        proposal = parse_proposal(document, tenant)
        valid = parse_time("as_of", as_of, tenant.time_zone)
        known = parse_time("known_at", known_at, tenant.time_zone)
        judged_at = valid or known or datetime.now(UTC)
        with pool.connection() as conn:
            report = what_if(
                conn, tenant_id, proposal, judged_at=judged_at, as_of=valid, known_at=known
            )
        return WhatIfOut(**report.to_json())
