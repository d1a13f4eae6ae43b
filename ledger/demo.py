"""A generator of realistic reports and lifecycles for a demo tenant.

It drives the real command handlers with a simulated clock, so every demo event went
through the same decisions as a request to the API would.
"""

from __future__ import annotations

import logging
import os
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from ledger.commands import Actor, IncidentCommands
from ledger.config_sections import apply_config
from ledger.errors import AuthenticationFailed, TenantExists
from ledger.keys import Role, authenticate, issue_key
from ledger.store import PostgresEventStore
from ledger.tenants import create_tenant, load_tenant

logger = logging.getLogger(__name__)

# (category, department, resolution target in hours, typical descriptions)
CATEGORIES: list[tuple[str, str, float, list[str]]] = [
    (
        "Pothole",
        "Public Works",
        72,
        [
            "Deep pothole in the right lane, cars swerving around it",
            "Pothole opened up again after last week's patch",
        ],
    ),
    (
        "Streetlight outage",
        "Public Works",
        120,
        [
            "Streetlight out at the corner, the block is completely dark",
            "Light flickers on and off all night",
        ],
    ),
    (
        "Graffiti",
        "Parks",
        168,
        [
            "Graffiti sprayed on the playground wall",
            "Tags on the bus shelter glass",
        ],
    ),
    (
        "Missed trash pickup",
        "Sanitation",
        48,
        [
            "Trash was not collected on our scheduled day",
            "Recycling bins left full for the second week",
        ],
    ),
    (
        "No heat",
        "Housing",
        24,
        [
            "Radiators cold since yesterday evening in apartment 4B",
            "Building has no heat and there are children and elderly tenants",
        ],
    ),
    (
        "Water leak",
        "Water and Sewer",
        12,
        [
            "Water bubbling up through the sidewalk",
            "Leak from the ceiling in the corridor on the second floor",
        ],
    ),
]
# The demo's business calendar and SLA policies: emergencies run on calendar time, the
# rest on city-hall hours.
DEMO_CONFIG: dict[str, Any] = {
    "calendars": [
        {
            "name": "city-hall",
            "time_zone": "America/New_York",
            "weekly_hours": {
                day: ["08:00-12:00", "13:00-17:00"]
                for day in ("monday", "tuesday", "wednesday", "thursday", "friday")
            },
            "holidays": [
                "2026-01-01",
                "2026-01-19",
                "2026-02-16",
                "2026-05-25",
                "2026-07-03",
                "2026-09-07",
                "2026-11-26",
                "2026-12-25",
            ],
        }
    ],
    "sla_policies": [
        {
            "id": "emergency",
            "match": {"categories": ["No heat", "Water leak"]},
            "first_response": "1 calendar hours",
            "resolution": "24 calendar hours",
            "on_reopen": "restart",
        },
        {
            "id": "standard",
            "calendar": "city-hall",
            "first_response": "4 business hours",
            "resolution": "5 business days",
        },
    ],
}
STREETS = ["Main St", "Elm St", "Harbor Ave", "Union Sq", "Oak Rd", "Station Pl", "Park Ln"]
STAFF = ["j.alvarez", "m.chen", "r.okafor", "s.kowalski", "t.nguyen"]


