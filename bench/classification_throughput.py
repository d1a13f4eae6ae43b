"""Classifier pool throughput against a language-model server with a fixed delay.

Into a fresh database it submits N reports (96 by default) for each concurrency level
(1, 8 and 32 threads by default), each level on its own tenant, then times the pool while
it classifies them against a scripted OpenAI-compatible server on 127.0.0.1 that answers
every request after a fixed delay (200 ms by default). The pool waits on the network, so
with enough reports the throughput should grow with the number of threads until the
database or the server limits it: about concurrency / delay reports per second.

    python bench/classification_throughput.py [--reports N] [--delay-ms MS] [--levels 1,8,32]

DATABASE_URL selects the server; without it an embedded server is started.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _databases import fresh_database, server  # noqa: E402

from ledger.classification.llm import LLMClassifier  # noqa: E402
from ledger.classification.pool import ClassifierPool  # noqa: E402
from ledger.commands import Actor, IncidentCommands  # noqa: E402
from ledger.database import Database  # noqa: E402
from ledger.store import PostgresEventStore  # noqa: E402
from ledger.tenants import configure_categories, create_tenant  # noqa: E402
from projections.incidents import incidents_projection  # noqa: E402
from projections.runtime import catch_up  # noqa: E402
from tests.ledger.classification.fake_llm import Reply, completion, scripted_server  # noqa: E402

CATEGORIES = {
    "categories": [
        {"name": "Pothole", "keywords": ["pothole"]},
        {"name": "Streetlight", "keywords": ["streetlight", "lamp"]},
    ]
}
ANSWER = {
    "category": "Streetlight",
    "severity": "low",
    "fields": {"location_text": None, "asset": "streetlight", "hazards": []},
    "summary": "Streetlight out",
    "language": "en",
    "confidence": 0.9,
}


def submit_reports(database: Database, store: PostgresEventStore, tenant: str, count: int) -> None:
    at = datetime.now(UTC)
    create_tenant(store, tenant, name=tenant, time_zone="UTC", occurred_at=at)
    configure_categories(store, tenant, CATEGORIES, occurred_at=at)
    commands = IncidentCommands(store)
    actor = Actor("bench", "staff")
    for number in range(count):
        report = {"title": f"Lamp {number} out", "description": "The streetlight is dark"}
        commands.submit(tenant, report, actor=actor)
    # The projector applies an event only once every older transaction on the server has
    # ended, so wait until the read model shows every report.
    while True:
        catch_up(database, [incidents_projection()])
        with database.connect_worker() as conn:
            row = conn.execute(
                "SELECT count(*) FROM incidents WHERE tenant_id = %s", (tenant,)
            ).fetchone()
        if row is not None and row[0] == count:
            return
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=96, help="reports per level")
    parser.add_argument("--delay-ms", type=int, default=200, help="server delay per request")
    parser.add_argument("--levels", default="1,8,32", help="comma-separated thread counts")
    args = parser.parse_args()
    levels = [int(level) for level in args.levels.split(",")]

    conninfo = server()
    name, database = fresh_database(conninfo)
    reply = Reply(body=completion(json.dumps(ANSWER)).body, delay_seconds=args.delay_ms / 1000)
    results: list[dict[str, Any]] = []
    try:
        with (
            ConnectionPool(database.worker_conninfo, min_size=1, max_size=40) as pool,
            scripted_server([reply]) as llm_server,
        ):
            store = PostgresEventStore(pool)
            for level in levels:
                tenant = f"bench-{level}"
                submit_reports(database, store, tenant, args.reports)
                classifier = LLMClassifier(
                    base_url=llm_server.base_url, api_key="bench", model="bench", timeout_seconds=30
                )
                classifier_pool = ClassifierPool(database, store, llm=classifier, concurrency=level)
                started = time.perf_counter()
                handled = classifier_pool.drain()
                elapsed = time.perf_counter() - started
                classifier.close()
                results.append(
                    {
                        "concurrency": level,
                        "reports": handled,
                        "seconds": round(elapsed, 2),
                        "reports_per_second": round(handled / elapsed, 1),
                        "ideal_per_second": round(level / (args.delay_ms / 1000), 1),
                    }
                )
                print(json.dumps(results[-1]), flush=True)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


if __name__ == "__main__":
    main()
