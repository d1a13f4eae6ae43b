"""Prometheus metrics, shared by the API, the projector, the scheduler and imports.

Labels never carry tenant ids or other unbounded values, so the number of series stays
fixed however many tenants and incidents there are.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

HTTP_REQUESTS = Counter(
    "civicpulse_http_requests_total",
    "HTTP requests answered, by method, route template and status code",
    ["method", "route", "status"],
)
HTTP_DURATION = Histogram(
    "civicpulse_http_request_duration_seconds",
    "Time from receiving a request to sending its last byte, by method and route template",
    ["method", "route"],
)
EVENTS_APPENDED = Counter(
    "civicpulse_events_appended_total",
    "Events appended through the event store (imports are counted in import rows)",
    ["event_type"],
)
APPEND_CONFLICTS = Counter(
    "civicpulse_append_conflicts_total",
    "Appends rejected because the stream was not at the expected version",
)
APPEND_REPLAYS = Counter(
    "civicpulse_append_replays_total",
    "Appends answered with the stored result of an earlier request with the same ids",
)
# With several API worker processes (prometheus_client's multiprocess mode), the value of
# the worker that measured last is shown.
PROJECTION_LAG = Gauge(
    "civicpulse_projection_lag_events",
    "Committed events beyond the projection's checkpoint, as last measured by this process",
    ["projection"],
    multiprocess_mode="mostrecent",
)
PROJECTION_EVENTS = Counter(
    "civicpulse_projection_events_applied_total",
    "Events applied to a read model by this process",
    ["projection"],
)
PROJECTION_FAILURES = Counter(
    "civicpulse_projection_failures_total",
    "Projection batches rolled back because of an error",
    ["projection"],
)
IMPORT_ROWS = Counter(
    "civicpulse_import_rows_total",
    "Rows of city exports read by imports, by outcome (accepted, rejected)",
    ["outcome"],
)
IMPORT_EVENTS = Counter(
    "civicpulse_import_events_appended_total",
    "Events appended by imports; events already present from an earlier import are not counted",
)
SCHEDULER_RUNS = Counter(
    "civicpulse_scheduler_runs_total",
    "Scheduled job runs, by job and outcome (ok, failed)",
    ["job", "outcome"],
)
CLASSIFICATIONS = Counter(
    "civicpulse_classifications_total",
    "Classification outcomes recorded by the classifier pool, by outcome (classified, fallback, "
    "failed, duplicate)",
    ["outcome"],
)
CLASSIFIER_RETRIES = Counter(
    "civicpulse_classifier_retries_total",
    "Language-model requests repeated after a timeout, a lost connection or a 5xx answer",
)
CLASSIFIER_RATE_LIMITS = Counter(
    "civicpulse_classifier_rate_limits_total",
    "429 answers that paused the classifier pool",
)
CLASSIFIER_STOPPED = Gauge(
    "civicpulse_classifier_stopped",
    "1 while the classifier pool is stopped by rejected credentials or an exhausted quota",
    multiprocess_mode="max",
)
GROUP_COMMIT_BATCH_SIZE = Histogram(
    "civicpulse_group_commit_batch_size",
    "Units of work (appends) committed together in one transaction by the group committer",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
GROUP_COMMIT_FAILURES = Counter(
    "civicpulse_group_commit_failures_total",
    "Group-commit batches whose COMMIT failed or whose connection broke, storing none of them",
)


def metrics_text() -> tuple[bytes, str]:
    """Return the metrics exposition and its content type.

    When PROMETHEUS_MULTIPROC_DIR is set, as `civicpulse serve --workers N` sets it for its
    workers, the figures are summed over every process that wrote to that directory, so a
    scrape shows the whole server whichever worker handles it.
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
