"""An in-memory event log for SLA fold tests: events get increasing log positions."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ledger import lifecycle as lc
from ledger.config_sections import CALENDARS_CONFIGURED, SLA_POLICIES_CONFIGURED
from ledger.events import RecordedEvent
from ledger.tenants import TENANT_CREATED

OFFICE_CALENDAR = {
    "name": "office",
    "time_zone": "America/New_York",
    "weekly_hours": {
        day: ["09:00-17:00"] for day in ("monday", "tuesday", "wednesday", "thursday", "friday")
    }
    | {"saturday": [], "sunday": []},
    "holidays": ["2026-07-03"],
    "business_day_hours": 8.0,
}


@dataclass
class Log:
    tenant_id: str = "acme"
    events: list[RecordedEvent] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)

    def append(
        self,
        stream_id: str,
        event_type: str,
        at: datetime,
        payload: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> RecordedEvent:
        version = self.versions.get(stream_id, 0) + 1
        self.versions[stream_id] = version
        position = len(self.events) + 1
        event = RecordedEvent(
            position=position,
            tx_id=position,
            tenant_id=self.tenant_id,
            stream_id=stream_id,
            stream_version=version,
            event_type=event_type,
            schema_version=1,
            payload=payload or {},
            metadata=metadata or {},
            occurred_at=at,
            recorded_at=at,
            event_id=uuid.uuid4(),
            hash=bytes(32),
        )
        self.events.append(event)
        return event

    def config(self, event_type: str, at: datetime, payload: dict[str, Any]) -> None:
        self.append(f"tenant-{self.tenant_id}", event_type, at, payload)

    def create_tenant(self, at: datetime, resolution_hours: float = 72) -> None:
        self.config(
            TENANT_CREATED,
            at,
            {
                "name": "Acme",
                "time_zone": "America/New_York",
                "first_response_hours": 24,
                "resolution_hours": resolution_hours,
                "category_resolution_hours": {},
            },
        )

    def policies(self, at: datetime, *policies: dict[str, Any]) -> None:
        self.config(CALENDARS_CONFIGURED, at, {"calendars": [OFFICE_CALENDAR]})
        self.config(SLA_POLICIES_CONFIGURED, at, {"policies": list(policies)})

    def submit(self, at: datetime, **payload: Any) -> str:
        incident = uuid.uuid4()
        self.append(
            f"incident-{incident}",
            lc.REPORT_SUBMITTED,
            at,
            {"incident_id": str(incident), **payload},
            {"channel": "api"},
        )
        return str(incident)

    def incident(self, incident: str, event_type: str, at: datetime, **payload: Any) -> None:
        self.append(f"incident-{incident}", event_type, at, payload)
