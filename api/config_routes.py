"""Tenant configuration endpoints: read the configuration and its versions, apply sections."""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at run
# time.

from datetime import UTC, datetime
from typing import Annotated, Any

import anyio
from fastapi import Body, FastAPI, Request
from pydantic import BaseModel, Field

from api.auth import allow
from ledger.config_sections import (
    SECTIONS,
    apply_config,
    configuration_history,
    current_payloads,
    import_holidays,
)
from ledger.keys import Principal, Role
from ledger.store import PostgresEventStore
from ledger.tenants import TENANT_ID_PATTERN, require_tenant

CONFIG = "/tenants/{tenant_id}/config"
TenantPath = Annotated[str, Field(pattern=TENANT_ID_PATTERN.pattern)]
Reader = Annotated[
    Principal, allow(Role.STAFF, Role.OFFICER, Role.ADMIN, action="read the configuration")
]
ConfigAdmin = Annotated[Principal, allow(Role.ADMIN, action="change the configuration")]


class ConfigOut(BaseModel):
    tenant_id: str
    version: int = Field(description="Version of the tenant's configuration stream")
    time_zone: str
    sections: dict[str, dict[str, Any]]


class AppliedOut(BaseModel):
    version: int
    changed: list[str] = Field(description="Sections that got a new version; empty if none")
    warnings: list[str] = Field(
        default_factory=list,
        description="Rules that name a category the categories section lacks: they match "
        "only reports of exactly that category",
    )


class VersionOut(BaseModel):
    version: int
    event_type: str
    section: str | None
    occurred_at: datetime
    recorded_at: datetime
    actor: str | None
    payload: dict[str, Any]


def add_config_routes(
    app: FastAPI, *, store: PostgresEventStore, responses: dict[int | str, dict[str, Any]]
) -> None:
    """Add the configuration endpoints under /tenants/{tenant_id}/config to `app`."""

    @app.get(CONFIG, response_model=ConfigOut, responses=responses, tags=["configuration"])
    def get_config(tenant_id: TenantPath, _: Reader) -> ConfigOut:
        """Return the tenant's current configuration, section by section."""
        config = require_tenant(store, tenant_id)
        return ConfigOut(
            tenant_id=tenant_id,
            version=config.version,
            time_zone=config.time_zone,
            sections=current_payloads(config),
        )

    @app.get(
        CONFIG + "/versions",
        response_model=list[VersionOut],
        responses=responses,
        tags=["configuration"],
    )
    def get_config_versions(tenant_id: TenantPath, _: Reader) -> list[VersionOut]:
        """List every version of the configuration, oldest first, with what changed."""
        return [VersionOut(**item) for item in configuration_history(store, tenant_id)]

    @app.post(CONFIG, response_model=AppliedOut, responses=responses, tags=["configuration"])
    def post_config(
        tenant_id: TenantPath,
        principal: ConfigAdmin,
        document: Annotated[
            dict[str, Any],
            Body(
                description="Sections to apply: " + ", ".join(SECTIONS) + ". Sections left "
                "out stay as they are; a document with any invalid section applies nothing."
            ),
        ],
    ) -> AppliedOut:
        """Apply configuration sections; each changed section appends a new version."""
        result = apply_config(
            store, tenant_id, document, occurred_at=datetime.now(UTC), actor=principal.name
        )
        return AppliedOut(version=result.version, changed=result.changed, warnings=result.warnings)

    @app.post(
        CONFIG + "/calendars/{calendar_name}/holidays",
        response_model=AppliedOut,
        responses=responses,
        tags=["configuration"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"text/calendar": {"schema": {"type": "string"}}},
            }
        },
    )
    async def post_holidays(
        tenant_id: TenantPath,
        calendar_name: Annotated[str, Field(min_length=1, max_length=100)],
        request: Request,
        principal: ConfigAdmin,
    ) -> AppliedOut:
        """Add the all-day events of an iCalendar file (text/calendar) as holidays."""
        data = await request.body()

        def run() -> AppliedOut:
            result = import_holidays(
                store,
                tenant_id,
                calendar_name,
                data,
                occurred_at=datetime.now(UTC),
                actor=principal.name,
            )
            return AppliedOut(version=result.version, changed=result.changed)

        return await anyio.to_thread.run_sync(run)
