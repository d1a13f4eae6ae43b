"""Duplicate grouping routes: grouping settings, a report's group, suggestions for a draft."""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at run
# time.

from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import Body, FastAPI
from psycopg_pool import ConnectionPool
from pydantic import BaseModel, ConfigDict, Field

from api.auth import actor_of, allow
from ledger.database import set_tenant
from ledger.errors import IncidentNotFound
from ledger.grouping import GroupedReport, GroupingSettings, configure_grouping, report_text
from ledger.ids import incident_stream_id
from ledger.keys import Principal, Role
from ledger.lifecycle import fold_incident
from ledger.store import PostgresEventStore
from ledger.tenants import require_tenant
from projections.grouping_queries import group_members, suggest_duplicates

TENANT = "/tenants/{tenant_id}"
TenantPath = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{1,62}$")]


class GroupMemberOut(BaseModel):
    incident_id: UUID
    category: str | None
    status: str | None = Field(description="Null until the incidents read model has the report")
    submitted_at: datetime
    latitude: float | None
    longitude: float | None


class GroupOut(BaseModel):
    incident_id: UUID
    group_id: UUID | None = Field(
        description="The smallest incident id of the group; null until the grouping read "
        "model has the report"
    )
    members: list[GroupMemberOut] = Field(description="Every report of the group, oldest first")


class DraftIn(BaseModel):
    """A report being written, to look for reports of the same issue before it is sent."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    description: str | None = Field(default=None, max_length=4000)
    title: str | None = Field(default=None, max_length=200)
    category: str | None = Field(default=None, max_length=200)
    latitude: float = Field(ge=-90, le=90, allow_inf_nan=False)
    longitude: float = Field(ge=-180, le=180, allow_inf_nan=False)


class SuggestionOut(BaseModel):
    incident_id: UUID
    group_id: UUID
    category: str | None
    status: str | None
    submitted_at: datetime
    distance_m: float
    text_similarity: float | None = Field(description="0 to 100; null when a text is empty")


def add_grouping_routes(
    app: FastAPI,
    *,
    pool: ConnectionPool[Any],
    store: PostgresEventStore,
    responses: dict[int | str, dict[str, Any]],
) -> None:
    """Declare the grouping routes on `app`."""

    @app.get(
        TENANT + "/grouping",
        response_model=GroupingSettings,
        responses=responses,
        tags=["grouping"],
    )
    def get_grouping(
        tenant_id: TenantPath,
        _: Annotated[
            Principal, allow(Role.STAFF, Role.OFFICER, Role.ADMIN, action="read grouping settings")
        ],
    ) -> GroupingSettings:
        """Return the tenant's duplicate grouping settings (the defaults until it sets any)."""
        return require_tenant(store, tenant_id).grouping

    @app.put(
        TENANT + "/grouping",
        response_model=GroupingSettings,
        responses=responses,
        tags=["grouping"],
    )
    def put_grouping(
        tenant_id: TenantPath,
        principal: Annotated[Principal, allow(Role.ADMIN, action="configure grouping")],
        document: Annotated[dict[str, Any], Body()],
    ) -> GroupingSettings:
        """Replace the grouping settings with a new version; fields left out take the
        defaults. Reports arriving from now on are grouped by it; groups found before stay."""
        return configure_grouping(
            store,
            tenant_id,
            document,
            occurred_at=datetime.now(UTC),
            actor=actor_of(principal).name,
        )

    @app.get(
        TENANT + "/incidents/{incident_id}/group",
        response_model=GroupOut,
        responses=responses,
        tags=["grouping"],
    )
    def get_group(
        tenant_id: TenantPath,
        incident_id: UUID,
        principal: Annotated[
            Principal,
            allow(Role.REPORTER, Role.STAFF, Role.OFFICER, action="read duplicate groups"),
        ],
    ) -> GroupOut:
        """Return the report's duplicate group: its members' categories, statuses, times
        and locations, never their texts or reporters. Reporters see the groups of the
        reports their own key submitted."""
        state = fold_incident(store.read_stream(tenant_id, incident_stream_id(incident_id)))
        if state is None or (
            principal.role == Role.REPORTER and state.submitted_by != str(principal.key_id)
        ):
            raise IncidentNotFound(tenant_id, str(incident_id))
        with pool.connection() as conn, conn.transaction():
            set_tenant(conn, tenant_id)
            found = group_members(conn, tenant_id, incident_id)
        if found is None:
            return GroupOut(incident_id=incident_id, group_id=None, members=[])
        group_id, members = found
        return GroupOut(
            incident_id=incident_id,
            group_id=group_id,
            members=[GroupMemberOut(**asdict(member)) for member in members],
        )

    @app.post(
        TENANT + "/incidents/suggestions",
        response_model=list[SuggestionOut],
        responses=responses,
        tags=["grouping"],
    )
    def post_suggestions(
        tenant_id: TenantPath,
        draft: DraftIn,
        _: Annotated[Principal, allow(Role.REPORTER, Role.STAFF, action="look for duplicates")],
    ) -> list[SuggestionOut]:
        """Return up to 10 reports that the grouping rule pairs with the draft, nearest
        first: possible duplicates to show before the report is submitted. Nothing is
        stored."""
        settings = require_tenant(store, tenant_id).grouping
        report = GroupedReport(
            incident_id=None,
            submitted_at=datetime.now(UTC),
            category=draft.category,
            category_source=None,
            text=report_text(draft.model_dump()),
            latitude=draft.latitude,
            longitude=draft.longitude,
        )
        with pool.connection() as conn, conn.transaction():
            set_tenant(conn, tenant_id)
            found = suggest_duplicates(conn, tenant_id, settings, report)
        return [SuggestionOut(**asdict(item)) for item in found]
