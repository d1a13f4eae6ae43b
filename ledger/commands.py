"""Command handling: validate, decide against the current state, append."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from ledger.database import set_tenant
from ledger.errors import CommandInvalid, ConcurrencyError, IncidentNotFound
from ledger.events import NewEvent, canonical_json
from ledger.ids import derived_id, incident_stream_id, new_id
from ledger.lifecycle import REPORT_SUBMITTED, IncidentState, decide, fold_incident
from ledger.store import AppendResult, PostgresEventStore, find_stored
from ledger.tenants import require_tenant

logger = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Actor:
    """The issuer of a command, recorded in each event's metadata."""

    name: str
    role: str
    channel: str = "api"
    key_id: UUID | None = None


@dataclass(frozen=True, slots=True)
class CommandResult:
    incident_id: UUID
    append: AppendResult


def request_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(body)).hexdigest()


def _metadata(
    actor: Actor, idempotency_key: str | None, body: dict[str, Any], correlation_id: str | None
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "actor": actor.name,
        "role": actor.role,
        "channel": actor.channel,
        "request_hash": request_hash(body),
    }
    if actor.key_id is not None:
        metadata["actor_id"] = str(actor.key_id)
    if idempotency_key is not None:
        metadata["idempotency_key"] = idempotency_key
    if correlation_id is not None:
        metadata["correlation_id"] = correlation_id
    return metadata


class IncidentCommands:
    """Submits reports and runs lifecycle commands for one store."""

    def __init__(self, store: PostgresEventStore, *, clock: Clock = utc_now) -> None:
        self.store = store
        self.clock = clock

    def submit(
        self,
        tenant_id: str,
        report: dict[str, Any],
        *,
        actor: Actor,
        idempotency_key: str | None = None,
        correlation_id: str | None = None,
    ) -> CommandResult:
        """Append a ReportSubmitted event to a new incident stream.

        With an idempotency key, the incident id and event id derive from it, so a retry of
        the same request returns the first incident instead of making a second one.
        """
        tenant = require_tenant(self.store, tenant_id)
        now = self.clock()
        if idempotency_key is not None:
            incident_id = derived_id(tenant_id, "submit", idempotency_key)
            event_id = derived_id(tenant_id, "submit-event", idempotency_key)
        else:
            incident_id = new_id()
            event_id = new_id()

        category = report.get("category")
        payload = {key: value for key, value in report.items() if value is not None}
        payload["incident_id"] = str(incident_id)
        payload["first_response_due_at"] = (
            now + timedelta(hours=tenant.first_response_hours)
        ).isoformat()
        payload["resolution_due_at"] = (
            now + timedelta(hours=tenant.resolution_hours_for(category))
        ).isoformat()
        event = NewEvent(
            REPORT_SUBMITTED,
            payload,
            now,
            event_id=event_id,
            metadata=_metadata(actor, idempotency_key, report, correlation_id),
        )
        result = self.store.append(
            tenant_id, incident_stream_id(incident_id), [event], expected_version=0
        )
        if result.replayed:
            # The stream id derives from the key, so the first incident is this one.
            logger.info("submit replayed for tenant %s incident %s", tenant_id, incident_id)
        return CommandResult(incident_id, result)

    def load(self, tenant_id: str, incident_id: UUID) -> IncidentState:
        events = self.store.read_stream(tenant_id, incident_stream_id(incident_id))
        state = fold_incident(events)
        if state is None:
            raise IncidentNotFound(tenant_id, str(incident_id))
        return state

    def execute(
        self,
        tenant_id: str,
        incident_id: UUID,
        command: str,
        args: dict[str, Any],
        *,
        actor: Actor,
        expected_version: int | None,
        idempotency_key: str | None = None,
        correlation_id: str | None = None,
    ) -> CommandResult:
        """Run a lifecycle command against the incident's current state.

        Raises IncidentNotFound, CommandRejected, CommandInvalid, ConcurrencyError or
        IdempotencyKeyReused.
        """
        stream_id = incident_stream_id(incident_id)
        event_id = (
            # One key names one request on this incident, whatever the command: a key reused
            # for another command is a different body and is rejected.
            derived_id(tenant_id, str(incident_id), "command", idempotency_key)
            if idempotency_key is not None
            else new_id()
        )
        metadata = _metadata(actor, idempotency_key, {"command": command, **args}, correlation_id)
        state = self.load(tenant_id, incident_id)

        if idempotency_key is not None:
            # A retry after success must return the first result, even though the state has
            # moved on and the command would no longer fit it.
            probe = NewEvent("Probe", {}, self.clock(), event_id=event_id, metadata=metadata)
            replay = self._replay(tenant_id, stream_id, probe)
            if replay is not None:
                return CommandResult(incident_id, replay)

        if expected_version is not None and expected_version != state.version:
            raise ConcurrencyError(stream_id, expected_version, state.version)
        event_type, payload = decide(state, command, args)
        if command == "mark-duplicate":
            original = UUID(payload["duplicate_of"])
            if not self.store.stream_version(tenant_id, incident_stream_id(original)):
                raise CommandInvalid(
                    f"duplicate_of {original} is not an incident of tenant {tenant_id!r}"
                )

        event = NewEvent(event_type, payload, self.clock(), event_id=event_id, metadata=metadata)
        result = self.store.append(tenant_id, stream_id, [event], expected_version=state.version)
        return CommandResult(incident_id, result)

    def _replay(self, tenant_id: str, stream_id: str, probe: NewEvent) -> AppendResult | None:
        with self.store.pool.connection() as conn:
            set_tenant(conn, tenant_id)
            return find_stored(conn, tenant_id, stream_id, [probe])
