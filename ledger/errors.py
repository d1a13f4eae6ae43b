"""Errors raised by the write side. The API maps each to a problem-details response."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class LedgerError(Exception):
    """Base class for every error the ledger raises on purpose."""


class ConcurrencyError(LedgerError):
    """An append named a stream version that is no longer current."""

    def __init__(self, stream_id: str, expected: int, actual: int) -> None:
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"{stream_id} is at version {actual}, not the expected version {expected}; "
            "read it again and retry with its current version (for incidents, the ETag)"
        )


class StreamTenantMismatch(LedgerError):
    """An append would put events of one tenant into another tenant's stream."""

    def __init__(self, stream_id: str, tenant_id: str) -> None:
        self.stream_id = stream_id
        super().__init__(
            f"stream {stream_id} belongs to another tenant and cannot take events of "
            f"tenant {tenant_id}; use a new stream id"
        )


class IdempotencyKeyReused(LedgerError):
    """An idempotency key came back with a different request body."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(
            f"idempotency key {key!r} was already used for a different request; "
            "send a new key for a new request"
        )


class InvalidEventData(LedgerError):
    """A payload or metadata value cannot be stored as JSONB without changing it."""


class TenantNotFound(LedgerError):
    def __init__(
        self, tenant_id: str, hint: str = "create it with `civicpulse tenant create`"
    ) -> None:
        self.tenant_id = tenant_id
        super().__init__(f"tenant {tenant_id!r} not found; {hint}")


class TenantExists(LedgerError):
    def __init__(self, tenant_id: str) -> None:
        self.tenant_id = tenant_id
        super().__init__(f"tenant {tenant_id!r} already exists")


class IncidentNotFound(LedgerError):
    def __init__(self, tenant_id: str, incident_id: str) -> None:
        self.incident_id = incident_id
        super().__init__(f"incident {incident_id} not found in tenant {tenant_id!r}")


class NotProjectedYet(LedgerError):
    """A read model has not applied the events a request needs yet."""

    def __init__(self, projection: str, subject: str) -> None:
        super().__init__(
            f"the {projection} model has no row for {subject} yet, because the projector has "
            "not applied its events; retry in a few seconds"
        )


class CommandRejected(LedgerError):
    """A lifecycle command does not fit the incident's current state."""

    def __init__(self, command: str, status: str, allowed: list[str]) -> None:
        self.command = command
        self.status = status
        self.allowed = allowed
        allowed_text = ", ".join(allowed) if allowed else "none"
        super().__init__(
            f"command {command!r} is not allowed while the incident is {status!r}; "
            f"commands allowed in that state: {allowed_text}"
        )


class CommandInvalid(LedgerError):
    """A lifecycle command carries a value that cannot be accepted."""


class DashboardNotFound(LedgerError):
    """A dashboard or widget the tenant's configuration does not define (or does not publish)."""

    def __init__(self, tenant_id: str, missing: str, known: list[str]) -> None:
        self.tenant_id = tenant_id
        choices = ", ".join(known) if known else "none is configured"
        super().__init__(f"{missing} not found in tenant {tenant_id!r}; use one of: {choices}")


class InvalidRequest(LedgerError):
    """A request parameter or header (not a command argument) is malformed."""


class AuthenticationFailed(LedgerError):
    """A request without a usable API key. The message states what is wrong with it."""


class Forbidden(LedgerError):
    """An authenticated key whose role does not permit the requested action."""

    def __init__(self, role: str, allowed: list[str], action: str) -> None:
        self.role = role
        self.allowed = allowed
        super().__init__(
            f"a key with role {role!r} may not {action}; this needs a key with role "
            f"{' or '.join(repr(name) for name in allowed)}"
        )


class KeyNotFound(LedgerError):
    def __init__(self, tenant_id: str, key_id: object) -> None:
        super().__init__(f"tenant {tenant_id!r} has no API key {key_id}")


class ReporterNotFound(LedgerError):
    """No key of this reporter is stored for the tenant (or it belongs to another tenant)."""

    def __init__(self, tenant_id: str, reporter_id: str) -> None:
        self.tenant_id = tenant_id
        self.reporter_id = reporter_id
        super().__init__(
            f"reporter {reporter_id} not found in tenant {tenant_id!r}; check the reporter id, "
            "which the incident's contact object carries"
        )


class ContactDecryptionFailed(LedgerError):
    """A contact field cannot be decrypted: it was altered, or sealed for another reporter,
    tenant or field. An erased reporter is not this error: see ContactDetails.erased.
    """

    def __init__(self, tenant_id: str, reporter_id: str, field: str, reason: str) -> None:
        self.tenant_id = tenant_id
        self.reporter_id = reporter_id
        self.field = field
        super().__init__(
            f"cannot decrypt the {field} of reporter {reporter_id} in tenant {tenant_id!r}: "
            f"{reason}. The stored value was altered or written for another reporter, tenant "
            "or field, and cannot be recovered"
        )


class ContactNotGiven(LedgerError):
    """An incident reported without contact details."""

    def __init__(self, tenant_id: str, incident_id: str) -> None:
        super().__init__(
            f"incident {incident_id} of tenant {tenant_id!r} was reported without contact details"
        )


class InvalidSeal(LedgerError):
    """A tenant's seal stream contains an event that cannot be read as a seal."""


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One invalid value of a configuration document, with what to do about it."""

    section: str
    field: str
    value: Any
    fix: str

    def __str__(self) -> str:
        text = f"section {self.section}"
        if self.field:
            text += f", field {self.field}"
        if self.value is not None:
            text += f", value {self.value!r}"
        return f"{text}: {self.fix}"


class ConfigInvalid(CommandInvalid):
    """A configuration document with one or more invalid sections; nothing was applied.

    `outcome` is the message's account of what did not happen because of them.
    """

    def __init__(self, problems: list[ConfigProblem], outcome: str = "nothing applied") -> None:
        self.problems = problems
        super().__init__(f"invalid configuration, {outcome}: " + "; ".join(map(str, problems)))
