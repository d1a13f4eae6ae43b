"""The classifier pool against a real PostgreSQL and a scripted server on loopback."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from prometheus_client import REGISTRY

from ledger.classification.llm import LLMClassifier
from ledger.classification.pool import ClassifierPool
from ledger.commands import Actor, IncidentCommands
from ledger.database import Database
from ledger.events import RecordedEvent
from ledger.ids import incident_stream_id
from ledger.lifecycle import CLASSIFICATION_FAILED, REPORT_CLASSIFIED
from ledger.store import PostgresEventStore
from ledger.tenants import configure_categories, create_tenant
from projections.incidents import incidents_projection
from projections.runtime import catch_up
from tests.ledger.classification.fake_llm import (
    Reply,
    ScriptedServer,
    completion,
    error,
    scripted_server,
)

STAFF = Actor("test clerk", "staff")
CATEGORIES = {
    "categories": [
        {"name": "Pothole", "department": "Streets", "keywords": ["pothole", "road hole"]},
        {"name": "Streetlight", "department": "Lighting", "keywords": ["streetlight", "lamp"]},
        {"name": "Gas leak", "department": "Utilities", "keywords": ["gas smell", "gas leak"]},
    ]
}
ANSWER = {
    "category": "Streetlight",
    "severity": "medium",
    "fields": {"location_text": "Elm St", "asset": "streetlight", "hazards": []},
    "summary": "Streetlight out on Elm St",
    "language": "en",
    "confidence": 0.9,
}
GOOD = json.dumps(ANSWER)
# The rules would pick Pothole for this report, so the category shows which classifier decided.
REPORT = {"title": "Light out", "description": "The lamp by the pothole on Elm St is dark"}


@pytest.fixture
def tenant(fresh_store: PostgresEventStore) -> str:
    tenant_id = f"t-{uuid.uuid4().hex[:10]}"
    at = datetime(2026, 1, 1, tzinfo=UTC)
    create_tenant(fresh_store, tenant_id, name="Test City", time_zone="UTC", occurred_at=at)
    configure_categories(fresh_store, tenant_id, CATEGORIES, occurred_at=at)
    return tenant_id


def submit(
    database: Database, store: PostgresEventStore, tenant_id: str, count: int = 1
) -> list[uuid.UUID]:
    commands = IncidentCommands(store)
    ids = [commands.submit(tenant_id, dict(REPORT), actor=STAFF).incident_id for _ in range(count)]
    # The projector applies an event only once every older transaction on the server has
    # ended, so a transaction of another test may hold it back for a moment.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        catch_up(database, [incidents_projection()])
        with database.connect_worker() as conn:
            row = conn.execute(
                "SELECT count(*) FROM incidents WHERE tenant_id = %s", (tenant_id,)
            ).fetchone()
        if row is not None and row[0] == count:
            return ids
        time.sleep(0.05)
    raise AssertionError(f"the incidents read model did not reach {count} rows in 10 s")


def llm(server: ScriptedServer, timeout: float = 2.0) -> LLMClassifier:
    return LLMClassifier(
        base_url=server.base_url, api_key="test-key", model="test-model", timeout_seconds=timeout
    )


def make_pool(
    database: Database, store: PostgresEventStore, server: ScriptedServer | None, **options: Any
) -> ClassifierPool:
    timeout = options.pop("timeout", 2.0)
    options.setdefault("backoff_seconds", 0.01)
    return ClassifierPool(database, store, llm=llm(server, timeout) if server else None, **options)


def outcomes(store: PostgresEventStore, tenant_id: str, incident: uuid.UUID) -> list[RecordedEvent]:
    events = store.read_stream(tenant_id, incident_stream_id(incident))
    return [e for e in events if e.event_type in (REPORT_CLASSIFIED, CLASSIFICATION_FAILED)]


@pytest.mark.parametrize(
    "content",
    [
        GOOD,
        f"```json\n{GOOD}\n```",
        f"Here is the classification you asked for:\n{GOOD}\nLet me know if you need more.",
    ],
    ids=["plain", "fenced", "prose"],
)
def test_pool_records_llm_answer(
    fresh_database: Database, fresh_store: PostgresEventStore, tenant: str, content: str
) -> None:
    incident = submit(fresh_database, fresh_store, tenant)[0]
    with scripted_server([completion(content)]) as server:
        pool = make_pool(fresh_database, fresh_store, server)
        assert pool.drain() == 1
        # A second pass finds nothing pending, although the read model has not caught up.
        assert pool.drain() == 0

    recorded = outcomes(fresh_store, tenant, incident)
    assert [e.event_type for e in recorded] == [REPORT_CLASSIFIED]
    payload = recorded[0].payload
    assert payload["category"] == "Streetlight"
    assert payload["severity"] == "medium"
    assert payload["fields"]["location_text"] == "Elm St"
    assert payload["provenance"]["classifier"] == "llm"
    assert payload["provenance"]["model"] == "test-model"
    assert len(server.requests) == 1
    assert server.requests[0]["authorization"] == "Bearer test-key"
    schema = server.requests[0]["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["category"]["enum"] == ["Pothole", "Streetlight", "Gas leak"]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (json.dumps({**ANSWER, "category": "Graffiti"}), "unknown category 'Graffiti'"),
        (GOOD[: len(GOOD) // 2], "no complete JSON object"),
        (json.dumps({k: v for k, v in ANSWER.items() if k != "severity"}), "severity"),
    ],
    ids=["unknown-category", "truncated", "missing-field"],
)
def test_pool_records_invalid_answer(
    fresh_database: Database,
    fresh_store: PostgresEventStore,
    tenant: str,
    content: str,
    reason: str,
) -> None:
    incident = submit(fresh_database, fresh_store, tenant)[0]
    with scripted_server([completion(content)]) as server:
        assert make_pool(fresh_database, fresh_store, server).drain() == 1

    recorded = outcomes(fresh_store, tenant, incident)
    assert [e.event_type for e in recorded] == [CLASSIFICATION_FAILED, REPORT_CLASSIFIED]
    failure, fallback = recorded
    assert reason in failure.payload["reason"]
    assert failure.payload["classifier"] == "llm"
    # An invalid answer is not worth a second request.
    assert failure.payload["attempts"] == 1
    assert len(server.requests) == 1
    assert fallback.payload["provenance"]["classifier"] == "rules"
    assert fallback.payload["category"] in {"Pothole", "Streetlight", "Gas leak"}


def test_pool_without_fallback_records_failure_only(
    fresh_database: Database, fresh_store: PostgresEventStore, tenant: str
) -> None:
    incident = submit(fresh_database, fresh_store, tenant)[0]
    unknown = json.dumps({**ANSWER, "category": "Graffiti"})
    with scripted_server([completion(unknown)]) as server:
        pool = make_pool(fresh_database, fresh_store, server, fallback_to_rules=False)
        assert pool.drain() == 1

    recorded = outcomes(fresh_store, tenant, incident)
    assert [e.event_type for e in recorded] == [CLASSIFICATION_FAILED]
    assert recorded[0].metadata["role"] == "system"
    assert pool.status().outcomes == {"failed": 1}


def test_pool_retries_server_error(
    fresh_database: Database, fresh_store: PostgresEventStore, tenant: str
) -> None:
    incident = submit(fresh_database, fresh_store, tenant)[0]
    script = [error(500, "internal error"), completion(GOOD)]
    retries_before = REGISTRY.get_sample_value("civicpulse_classifier_retries_total") or 0.0
    with scripted_server(script) as server:
        assert make_pool(fresh_database, fresh_store, server).drain() == 1

    retries = REGISTRY.get_sample_value("civicpulse_classifier_retries_total")
    assert retries == retries_before + 1

    recorded = outcomes(fresh_store, tenant, incident)
    assert [e.event_type for e in recorded] == [REPORT_CLASSIFIED]
    assert recorded[0].payload["provenance"]["classifier"] == "llm"
    assert len(server.requests) == 2


def test_pool_gives_up_after_server_errors(
    fresh_database: Database, fresh_store: PostgresEventStore, tenant: str
) -> None:
    incident = submit(fresh_database, fresh_store, tenant)[0]
    with scripted_server([error(503, "overloaded")]) as server:
        assert make_pool(fresh_database, fresh_store, server, max_attempts=3).drain() == 1

    recorded = outcomes(fresh_store, tenant, incident)
    assert [e.event_type for e in recorded] == [CLASSIFICATION_FAILED, REPORT_CLASSIFIED]
    assert "HTTP 503" in recorded[0].payload["reason"]
    assert recorded[0].payload["attempts"] == 3
    assert len(server.requests) == 3


def test_pool_times_out_hanging_server(
    fresh_database: Database, fresh_store: PostgresEventStore, tenant: str
) -> None:
    incident = submit(fresh_database, fresh_store, tenant)[0]
    hanging = Reply(body=completion(GOOD).body, delay_seconds=3.0)
    with scripted_server([hanging]) as server:
        pool = make_pool(fresh_database, fresh_store, server, max_attempts=2, timeout=0.3)
        started = time.monotonic()
        assert pool.drain() == 1
        elapsed = time.monotonic() - started

    recorded = outcomes(fresh_store, tenant, incident)
    assert [e.event_type for e in recorded] == [CLASSIFICATION_FAILED, REPORT_CLASSIFIED]
    assert recorded[0].payload["reason"] == "request timed out"
    assert recorded[0].payload["attempts"] == 2
    assert elapsed < 3.0


def test_pool_pauses_for_retry_after(
    fresh_database: Database, fresh_store: PostgresEventStore, tenant: str
) -> None:
    incident = submit(fresh_database, fresh_store, tenant)[0]
    script = [error(429, "slow down", retry_after="1"), completion(GOOD)]
    with scripted_server(script) as server:
        # One attempt in all: the 429 must not spend it.
        pool = make_pool(fresh_database, fresh_store, server, max_attempts=1)
        assert pool.drain() == 1

    recorded = outcomes(fresh_store, tenant, incident)
    assert [e.event_type for e in recorded] == [REPORT_CLASSIFIED]
    assert recorded[0].payload["provenance"]["classifier"] == "llm"
    assert len(server.request_times) == 2
    assert server.request_times[1] - server.request_times[0] >= 0.9


def test_pool_pause_holds_every_thread(
    fresh_database: Database, fresh_store: PostgresEventStore, tenant: str
) -> None:
    submit(fresh_database, fresh_store, tenant, count=4)
    limited = error(429, "slow down", retry_after="1")
    script = [Reply(status=429, body=limited.body, headers=limited.headers, delay_seconds=0.1)]
    script.append(completion(GOOD))
    with scripted_server(script) as server:
        pool = make_pool(fresh_database, fresh_store, server, concurrency=4)
        seen: list[str] = []
        watcher = threading.Thread(target=lambda: seen.append(_paused_state(pool)))
        watcher.start()
        assert pool.drain() == 4
        watcher.join()

    # The first request was limited; no request was sent in the second that followed it.
    first = server.request_times[0]
    later = [at - first for at in server.request_times[1:]]
    assert all(gap < 0.15 or gap >= 0.9 for gap in later)
    assert "paused" in seen
    assert pool.status().outcomes == {"classified": 4}


def _paused_state(pool: ClassifierPool) -> str:
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if pool.status().state == "paused":
            return "paused"
        time.sleep(0.02)
    return pool.status().state


@pytest.mark.parametrize(
    "reply",
    [
        error(401, "invalid api key", code="invalid_api_key"),
        error(403, "model not allowed"),
        error(429, "You exceeded your current quota", code="insufficient_quota"),
    ],
    ids=["401", "403", "quota"],
)
def test_pool_stops_on_rejected_credentials(
    fresh_database: Database,
    fresh_store: PostgresEventStore,
    tenant: str,
    reply: Reply,
    caplog: pytest.LogCaptureFixture,
) -> None:
    incidents = submit(fresh_database, fresh_store, tenant, count=3)
    with scripted_server([reply]) as server:
        pool = make_pool(fresh_database, fresh_store, server, concurrency=1)
        stopped_before = REGISTRY.get_sample_value("civicpulse_classifier_stopped")
        pool.drain()
        status = pool.status()

    assert stopped_before == 0
    assert REGISTRY.get_sample_value("civicpulse_classifier_stopped") == 1
    errors = [record for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1
    assert str(incidents[0]) in errors[0].getMessage()

    assert status.state == "stopped"
    assert status.reason is not None
    assert f"HTTP {reply.status}" in status.reason
    # Nothing was recorded, every report is still pending, and the pool sends no more requests.
    for incident in incidents:
        assert outcomes(fresh_store, tenant, incident) == []
    assert len(pool.find_pending(10, {})) == 3
    assert len(server.requests) == 1
    assert pool.run_once() == 0


def test_rules_pool_classifies_without_llm(
    fresh_database: Database, fresh_store: PostgresEventStore, tenant: str
) -> None:
    incidents = submit(fresh_database, fresh_store, tenant, count=2)
    pool = make_pool(fresh_database, fresh_store, None)
    assert pool.drain() == 2

    for incident in incidents:
        recorded = outcomes(fresh_store, tenant, incident)
        assert [e.event_type for e in recorded] == [REPORT_CLASSIFIED]
        assert recorded[0].payload["provenance"]["classifier"] == "rules"
        assert recorded[0].payload["category"] == "Pothole"


def test_two_pools_record_one_outcome(
    fresh_database: Database, fresh_store: PostgresEventStore, tenant: str
) -> None:
    incidents = submit(fresh_database, fresh_store, tenant, count=6)
    slow = Reply(body=completion(GOOD).body, delay_seconds=0.2)
    with scripted_server([slow]) as server:
        pools = [make_pool(fresh_database, fresh_store, server, concurrency=6) for _ in range(2)]
        threads = [threading.Thread(target=pool.drain) for pool in pools]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)

    for incident in incidents:
        assert [e.event_type for e in outcomes(fresh_store, tenant, incident)] == [
            REPORT_CLASSIFIED
        ]
    counts: dict[str, int] = {}
    for pool in pools:
        for outcome, count in pool.status().outcomes.items():
            counts[outcome] = counts.get(outcome, 0) + count
    assert counts.get("classified", 0) == 6
    # Claims keep the second pool from asking about a report the first one took.
    assert len(server.requests) == 6


def test_expired_claim_is_taken_over(
    fresh_database: Database, fresh_store: PostgresEventStore, tenant: str
) -> None:
    incident = submit(fresh_database, fresh_store, tenant)[0]
    # A pool that died with a claim: it claimed the report and never recorded an outcome.
    dead = make_pool(fresh_database, fresh_store, None, claim_seconds=60)
    found = dead.find_pending(10, {})
    assert [item.incident_id for item in dead.claim(found)] == [incident]

    live = make_pool(fresh_database, fresh_store, None)
    assert live.drain() == 0
    assert outcomes(fresh_store, tenant, incident) == []

    with fresh_database.connect_owner() as conn:
        conn.execute("UPDATE classification_claims SET expires_at = now() - interval '1 second'")
    assert live.drain() == 1
    assert [e.event_type for e in outcomes(fresh_store, tenant, incident)] == [REPORT_CLASSIFIED]
    # The claim is released once the outcome is recorded.
    with fresh_database.connect_owner() as conn:
        assert conn.execute("SELECT count(*) FROM classification_claims").fetchone() == (0,)


def test_claim_skips_decided_report(
    fresh_database: Database, fresh_store: PostgresEventStore, tenant: str
) -> None:
    submit(fresh_database, fresh_store, tenant)
    late = make_pool(fresh_database, fresh_store, None)
    # `late` read the report as pending, then another pool recorded its outcome.
    found = late.find_pending(10, {})
    assert make_pool(fresh_database, fresh_store, None).drain() == 1

    assert late.claim(found) == []
    with fresh_database.connect_owner() as conn:
        assert conn.execute("SELECT count(*) FROM classification_claims").fetchone() == (0,)


def test_rules_no_match_keeps_category(
    fresh_database: Database, fresh_store: PostgresEventStore, tenant: str
) -> None:
    commands = IncidentCommands(fresh_store)
    report = {"title": "Noise", "description": "Sparking fuse box in the basement"}
    incident = commands.submit(tenant, report, actor=STAFF).incident_id
    catch_up(fresh_database, [incidents_projection()])
    assert make_pool(fresh_database, fresh_store, None).drain() == 1

    recorded = outcomes(fresh_store, tenant, incident)
    assert [e.event_type for e in recorded] == [REPORT_CLASSIFIED]
    assert recorded[0].payload["category"] is None
    assert recorded[0].payload["confidence"] == 0.0
    assert recorded[0].payload["severity"] == "high"
    catch_up(fresh_database, [incidents_projection()])
    with fresh_database.connect_worker() as conn:
        row = conn.execute(
            "SELECT category, severity, classifier FROM incidents WHERE incident_id = %s",
            (incident,),
        ).fetchone()
    assert row == (None, "high", "rules")


def test_pool_skips_tenant_without_categories(
    fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    tenant_id = f"t-{uuid.uuid4().hex[:10]}"
    at = datetime(2026, 1, 1, tzinfo=UTC)
    create_tenant(fresh_store, tenant_id, name="Bare", time_zone="UTC", occurred_at=at)
    incident = submit(fresh_database, fresh_store, tenant_id)[0]

    pool = make_pool(fresh_database, fresh_store, None)
    assert pool.drain() == 0
    assert outcomes(fresh_store, tenant_id, incident) == []


def test_rebuild_reads_recorded_classifications(
    fresh_database: Database, fresh_store: PostgresEventStore, tenant: str
) -> None:
    incidents = submit(fresh_database, fresh_store, tenant, count=3)
    with scripted_server([completion(GOOD)]) as server:
        assert make_pool(fresh_database, fresh_store, server).drain() == 3
    projection = incidents_projection()
    catch_up(fresh_database, [projection])
    with fresh_database.connect_worker() as conn:
        before = projection.read_all(conn)

    # The server is closed: the rebuild reads the recorded classifications.
    with fresh_database.connect_owner() as conn:
        conn.execute("TRUNCATE incidents")
        conn.execute("DELETE FROM projection_checkpoints WHERE projection = 'incidents'")
    catch_up(fresh_database, [projection])
    with fresh_database.connect_worker() as conn:
        after = projection.read_all(conn)

    assert after == before
    for incident in incidents:
        state = after[(tenant, incident)]
        assert state.category == "Streetlight"
        assert state.classifier == "llm"


def test_stopped_pool_shows_in_the_status_endpoint(
    fresh_database: Database, fresh_store: PostgresEventStore, fresh_pool: Any, tenant: str
) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app

    submit(fresh_database, fresh_store, tenant, count=1)
    with scripted_server([error(401, "invalid api key", code="invalid_api_key")]) as server:
        pool = make_pool(fresh_database, fresh_store, server, concurrency=1)
        pool.drain()
    with TestClient(create_app(fresh_database, pool=fresh_pool)) as client:
        shown = client.get("/status").json()["classifier_pools"]
    pool.publish_status(exiting=True)
    with TestClient(create_app(fresh_database, pool=fresh_pool)) as client:
        after_exit = client.get("/status").json()["classifier_pools"]

    assert [entry["pool_id"] for entry in shown] == [pool.pool_id]
    assert shown[0]["state"] == "stopped"
    assert "HTTP 401" in shown[0]["reason"]
    assert shown[0]["current"] is True
    assert after_exit == []
