"""The incidents read model: the current state of each incident, for queries."""

from __future__ import annotations

from ledger.lifecycle import IncidentState, evolve
from projections.base import IncidentRowProjection


def incidents_projection() -> IncidentRowProjection[IncidentState]:
    return IncidentRowProjection("incidents", "incidents", IncidentState, evolve)
