"""Command handling: validate, decide against the current state, append."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import psycopg

from ledger.database import set_tenant
from ledger.errors import (
    CommandInvalid,
    ConcurrencyError,
    IdempotencyKeyReused,
    IncidentNotFound,
)
from ledger.events import NewEvent, canonical_json
from ledger.ids import derived_id, incident_stream_id, new_id
from ledger.lifecycle import REPORT_SUBMITTED, IncidentState, decide, fold_incident
from ledger.personal import (
    ContactDetails,
    ReporterContact,
    find_or_create_reporter,
    open_contact,
    seal_contact,
    validate_reporter,
)
from ledger.routing import routing_event
from ledger.store import AppendResult, PostgresEventStore, find_stored, read_stream
from ledger.tenants import cached_tenant, require_tenant

logger = logging.getLogger(__name__)

Clock = Callable[[], datetime]

# Report fields that would put personal data, or a forged contact object, into the payload
# in plain text. A reporter's details go in the `reporter` argument of `submit` instead.
PERSONAL_REPORT_FIELDS = frozenset(
    {
        "name",
        "email",
        "phone",
        "reporter",
        "reporter_name",
        "reporter_email",
        "reporter_phone",
        "reporter_id",
        "contact",
    }
)


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


def _hashed_body(report: dict[str, Any], contact: ReporterContact | None) -> dict[str, Any]:
    """Return the request body the idempotency hash covers: the report and the names of the
    reporter fields that were sent, never their values.
    """
    if contact is None:
        return report
    return {**report, "reporter": sorted(contact.fields())}


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


def _checked_report(
    report: dict[str, Any], reporter: Mapping[str, Any] | None
) -> ReporterContact | None:
    """Reject personal fields in a report, and return its reporter's checked contact, if
    any."""
    personal = sorted(PERSONAL_REPORT_FIELDS & set(report))
    if personal:
        raise CommandInvalid(
            f"report field(s) {', '.join(personal)} would store personal data in plain "
            "text; pass the reporter's name, email and phone in `reporter` instead"
        )
    return validate_reporter(reporter)


def _submit_result(tenant_id: str, incident_id: UUID, result: AppendResult) -> CommandResult:
    if result.replayed:
        # The stream id derives from the key, so the first incident is this one.
        logger.info("submit replayed for tenant %s incident %s", tenant_id, incident_id)
    return CommandResult(incident_id, result)


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
        reporter: Mapping[str, Any] | None = None,
    ) -> CommandResult:
        """Append a ReportSubmitted event to a new incident stream.

        With an idempotency key, the incident id and event id derive from it, so a retry of
        the same request returns the first incident instead of making a second one.

        `reporter` contains the reporter's `name`, `email` and `phone`, each optional. They are
        encrypted under the key of the reporter with that e-mail address or phone number (a
        new reporter when there is none) and stored only as ciphertext in the payload's
        `contact` object. The key is created in the same transaction as the append. Raises
        CommandInvalid when `report` has a personal field or a reporter value is invalid.
        """
        contact = _checked_report(report, reporter)
        require_tenant(self.store, tenant_id)  # raises TenantNotFound
        incident_id, stream_id, event = self._submitted(
            tenant_id, report, contact, actor, idempotency_key, correlation_id
        )
        if contact is None:
            result = self.store.append(tenant_id, stream_id, [event], expected_version=0)
        else:
            result = self._append_with_contact(tenant_id, stream_id, event, contact)
        return _submit_result(tenant_id, incident_id, result)

    async def submit_async(
        self,
        tenant_id: str,
        report: dict[str, Any],
        *,
        actor: Actor,
        idempotency_key: str | None = None,
        correlation_id: str | None = None,
        reporter: Mapping[str, Any] | None = None,
    ) -> CommandResult:
        """Submit a report as `submit` does, with the same results and errors, from an
        event loop.

        A report without reporter contact, from a tenant whose configuration is cached at
        the version this request read, is appended without holding a thread. Any other
        report, which needs reads of its own first, is submitted in a thread.
        """
        contact = _checked_report(report, reporter)
        if contact is not None or cached_tenant(self.store, tenant_id) is None:
            return await asyncio.to_thread(
                self.submit,
                tenant_id,
                report,
                actor=actor,
                idempotency_key=idempotency_key,
                correlation_id=correlation_id,
                reporter=reporter,
            )
        incident_id, stream_id, event = self._submitted(
            tenant_id, report, None, actor, idempotency_key, correlation_id
        )
        result = await self.store.append_async(tenant_id, stream_id, [event], expected_version=0)
        return _submit_result(tenant_id, incident_id, result)

    def _submitted(
        self,
        tenant_id: str,
        report: dict[str, Any],
        contact: ReporterContact | None,
        actor: Actor,
        idempotency_key: str | None,
        correlation_id: str | None,
    ) -> tuple[UUID, str, NewEvent]:
        """Return the incident, its stream and the ReportSubmitted event of a checked report."""
        now = self.clock()
        if idempotency_key is not None:
            incident_id = derived_id(tenant_id, "submit", idempotency_key)
            event_id = derived_id(tenant_id, "submit-event", idempotency_key)
        else:
            incident_id = new_id()
            event_id = new_id()

        payload = {key: value for key, value in report.items() if value is not None}
        payload["incident_id"] = str(incident_id)
        # No due times: the SLA read model computes them from the policy in force, and due
        # times in a payload are kept as the report's own (an imported city's) targets.
        event = NewEvent(
            REPORT_SUBMITTED,
            payload,
            now,
            event_id=event_id,
            metadata=_metadata(
                actor, idempotency_key, _hashed_body(report, contact), correlation_id
            ),
        )
        return incident_id, incident_stream_id(incident_id), event

    def _append_with_contact(
        self, tenant_id: str, stream_id: str, event: NewEvent, contact: ReporterContact
    ) -> AppendResult:
        """Find or create the reporter, encrypt the contact into the event and append it,
        all in one transaction.

        A retry of a stored request creates and encrypts nothing: its reporter values are
        compared with the first request's by decrypting them.
        """

        def append_in(conn: psycopg.Connection[Any]) -> AppendResult:
            replayed: AppendResult | None = None
            with conn.transaction() as transaction:
                replayed = find_stored(conn, tenant_id, stream_id, [event])
                if replayed is None:
                    key = find_or_create_reporter(conn, tenant_id, contact)
                    sealed_payload = {**event.payload, "contact": seal_contact(key, contact)}
                    result = self.store.append(
                        tenant_id,
                        stream_id,
                        [replace(event, payload=sealed_payload)],
                        expected_version=0,
                        conn=conn,
                    )
                    if not result.replayed:
                        return result
                    # A concurrent retry of this request committed first.
                    replayed = result
                self._require_same_contact(conn, tenant_id, stream_id, event, contact)
                # Keep nothing this attempt wrote, such as a reporter created for a name.
                raise psycopg.Rollback(transaction)
            assert replayed is not None
            return replayed

        # With the API's group committer, this transaction is shared with other requests.
        return self.store.run_in_transaction(tenant_id, append_in, lock_key=stream_id)

    def _require_same_contact(
        self,
        conn: psycopg.Connection[Any],
        tenant_id: str,
        stream_id: str,
        event: NewEvent,
        contact: ReporterContact,
    ) -> None:
        """Raise IdempotencyKeyReused unless the stored event has the same reporter values.

        The request hash covers only which reporter fields were sent, so that no event
        contains a hash of personal data that could be matched against guesses after an
        erasure. Once the reporter is erased the values cannot be compared, and the retry
        gets the first result.
        """
        key_text = str(event.metadata.get("idempotency_key") or event.event_id)
        stored = next(
            (e for e in read_stream(conn, tenant_id, stream_id) if e.event_id == event.event_id),
            None,
        )
        sealed = stored.payload.get("contact") if stored is not None else None
        if sealed is None:
            raise IdempotencyKeyReused(key_text)
        details = open_contact(conn, tenant_id, sealed)
        if details.erased:
            logger.info(
                "submit retry for tenant %s stream %s matched an erased reporter %s; "
                "returning the first result",
                tenant_id,
                stream_id,
                details.reporter_id,
            )
            return
        if details.fields() != contact.fields():
            raise IdempotencyKeyReused(key_text)

    def contact_details(self, tenant_id: str, incident_id: UUID) -> ContactDetails | None:
        """Return the incident's reporter contact, decrypted, or marked erased.

        Returns None when the report was submitted without a reporter. Raises
        IncidentNotFound, and ContactDecryptionFailed when the stored ciphertext does not
        decrypt under the reporter's key.
        """
        state = self.load(tenant_id, incident_id)
        if state.contact is None:
            return None
        with self.store.pool.connection() as conn, conn.transaction():
            set_tenant(conn, tenant_id)
            return open_contact(conn, tenant_id, state.contact)

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
        for field in ("duplicate_of", "with_incident"):
            if field in payload:
                other = UUID(payload[field])
                if not self.store.stream_version(tenant_id, incident_stream_id(other)):
                    raise CommandInvalid(
                        f"{field} {other} is not an incident of tenant {tenant_id!r}"
                    )

        if command == "reclassify" and "category" in payload:
            known = require_tenant(self.store, tenant_id).category_names
            if known and payload["category"] not in known:
                raise CommandInvalid(
                    f"unknown category {payload['category']!r} for tenant {tenant_id!r}; "
                    f"use one of {', '.join(known)}"
                )

        event = NewEvent(event_type, payload, self.clock(), event_id=event_id, metadata=metadata)
        events = [event]
        if command == "reclassify" and "category" in payload:
            routed = routing_event(
                require_tenant(self.store, tenant_id),
                self.store.read_stream(tenant_id, stream_id),
                payload["category"],
                cause=str(event_id),
                occurred_at=event.occurred_at,
                staff_correction=True,
            )
            if routed is not None:
                events.append(routed)
        result = self.store.append(tenant_id, stream_id, events, expected_version=state.version)
        return CommandResult(incident_id, result)

    def _replay(self, tenant_id: str, stream_id: str, probe: NewEvent) -> AppendResult | None:
        with self.store.pool.connection() as conn:
            set_tenant(conn, tenant_id)
            return find_stored(conn, tenant_id, stream_id, [probe])
