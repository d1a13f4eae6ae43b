"""SLA fold benchmark: the cost of business-time policies against the report's own targets.

Folds the same synthetic histories (report, acknowledge, a pause, resolve, close) three
ways, in memory, side by side in one run:

- own: each report carries its own resolution target, as imported city cases do;
- calendar: a policy with calendar-hour targets;
- business: a policy with business-hour targets on an office calendar with holidays.

    python bench/sla_fold.py [--incidents N] [--rounds N]

No database is needed: this measures the fold, not the projector's reads and writes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ledger import lifecycle as lc  # noqa: E402
from projections.sla import sla_projection  # noqa: E402
from tests.projections.sla_log import Log  # noqa: E402

T0 = datetime(2026, 1, 5, 14, tzinfo=UTC)
POLICIES = {
    "calendar": {
        "id": "flat",
        "first_response": "4 calendar hours",
        "resolution": "3 calendar days",
    },
    "business": {
        "id": "office",
        "calendar": "office",
        "first_response": "4 business hours",
        "resolution": "3 business days",
    },
}


def history(kind: str, incidents: int) -> Log:
    log = Log()
    log.create_tenant(T0 - timedelta(days=1))
    if kind != "own":
        log.policies(T0 - timedelta(hours=1), POLICIES[kind])
    for number in range(incidents):
        at = T0 + timedelta(minutes=7 * number)
        payload = {"source": "bench", "resolution_due_at": (at + timedelta(days=3)).isoformat()}
        incident = log.submit(at, **(payload if kind == "own" else {}))
        log.incident(incident, lc.INCIDENT_ACKNOWLEDGED, at + timedelta(hours=1))
        log.incident(incident, lc.INFORMATION_REQUESTED, at + timedelta(hours=2))
        log.incident(incident, lc.REPORTER_RESPONDED, at + timedelta(hours=20))
        log.incident(incident, lc.INCIDENT_RESOLVED, at + timedelta(hours=30))
        log.incident(incident, lc.INCIDENT_CLOSED, at + timedelta(hours=31))
    return log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--incidents", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    logs = {kind: history(kind, args.incidents) for kind in ("own", "calendar", "business")}
    timings: dict[str, list[float]] = {kind: [] for kind in logs}
    for _ in range(args.rounds):
        # Interleaved, so that load on the machine affects the three alike.
        for kind, log in logs.items():
            started = time.perf_counter()
            states = sla_projection().fold(log.events)
            timings[kind].append(time.perf_counter() - started)
            assert len(states) == args.incidents
    events = len(logs["own"].events)
    base = statistics.median(timings["own"])
    print(f"{args.incidents} incidents, about {events} events each way, {args.rounds} rounds")
    for kind, values in timings.items():
        median = statistics.median(values)
        print(
            f"{kind:>9}: {median:7.3f} s median, {len(logs[kind].events) / median:9.0f} events/s, "
            f"{median / base:5.2f}x own"
        )


if __name__ == "__main__":
    main()
