"""The classifier pool: threads that classify reports without an outcome and record it.

Each report gets at most one outcome from the pool, under a derived event id, so a retry or
a second pool appends nothing new. A pool claims the reports it takes (classification_claims,
with an expiry), so two pools running at once do not both ask a model about one report. The
outcome is a ReportClassified event, or, when the language model fails for good, a
ClassificationFailed event with the reason, followed in the same append by the rule-based
classification when the fallback is on.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from uuid import UUID

import psycopg

from ledger.classification.errors import (
    ClassifierError,
    ClassifierUnavailable,
    InvalidAnswerError,
    RateLimited,
    TransientError,
)
from ledger.classification.llm import LLMClassifier
from ledger.classification.model import Classification
from ledger.classification.rules import ReportText, RuleClassifier
from ledger.database import Database
from ledger.errors import IdempotencyKeyReused
from ledger.events import NewEvent
from ledger.ids import derived_id, incident_stream_id
from ledger.lifecycle import CLASSIFICATION_FAILED, CLASSIFICATION_OUTCOMES, REPORT_CLASSIFIED
from ledger.metrics import (
    CLASSIFICATIONS,
    CLASSIFIER_RATE_LIMITS,
    CLASSIFIER_RETRIES,
    CLASSIFIER_STOPPED,
)
from ledger.routing import routing_event
from ledger.store import PostgresEventStore
from ledger.tenants import TenantConfig, load_tenant

logger = logging.getLogger(__name__)

ATTEMPT_KEY = "automatic"
# Maximum interval between two writes of a running pool's state to classifier_pools.
STATUS_SECONDS = 5.0
# How long a claim on a report lasts unless renewed. A pool renews it before each request to
# the model, so it only runs out when the pool died or waited out a long rate-limit pause.
CLAIM_SECONDS = 300.0
# The role of automated writers in event metadata, as for imports.
METADATA = {"actor": "classifier", "role": "system", "channel": "classifier"}

# Candidates come from the incidents read model, but the events decide, because the read model
# may not have folded an outcome that was just appended.
# NOTE: unclassified incidents of tenants without categories are scanned again at every
# poll, and imported incidents are classified like new ones once their tenant has
# categories (with a model configured, one request each).
PENDING_QUERY = """
    SELECT i.tenant_id, i.incident_id, i.title, i.description, i.address
    FROM incidents i
    WHERE i.classifier IS NULL
      AND NOT (i.tenant_id = ANY(%(skip_tenants)s))
      AND NOT EXISTS (
          SELECT 1 FROM events e
          WHERE e.stream_id = 'incident-' || i.incident_id::text
            AND e.event_type = ANY(%(outcomes)s)
      )
      AND NOT EXISTS (
          SELECT 1 FROM classification_claims c
          WHERE c.tenant_id = i.tenant_id AND c.incident_id = i.incident_id
            AND c.expires_at > now()
      )
    ORDER BY i.submitted_at, i.incident_id
    LIMIT %(limit)s
"""

# A claim is taken when there is none or the one there has expired. Two pools claiming the
# same report at once conflict on the primary key, and only one of them gets it back.
CLAIM_QUERY = """
    INSERT INTO classification_claims (tenant_id, incident_id, pool_id, expires_at)
    SELECT claim.tenant_id, claim.incident_id, %(pool_id)s,
        now() + make_interval(secs => %(seconds)s)
    FROM unnest(%(tenants)s::text[], %(incidents)s::uuid[]) AS claim(tenant_id, incident_id)
    ON CONFLICT (tenant_id, incident_id) DO UPDATE
        SET pool_id = excluded.pool_id, claimed_at = excluded.claimed_at,
            expires_at = excluded.expires_at
        WHERE classification_claims.expires_at <= now()
    RETURNING tenant_id, incident_id
"""

# Claimed reports whose outcome another pool recorded after the pending query read them.
DECIDED_QUERY = """
    SELECT DISTINCT tenant_id, substr(stream_id, 10)::uuid FROM events
    WHERE stream_id = ANY(%(streams)s) AND event_type = ANY(%(outcomes)s)
