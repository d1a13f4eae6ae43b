from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from ledger.commands import IncidentCommands
from ledger.config_sections import apply_config
from ledger.database import Database
from ledger.ids import incident_stream_id
from ledger.lifecycle import INCIDENT_ROUTED, REPORT_CLASSIFIED
from ledger.store import PostgresEventStore
from ledger.tenants import configure_categories, create_tenant
from tests.conftest import project_everything
from tests.ledger.classification.test_pool import CATEGORIES, REPORT, STAFF, make_pool, submit

NOW = datetime(2026, 5, 1, tzinfo=UTC)


@pytest.fixture
def tenant(fresh_store: PostgresEventStore) -> str:
    """A tenant of its own database, with categories whose departments routing uses."""
    tenant_id = f"r-{uuid.uuid4().hex[:10]}"
    create_tenant(fresh_store, tenant_id, name="Routing", time_zone="UTC", occurred_at=NOW)
    configure_categories(fresh_store, tenant_id, CATEGORIES, occurred_at=NOW)
    return tenant_id


def routed(store: PostgresEventStore, tenant_id: str, incident: uuid.UUID) -> list[str]:
    events = store.read_stream(tenant_id, incident_stream_id(incident))
    return [event.payload["department"] for event in events if event.event_type == INCIDENT_ROUTED]


def test_classification_routes_to_category_department(
    fresh_database: Database, fresh_store: PostgresEventStore, tenant: str
) -> None:
    incident = submit(fresh_database, fresh_store, tenant)[0]
    pool = make_pool(fresh_database, fresh_store, None)
    assert pool.drain() == 1
    events = fresh_store.read_stream(tenant, incident_stream_id(incident))

    # The rules pick Pothole, whose department is Streets.
    assert [event.event_type for event in events][-2:] == [REPORT_CLASSIFIED, INCIDENT_ROUTED]
    assert routed(fresh_store, tenant, incident) == ["Streets"]
    assert events[-1].metadata["actor"] == "router"
    assert IncidentCommands(fresh_store).load(tenant, incident).status == "submitted"


def test_routing_rule_by_area_wins(
    fresh_database: Database, fresh_store: PostgresEventStore, tenant: str
) -> None:
    apply_config(
        fresh_store,
        tenant,
        {"routing": [{"categories": ["Pothole"], "areas": ["north"], "department": "North Crew"}]},
        occurred_at=NOW,
    )
    commands = IncidentCommands(fresh_store)
    north = commands.submit(tenant, {**REPORT, "area": "north"}, actor=STAFF).incident_id
    south = commands.submit(tenant, {**REPORT, "area": "south"}, actor=STAFF).incident_id
    # The pool finds pending reports in the incidents read model.
    project_everything(fresh_database)
    assert make_pool(fresh_database, fresh_store, None).drain() == 2

    assert routed(fresh_store, tenant, north) == ["North Crew"]
    assert routed(fresh_store, tenant, south) == ["Streets"]


def test_reclassify_routes_again(fresh_store: PostgresEventStore, tenant: str) -> None:
    commands = IncidentCommands(fresh_store)
    incident = commands.submit(tenant, dict(REPORT), actor=STAFF).incident_id
    result = commands.execute(
        tenant, incident, "reclassify", {"category": "Gas leak"}, actor=STAFF, expected_version=1
    )

    assert result.append.stream_version == 3
    assert routed(fresh_store, tenant, incident) == ["Utilities"]


def test_staff_department_never_rerouted(fresh_store: PostgresEventStore, tenant: str) -> None:
    commands = IncidentCommands(fresh_store)
    incident = commands.submit(tenant, dict(REPORT), actor=STAFF).incident_id
    commands.execute(
        tenant,
        incident,
        "assign",
        {"assignee": "crew-7", "department": "Parks"},
        actor=STAFF,
        expected_version=1,
    )
    commands.execute(
        tenant, incident, "reclassify", {"category": "Gas leak"}, actor=STAFF, expected_version=2
    )

    assert routed(fresh_store, tenant, incident) == []
    assert commands.load(tenant, incident).department == "Parks"