def seed_demo(
    store: PostgresEventStore,
    tenant_id: str = "demo",
    *,
    incidents: int = 300,
    days: int = 60,
    seed: int = 2015,
    end: datetime | None = None,
) -> int:
    """Create the demo tenant and `incidents` reports with lifecycles; return events appended.

    Does nothing when the tenant exists already, so `civicpulse run` can call it every time.
    """
    if load_tenant(store, tenant_id) is not None:
        return 0
    rng = random.Random(seed)
    end = end or datetime.now(UTC)
    start = end - timedelta(days=days)
    clock_value = [start]

    def clock() -> datetime:
        return clock_value[0]

    try:
        create_tenant(
            store,
            tenant_id,
            name="Demo City",
            time_zone="America/New_York",
            occurred_at=start,
            resolution_hours=72,
            category_resolution_hours={name: hours for name, _, hours, _ in CATEGORIES},
        )
    except TenantExists:
        return 0
    apply_config(store, tenant_id, DEMO_CONFIG, occurred_at=start, actor="demo")
    commands = IncidentCommands(store, clock=clock)
    resident = Actor("resident", "reporter", "web")
    appended = 0
    for number in range(incidents):
        category, department, hours, texts = rng.choice(CATEGORIES)
        opened = start + timedelta(seconds=rng.uniform(0, days * 86400))
        clock_value[0] = opened
        result = commands.submit(
            tenant_id,
            {
                "category": category,
                "department": department,
                "description": rng.choice(texts),
                "address": f"{rng.randint(1, 400)} {rng.choice(STREETS)}",
                "latitude": round(42.33 + rng.uniform(-0.03, 0.03), 5),
                "longitude": round(-71.06 + rng.uniform(-0.04, 0.04), 5),
                "source_channel": rng.choice(["web", "phone", "app", "walk-in"]),
            },
            actor=resident,
            idempotency_key=f"demo-{seed}-{number}",
        )
        appended += 1
        appended += _lifecycle(
            commands, rng, tenant_id, result.incident_id, hours, end, clock_value, department
        )
    logger.info(
        "seeded demo tenant %s with %d incidents, %d events", tenant_id, incidents, appended
    )
    return appended


def _lifecycle(
    commands: IncidentCommands,
    rng: random.Random,
    tenant_id: str,
    incident_id: UUID,
    target_hours: float,
    end: datetime,
    clock_value: list[datetime],
    department: str,
) -> int:
    """Walk one incident through a plausible lifecycle, stopping at `end`."""
    staff = Actor(rng.choice(STAFF), "staff", "api")
    # Each step: (command, arguments, delay in hours as a fraction of the target).
    steps: list[tuple[str, dict[str, str], float]] = [("acknowledge", {}, 0.05)]
    roll = rng.random()
    if roll < 0.06:
        steps.append(
            (
                "reject",
                {
                    "reason": "Private property, not a city asset",
                    "redirect_to": "the property manager",
                },
                0.1,
            )
        )
    else:
        steps.append(("assign", {"assignee": staff.name, "department": department}, 0.1))
        if rng.random() < 0.15:
            steps.append(
                (
                    "request-information",
                    {"question": "Can you tell us the nearest cross street?"},
                    0.1,
                )
            )
            steps.append(("reporter-responded", {"response": "It is near the library."}, 0.4))
        steps.append(("start-work", {}, 0.2))
        steps.append(("resolve", {"note": "Repaired by the field crew"}, rng.uniform(0.2, 1.4)))
        if rng.random() < 0.08:
            steps.append(("reopen", {"reason": "Reporter says the problem came back"}, 0.3))
            steps.append(("resolve", {"note": "Repaired again"}, 0.5))
        steps.append(("close", {}, 0.2))

    appended = 0
    for command, args, fraction in steps:
        moment = clock_value[0] + timedelta(hours=target_hours * fraction)
        if moment > end:
            break
        clock_value[0] = moment
        commands.execute(tenant_id, incident_id, command, args, actor=staff, expected_version=None)
        appended += 1
    return appended


DEMO_KEY_FILE = "demo-staff.key"


def ensure_demo_key(store: PostgresEventStore, path: Path, tenant_id: str = "demo") -> str:
    """Return a working staff key of the demo tenant, kept in `path` (mode 0600).

    A key in the file that no longer works (revoked, or from a database since reset) is
    replaced by a new one.
    """
    if path.is_file():
        token = path.read_text().strip()
        with store.pool.connection() as conn:
            try:
                principal = authenticate(conn, token)
            except AuthenticationFailed:
                principal = None
        if principal is not None and principal.tenant_id == tenant_id:
            return token
    _, token = issue_key(store, tenant_id, role=Role.STAFF, name="demo staff", issued_by="demo")
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(token + "\n")
    logger.info("issued a demo staff key into %s", path)
    return token
