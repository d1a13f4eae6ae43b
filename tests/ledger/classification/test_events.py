"""Categories configuration, classification events in the fold, and staff corrections."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from ledger.commands import Actor, IncidentCommands
from ledger.database import Database
from ledger.errors import CommandInvalid
from ledger.events import NewEvent
from ledger.ids import incident_stream_id
from ledger.lifecycle import CLASSIFICATION_FAILED, REPORT_CLASSIFIED
from ledger.store import PostgresEventStore
from ledger.tenants import configure_categories, load_tenant
from tests.conftest import project_everything

STAFF = Actor("test clerk", "staff")
AT = datetime(2026, 1, 2, tzinfo=UTC)
CATEGORIES = {
    "categories": [
        {"name": "Pothole", "department": "Streets", "keywords": ["Pothole", "road hole"]},
        {"name": "Streetlight", "keywords": []},
    ],
    "hazard_words": ["Ice"],
}


def classified(category: str, severity: str, classifier: str = "llm") -> NewEvent:
    payload = {
        "category": category,
        "severity": severity,
        "fields": {"location_text": None, "asset": None, "hazards": []},
        "summary": "s",
        "language": "en",
        "confidence": 0.5,
        "provenance": {"classifier": classifier, "model": None, "prompt_version": "v"},
    }
    return NewEvent(REPORT_CLASSIFIED, payload, AT)


def test_categories_fold_into_config(store: PostgresEventStore, tenant_id: str) -> None:
    config = configure_categories(store, tenant_id, CATEGORIES, occurred_at=AT)
    assert config.category_names == ["Pothole", "Streetlight"]
    assert config.categories[0].department == "Streets"
    assert config.categories[0].keywords == ("pothole", "road hole")
    assert config.hazard_words == ("ice",)

    # A later document replaces the earlier one.
    configure_categories(store, tenant_id, {"categories": [{"name": "Noise"}]}, occurred_at=AT)
    reloaded = load_tenant(store, tenant_id)
    assert reloaded is not None
    assert reloaded.category_names == ["Noise"]
    assert reloaded.hazard_words is None
    assert reloaded.time_zone == "America/New_York"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "expected a JSON object"),
        ({}, "missing categories"),
        ({"categories": []}, "missing categories"),
        ({"categories": [{"name": ""}]}, "invalid name"),
        ({"categories": [{"name": "A"}, {"name": "A"}]}, "listed twice"),
        ({"categories": [{"name": "A", "keywords": "a"}]}, "invalid keywords"),
        ({"categories": [{"name": "A"}], "hazard_words": [1]}, "invalid hazard_words"),
        ({"categories": [{"name": "A"}], "colors": []}, "unknown field"),
    ],
)
def test_categories_reject_invalid(
    store: PostgresEventStore, tenant_id: str, document: Any, message: str
) -> None:
    with pytest.raises(CommandInvalid, match=message):
        configure_categories(store, tenant_id, document, occurred_at=AT)


def new_incident(store: PostgresEventStore, tenant_id: str, **report: Any) -> uuid.UUID:
    report.setdefault("description", "A deep hole in the road")
    return IncidentCommands(store).submit(tenant_id, report, actor=STAFF).incident_id


def test_classification_fills_missing_category(store: PostgresEventStore, tenant_id: str) -> None:
    incident = new_incident(store, tenant_id)
    store.append(
        tenant_id, incident_stream_id(incident), [classified("Pothole", "high")], expected_version=1
    )
    state = IncidentCommands(store).load(tenant_id, incident)
    assert state.category == "Pothole"
    assert state.category_source == "classifier"
    assert state.severity == "high"
    assert state.classifier == "llm"


def test_classification_keeps_reported_category(store: PostgresEventStore, tenant_id: str) -> None:
    incident = new_incident(store, tenant_id, category="Streetlight")
    store.append(
        tenant_id, incident_stream_id(incident), [classified("Pothole", "low")], expected_version=1
    )
    state = IncidentCommands(store).load(tenant_id, incident)
    assert state.category == "Streetlight"
    assert state.category_source == "report"
    assert state.severity == "low"


def test_failed_classification_keeps_incident_usable(
    store: PostgresEventStore, tenant_id: str
) -> None:
    incident = new_incident(store, tenant_id)
    failed = NewEvent(
        CLASSIFICATION_FAILED, {"reason": "x", "classifier": "llm", "attempts": 3}, AT
    )
    store.append(tenant_id, incident_stream_id(incident), [failed], expected_version=1)
    commands = IncidentCommands(store)
    state = commands.load(tenant_id, incident)
    assert state.classifier == "failed"
    assert state.category is None
    commands.execute(tenant_id, incident, "acknowledge", {}, actor=STAFF, expected_version=2)
    assert commands.load(tenant_id, incident).status == "acknowledged"


def test_correction_wins_over_classification(store: PostgresEventStore, tenant_id: str) -> None:
    configure_categories(store, tenant_id, CATEGORIES, occurred_at=AT)
    commands = IncidentCommands(store)
    incident = new_incident(store, tenant_id, category="Pothole")
    commands.execute(
        tenant_id,
        incident,
        "reclassify",
        {"category": "Streetlight", "severity": "critical"},
        actor=STAFF,
        expected_version=1,
    )
    # A classification recorded after the correction changes nothing.
    store.append(
        tenant_id, incident_stream_id(incident), [classified("Pothole", "low")], expected_version=2
    )
    state = commands.load(tenant_id, incident)
    assert state.category == "Streetlight"
    assert state.category_source == "staff"
    assert state.severity == "critical"
    assert state.classifier == "staff"

    # The latest correction wins, and a severity-only correction keeps the category.
    commands.execute(
        tenant_id, incident, "reclassify", {"severity": "low"}, actor=STAFF, expected_version=3
    )
    state = commands.load(tenant_id, incident)
    assert state.category == "Streetlight"
    assert state.severity == "low"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, "missing category and severity"),
        ({"severity": "urgent"}, "invalid severity"),
        ({"category": "Graffiti"}, "unknown category 'Graffiti'"),
    ],
)
def test_reclassify_rejects_invalid(
    store: PostgresEventStore, tenant_id: str, args: dict[str, Any], message: str
) -> None:
    configure_categories(store, tenant_id, CATEGORIES, occurred_at=AT)
    incident = new_incident(store, tenant_id)
    with pytest.raises(CommandInvalid, match=message):
        IncidentCommands(store).execute(
            tenant_id, incident, "reclassify", args, actor=STAFF, expected_version=None
        )


def test_reclassify_allowed_after_close(store: PostgresEventStore, tenant_id: str) -> None:
    commands = IncidentCommands(store)
    incident = new_incident(store, tenant_id)
    for command in ("resolve", "close"):
        commands.execute(tenant_id, incident, command, {}, actor=STAFF, expected_version=None)
    commands.execute(
        tenant_id, incident, "reclassify", {"severity": "high"}, actor=STAFF, expected_version=None
    )
    assert commands.load(tenant_id, incident).severity == "high"


def test_read_model_matches_fold(fresh_database: Database, fresh_store: PostgresEventStore) -> None:
    from ledger.tenants import create_tenant

    tenant_id = "fold-city"
    create_tenant(fresh_store, tenant_id, name="Fold", time_zone="UTC", occurred_at=AT)
    incident = new_incident(fresh_store, tenant_id)
    fresh_store.append(
        tenant_id,
        incident_stream_id(incident),
        [classified("Pothole", "medium", "rules")],
        expected_version=1,
    )
    # Waits, unlike one catch_up, while another database's transaction keeps the
    # server's transaction horizon below the new events.
    project_everything(fresh_database)
    with fresh_database.connect_worker() as conn:
        row = conn.execute(
            "SELECT category, category_source, severity, classifier FROM incidents "
            "WHERE incident_id = %s",
            (incident,),
        ).fetchone()
    assert row == ("Pothole", "classifier", "medium", "rules")


def test_cli_sets_categories(database: Database, tenant_id: str, tmp_path: Path) -> None:
    document = tmp_path / "categories.json"
    document.write_text(json.dumps(CATEGORIES), encoding="utf-8")
    env = {**os.environ, "DATABASE_URL": database.owner_conninfo, "CIVICPULSE_LOG_LEVEL": "WARNING"}
    command = [sys.executable, "-m", "api.cli", "tenant", "categories", "--tenant", tenant_id]

    result = subprocess.run(
        [*command, "--file", str(document)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "Pothole, Streetlight" in result.stdout + result.stderr

    document.write_text("{not json", encoding="utf-8")
    result = subprocess.run(
        [*command, "--file", str(document)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "invalid JSON" in result.stdout + result.stderr
