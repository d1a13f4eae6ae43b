from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from ledger.database import Database
from ledger.demo import seed_demo
from ledger.store import PostgresEventStore
from tests.conftest import project_everything

END = datetime(2026, 3, 20, tzinfo=UTC)
NEW_YORK = ZoneInfo("America/New_York")


def test_demo_incidents_get_business_time_policies(
    fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    seed_demo(fresh_store, "demo", incidents=40, seed=3, end=END)
    project_everything(fresh_database)
    with fresh_database.connect_worker() as conn:
        rows = conn.execute(
            "SELECT category, policy_id, resolution_due_at, resolution_warning_at "
            "FROM incident_sla WHERE tenant_id = 'demo'"
        ).fetchall()

    assert len(rows) == 40
    for category, policy, due, warning in rows:
        expected = "emergency" if category in ("No heat", "Water leak") else "standard"
        assert policy == expected, category
        assert warning < due
        if policy == "standard":
            local = due.astimezone(NEW_YORK)
            # Business due times fall inside city-hall hours on a weekday.
            assert local.weekday() < 5
            assert 8 <= local.hour + local.minute / 60 <= 17