"""


@dataclass(frozen=True, slots=True)
class PendingReport:
    tenant_id: str
    incident_id: UUID
    report: ReportText


@dataclass(frozen=True, slots=True)
class ClassifierStatus:
    """The pool state, for the status endpoint and the logs."""

    state: str  # "running", "paused" (after a 429) or "stopped" (credentials or quota)
    classifier: str  # "llm" or "rules"
    reason: str | None = None
    paused_until: datetime | None = None
    outcomes: dict[str, int] = field(default_factory=dict)


class ClassifierPool:
    """Classify pending reports with `concurrency` threads until stopped.

    With `llm` None, the rules decide. Timeouts and 5xx responses are tried `max_attempts`
    times in all, with a backoff that doubles from `backoff_seconds`. A 429 pauses every
    thread for its Retry-After time and does not count as an attempt. Rejected credentials or
    an exhausted quota stop the pool: the reports stay pending, and `status()` gives the
    reason.
    """

    def __init__(
        self,
        database: Database,
        store: PostgresEventStore,
        *,
        llm: LLMClassifier | None = None,
        fallback_to_rules: bool = True,
        concurrency: int = 4,
        max_attempts: int = 3,
        backoff_seconds: float = 0.5,
        poll_seconds: float = 1.0,
        claim_seconds: float = CLAIM_SECONDS,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency = {concurrency} must be at least 1")
        if max_attempts < 1:
            raise ValueError(f"max_attempts = {max_attempts} must be at least 1")
        if claim_seconds <= 0:
            raise ValueError(f"claim_seconds = {claim_seconds} must be positive")
        self.database = database
        self.store = store
        self.llm = llm
        self.fallback_to_rules = fallback_to_rules
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self.poll_seconds = poll_seconds
        self.claim_seconds = claim_seconds
        self.clock = clock
        self.stop_event = threading.Event()
        self._lock = threading.Lock()
        self._resume_at = 0.0  # time.monotonic() value before which no request is sent
        self._stopped_reason: str | None = None
        self._outcomes: dict[str, int] = {}
        self._thread: threading.Thread | None = None
        self.pool_id = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._started_at = clock()
        self._published_at = -STATUS_SECONDS
        self._told_uncategorized: set[str] = set()
        # One pool runs per process, and a new one starts unstopped.
        CLASSIFIER_STOPPED.set(0)

    # Status

    def status(self) -> ClassifierStatus:
        with self._lock:
            wait = self._resume_at - time.monotonic()
            outcomes = dict(self._outcomes)
            reason = self._stopped_reason
        classifier = "llm" if self.llm is not None else "rules"
        if reason is not None:
            return ClassifierStatus("stopped", classifier, reason, outcomes=outcomes)
        if wait > 0:
            until = self.clock() + timedelta(seconds=wait)
            return ClassifierStatus("paused", classifier, paused_until=until, outcomes=outcomes)
        return ClassifierStatus("running", classifier, outcomes=outcomes)

    def publish_status(self, *, exiting: bool = False) -> None:
        """Write the pool's state to `classifier_pools`, where GET /status reads it.

        A failure to write is logged and otherwise ignored: the state is for display.
        """
        status = self.status()
        self._published_at = time.monotonic()
        try:
            with self.database.connect_worker() as conn:
                conn.execute(
                    """
                    INSERT INTO classifier_pools (pool_id, classifier, state, reason,
                        paused_until, started_at, updated_at)
                    VALUES (%s, %s, %s, %s, %s, %s, now())
                    ON CONFLICT (pool_id) DO UPDATE SET state = excluded.state,
                        reason = excluded.reason, paused_until = excluded.paused_until,
                        updated_at = now()
                    """,
                    (
                        self.pool_id,
                        status.classifier,
                        "exited" if exiting else status.state,
                        status.reason,
                        status.paused_until,
                        self._started_at,
                    ),
                )
        except psycopg.Error as error:
            logger.warning("classifier pool %s could not record its state: %s", self.pool_id, error)

    @property
    def stopped(self) -> bool:
        with self._lock:
            return self._stopped_reason is not None

    # Running

    def start(self) -> None:
        """Run the pool in a background thread until `stop` is called."""
        self._thread = threading.Thread(target=self.run_forever, name="classifier", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_forever(self) -> None:
        logger.info(
            "classifier pool started: %s classifier, %d threads",
            "llm" if self.llm is not None else "rules",
            self.concurrency,
        )
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="classify") as executor:
            while not self.stop_event.is_set():
                try:
                    handled = self.run_once(executor)
                except Exception:
                    # NOTE: a lost database connection lands here too; the pool waits one
                    # poll interval and tries again.
                    logger.exception("classifier pool batch failed; retrying after a pause")
                    handled = 0
                if time.monotonic() - self._published_at >= STATUS_SECONDS:
                    self.publish_status()
                if not handled or self.stopped:
                    self.stop_event.wait(self.poll_seconds)
        self.publish_status(exiting=True)
        logger.info("classifier pool stopped")

    def run_once(self, executor: ThreadPoolExecutor | None = None) -> int:
        """Classify one batch of pending reports and return how many were handled.

        Returns 0 without reading anything while the pool is stopped.
        """
        if self.stopped:
            return 0
        tenants: dict[str, TenantConfig | None] = {}
        found = self.find_pending(self.concurrency * 4, tenants)
        if not found:
            return 0
        pending = self.claim(found)
        if not pending:
            # Other pools took every report found; they count as handled, so that the pool
            # looks again at once rather than after a poll interval.
            return len(found)
        if executor is None:
            with ThreadPoolExecutor(self.concurrency, thread_name_prefix="classify") as own:
                list(own.map(lambda item: self._handle(item, tenants), pending))
        else:
            list(executor.map(lambda item: self._handle(item, tenants), pending))
        return len(found)

    def drain(self, max_batches: int = 1000) -> int:
        """Run batches until none is pending or the pool stops; return the number handled."""
        total = 0
        for _ in range(max_batches):
            handled = self.run_once()
            if not handled or self.stopped:
                break
            total += handled
        return total

    def find_pending(
        self, limit: int, tenants: dict[str, TenantConfig | None]
    ) -> list[PendingReport]:
        """Read up to `limit` reports without an outcome, skipping tenants with no categories.

        `tenants` is filled with the configuration of each tenant seen.
        """
        skip: list[str] = []
        while True:
            with self.database.connect_worker() as conn:
                rows = conn.execute(
                    PENDING_QUERY,
                    {
                        "skip_tenants": skip,
                        "outcomes": list(CLASSIFICATION_OUTCOMES),
                        "limit": limit,
                    },
                ).fetchall()
            unknown = {row[0] for row in rows} - set(tenants)
            for tenant_id in unknown:
                tenants[tenant_id] = load_tenant(self.store, tenant_id)
            without = {
                row[0] for row in rows if not (config := tenants[row[0]]) or not config.categories
            }
            if not without:
                return [
                    PendingReport(tenant_id, incident_id, ReportText(title, description, address))
                    for tenant_id, incident_id, title, description, address in rows
                ]
            for tenant_id in without - set(skip) - self._told_uncategorized:
                # Once per tenant and pool: the same tenants come back at every poll.
                logger.info("tenant %s has no categories; its reports stay unclassified", tenant_id)
                self._told_uncategorized.add(tenant_id)
            skip.extend(without)

    # Claims

    def claim(self, found: list[PendingReport]) -> list[PendingReport]:
        """Claim the reports found and return those this pool got and still has to classify."""
        with self.database.connect_worker() as conn:
            claimed = {
                (tenant_id, incident_id)
                for tenant_id, incident_id in conn.execute(
                    CLAIM_QUERY,
                    {
                        "pool_id": self.pool_id,
                        "seconds": self.claim_seconds,
                        "tenants": [item.tenant_id for item in found],
                        "incidents": [item.incident_id for item in found],
                    },
                )
            }
        if not claimed:
            return []
        with self.database.connect_worker() as conn:
            decided = set(
                conn.execute(
                    DECIDED_QUERY,
                    {
                        "streams": [incident_stream_id(incident) for _, incident in claimed],
                        "outcomes": list(CLASSIFICATION_OUTCOMES),
                    },
                ).fetchall()
            )
        mine = [item for item in found if (item.tenant_id, item.incident_id) in claimed]
        for item in mine:
            if (item.tenant_id, item.incident_id) in decided:
                self.release(item)
        return [item for item in mine if (item.tenant_id, item.incident_id) not in decided]

    def renew(self, item: PendingReport) -> bool:
        """Extend this pool's claim on a report; return False when the claim was lost."""
        with self.database.connect_worker() as conn:
            renewed = conn.execute(
                """
                UPDATE classification_claims
                SET expires_at = now() + make_interval(secs => %s)
                WHERE tenant_id = %s AND incident_id = %s AND pool_id = %s
                """,
                (self.claim_seconds, item.tenant_id, item.incident_id, self.pool_id),
            ).rowcount
        return renewed == 1

    def release(self, item: PendingReport) -> None:
        """Drop this pool's claim on a report, recorded or not."""
        with self.database.connect_worker() as conn:
            conn.execute(
                "DELETE FROM classification_claims "
                "WHERE tenant_id = %s AND incident_id = %s AND pool_id = %s",
                (item.tenant_id, item.incident_id, self.pool_id),
            )

    # One report

    def _handle(self, item: PendingReport, tenants: dict[str, TenantConfig | None]) -> None:
        config = tenants[item.tenant_id]
        assert config is not None
        try:
            self._classify_and_record(item, config)
        except Exception:
            logger.exception(
                "classifying incident %s of tenant %s failed; it stays pending",
                item.incident_id,
                item.tenant_id,
            )
        finally:
            try:
                self.release(item)
            except psycopg.Error as error:
                # The claim runs out by itself; until then no other pool takes the report.
                logger.warning(
                    "could not release the claim on incident %s of tenant %s: %s",
                    item.incident_id,
                    item.tenant_id,
                    error,
                )

    def _classify_and_record(self, item: PendingReport, config: TenantConfig) -> None:
        rules = RuleClassifier(config.categories, config.hazard_words)
        if self.llm is None:
            self._record(
                item, [self._classified_event(item, rules.classify(item.report))], "classified"
            )
            return

        attempts = 0
        while True:
            if not self._wait_until_resumed():
                return  # stopping: the report stays pending
            if not self.renew(item):
                logger.warning(
                    "the claim on incident %s of tenant %s ran out and another pool took it; "
                    "leaving the report to that pool",
                    item.incident_id,
                    item.tenant_id,
                )
                return
            attempts += 1
            try:
                result = self.llm.classify(item.report, config.categories)
            except RateLimited as error:
                attempts -= 1
                self._pause(item, error)
                continue
            except ClassifierUnavailable as error:
                self._stop_for(item, error)
                return
            except TransientError as error:
                if attempts < self.max_attempts:
                    delay = self.backoff_seconds * 2 ** (attempts - 1)
                    logger.warning(
                        "classifying incident %s of tenant %s: %s; attempt %d of %d, "
                        "retrying in %.2f s",
                        item.incident_id,
                        item.tenant_id,
                        error.reason,
                        attempts,
                        self.max_attempts,
                        delay,
                    )
                    CLASSIFIER_RETRIES.inc()
                    if self.stop_event.wait(delay):
                        return
                    continue
                self._record_failure(item, rules, error, attempts)
                return
            except InvalidAnswerError as error:
                self._record_failure(item, rules, error, attempts)
                return
            self._record(item, [self._classified_event(item, result)], "classified")
            return

    def _record_failure(
        self, item: PendingReport, rules: RuleClassifier, error: ClassifierError, attempts: int
    ) -> None:
        logger.warning(
            "classifying incident %s of tenant %s failed after %d attempt(s): %s",
            item.incident_id,
            item.tenant_id,
            attempts,
            error.reason,
        )
        failed = NewEvent(
            CLASSIFICATION_FAILED,
            {"reason": error.reason, "classifier": "llm", "attempts": attempts},
            self.clock(),
            event_id=derived_id(
                item.tenant_id, str(item.incident_id), "classification", ATTEMPT_KEY, "failed"
            ),
            metadata=METADATA,
        )
        if not self.fallback_to_rules:
            self._record(item, [failed], "failed")
            return
        fallback = rules.classify(item.report)
        self._record(item, [failed, self._classified_event(item, fallback)], "fallback")

    def _classified_event(self, item: PendingReport, result: Classification) -> NewEvent:
        return NewEvent(
            REPORT_CLASSIFIED,
            result.model_dump(mode="json"),
            self.clock(),
            event_id=derived_id(
                item.tenant_id, str(item.incident_id), "classification", ATTEMPT_KEY
            ),
            metadata=METADATA,
        )

    def _record(self, item: PendingReport, events: list[NewEvent], outcome: str) -> None:
        stream_id = incident_stream_id(item.incident_id)
        routed = self._routing(item, events)
        if routed is not None:
            events = [*events, routed]
        try:
            # No expected version: the outcome may follow any lifecycle event, and its derived
            # id keeps a second append of the same outcome out.
            result = self.store.append(item.tenant_id, stream_id, events, expected_version=None)
            if result.replayed:
                outcome = "duplicate"
        except IdempotencyKeyReused:
            # NOTE: with the fallback off, a failure recorded by one pool and a result
            # recorded by another have different ids, and both are kept.
            # Another pool recorded a different result for this report first, so that one is kept.
            logger.info(
                "incident %s of tenant %s already has a classification outcome; kept it",
                item.incident_id,
                item.tenant_id,
            )
            outcome = "duplicate"
        CLASSIFICATIONS.labels(outcome).inc()
        with self._lock:
            self._outcomes[outcome] = self._outcomes.get(outcome, 0) + 1

    def _routing(self, item: PendingReport, events: list[NewEvent]) -> NewEvent | None:
        """Return the event routing the report to the department of its new category."""
        classified = [event for event in events if event.event_type == REPORT_CLASSIFIED]
        if not classified:
            return None
        config = load_tenant(self.store, item.tenant_id)
        if config is None:
            return None
        history = self.store.read_stream(item.tenant_id, incident_stream_id(item.incident_id))
        if not history:
            return None
        return routing_event(
            config,
            history,
            classified[-1].payload.get("category"),
            cause=str(classified[-1].event_id),
            occurred_at=classified[-1].occurred_at,
        )

    # Pausing and stopping

    def _wait_until_resumed(self) -> bool:
        """Wait out a pause; return False when the pool is stopping or stopped."""
        while True:
            with self._lock:
                if self._stopped_reason is not None:
                    return False
                delay = self._resume_at - time.monotonic()
            if delay <= 0:
                return not self.stop_event.is_set()
            if self.stop_event.wait(delay):
                return False

    def _pause(self, item: PendingReport, error: RateLimited) -> None:
        logger.warning(
            "classifying incident %s of tenant %s: %s; pausing the pool for %.1f s",
            item.incident_id,
            item.tenant_id,
            error.reason,
            error.retry_after,
        )
        CLASSIFIER_RATE_LIMITS.inc()
        with self._lock:
            self._resume_at = max(self._resume_at, time.monotonic() + error.retry_after)

    def _stop_for(self, item: PendingReport, error: ClassifierUnavailable) -> None:
        logger.error(
            "classifying incident %s of tenant %s: %s; the classifier pool stops and reports "
            "stay pending until it is restarted with working credentials",
            item.incident_id,
            item.tenant_id,
            error.reason,
        )
        CLASSIFIER_STOPPED.set(1)
        with self._lock:
            first = self._stopped_reason is None
            if first:
                self._stopped_reason = error.reason
        if first:
            self.publish_status()
