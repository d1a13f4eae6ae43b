"""Tenants and their configuration, kept as a stream of events per tenant."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ledger.errors import CommandInvalid, ConcurrencyError, TenantExists, TenantNotFound
from ledger.events import NewEvent, RecordedEvent
from ledger.store import PostgresEventStore

TENANT_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")

TENANT_CREATED = "TenantCreated"


@dataclass(frozen=True, slots=True)
class TenantConfig:
    """A tenant's configuration as folded from its configuration stream."""

    tenant_id: str
    name: str
    time_zone: str
    first_response_hours: float
    resolution_hours: float
    category_resolution_hours: dict[str, float] = field(default_factory=dict)
    version: int = 0

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.time_zone)

    def resolution_hours_for(self, category: str | None) -> float:
        if category is not None and category in self.category_resolution_hours:
            return self.category_resolution_hours[category]
        return self.resolution_hours


def tenant_stream_id(tenant_id: str) -> str:
    return f"tenant-{tenant_id}"


def validate_tenant_id(tenant_id: str) -> str:
    if not TENANT_ID_PATTERN.fullmatch(tenant_id):
        raise CommandInvalid(
            f"invalid tenant id {tenant_id!r}: use 2 to 63 lowercase letters, digits "
            "and hyphens, starting with a letter or digit"
        )
    return tenant_id


def validate_time_zone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as error:
        raise CommandInvalid(
            f"unknown time zone {name!r}: use an IANA name such as America/New_York"
        ) from error
    return name


def fold_tenant(tenant_id: str, events: list[RecordedEvent]) -> TenantConfig | None:
    config: TenantConfig | None = None
    for event in events:
        if event.event_type == TENANT_CREATED:
            payload = event.payload
            config = TenantConfig(
                tenant_id=tenant_id,
                name=payload["name"],
                time_zone=payload["time_zone"],
                first_response_hours=payload["first_response_hours"],
                resolution_hours=payload["resolution_hours"],
                category_resolution_hours=dict(payload.get("category_resolution_hours", {})),
                version=event.stream_version,
            )
    return config


def create_tenant(
    store: PostgresEventStore,
    tenant_id: str,
    *,
    name: str,
    time_zone: str,
    occurred_at: datetime,
    first_response_hours: float = 24.0,
    resolution_hours: float = 72.0,
    category_resolution_hours: dict[str, float] | None = None,
    actor: str = "cli",
) -> TenantConfig:
    """Append the TenantCreated event; raises TenantExists when the tenant has one."""
    validate_tenant_id(tenant_id)
    validate_time_zone(time_zone)
    for label, hours in [
        ("first_response_hours", first_response_hours),
        ("resolution_hours", resolution_hours),
    ]:
        if hours <= 0:
            raise CommandInvalid(f"{label} = {hours} must be a positive number of hours")
    payload = {
        "name": name,
        "time_zone": time_zone,
        "first_response_hours": first_response_hours,
        "resolution_hours": resolution_hours,
        "category_resolution_hours": category_resolution_hours or {},
    }
    event = NewEvent(
        TENANT_CREATED,
        payload,
        occurred_at,
        metadata={"actor": actor, "role": "admin"},
    )
    try:
        store.append(tenant_id, tenant_stream_id(tenant_id), [event], expected_version=0)
    except ConcurrencyError as error:
        raise TenantExists(tenant_id) from error
    config = load_tenant(store, tenant_id)
    assert config is not None
    return config


def load_tenant(store: PostgresEventStore, tenant_id: str) -> TenantConfig | None:
    return fold_tenant(tenant_id, store.read_stream(tenant_id, tenant_stream_id(tenant_id)))


def require_tenant(store: PostgresEventStore, tenant_id: str) -> TenantConfig:
    config = load_tenant(store, tenant_id)
    if config is None:
        raise TenantNotFound(tenant_id)
    return config
