"""Routing: the department a classified incident goes to, appended as an IncidentRouted event.

The routing rules and the category departments come from the tenant's configuration. A
department that came with the report or that staff assigned is never replaced. Routing
changes the department only, not the lifecycle status: an assignment to a person stays a
staff command.
"""

from __future__ import annotations

from datetime import datetime

from ledger.events import NewEvent, RecordedEvent
from ledger.ids import derived_id
from ledger.lifecycle import (
    CATEGORY_FROM_REPORT,
    CATEGORY_FROM_STAFF,
    INCIDENT_ASSIGNED,
    INCIDENT_ROUTED,
    OPEN_STATUSES,
    WAITING_ON_REPORTER,
    fold_incident,
)
from ledger.sla_policy import routed_department, routing_from_payloads
from ledger.tenants import TenantConfig

ROUTER_METADATA = {"actor": "router", "role": "system"}


def routing_event(
    config: TenantConfig,
    history: list[RecordedEvent],
    category: str | None,
    *,
    cause: str,
    occurred_at: datetime,
    staff_correction: bool = False,
) -> NewEvent | None:
    """Return the IncidentRouted event that routes the incident, or None.

    `history` is the incident's stream so far and `category` the category a new
    classification (or a staff correction, with `staff_correction`) gives it. `cause`
    names the classification event, and the assignment's id derives from it, so a retried
    append stores one assignment.
    """
    state = fold_incident(history)
    if state is None or state.status not in OPEN_STATUSES | {WAITING_ON_REPORTER}:
        return None
    if not staff_correction and state.category_source in (
        CATEGORY_FROM_REPORT,
        CATEGORY_FROM_STAFF,
    ):
        category = state.category  # a classifier does not replace these categories
    staff_assigned = any(
        event.event_type == INCIDENT_ASSIGNED and event.payload.get("department")
        for event in history
    )
    if staff_assigned or history[0].payload.get("department"):
        return None
    routes, departments = routing_from_payloads(config.payloads)
    department = routed_department(routes, departments, category, history[0].payload.get("area"))
    if department is None or department == state.department:
        return None
    return NewEvent(
        INCIDENT_ROUTED,
        {"department": department, "reason": f"routed for category {category!r}"},
        occurred_at,
        event_id=derived_id(config.tenant_id, str(state.incident_id), "routing", cause),
        metadata=dict(ROUTER_METADATA),
    )
