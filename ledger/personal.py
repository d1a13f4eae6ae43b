"""Reporters' personal data: validation, the key vault, AES-GCM encryption and erasure.

A reporter's name, e-mail address and phone number reach an event only as AES-256-GCM
ciphertext under a key kept per reporter in the `reporter_keys` table, outside the events.
Erasing a reporter destroys that key (crypto-shredding): the events stay as they are, their
hash chains still verify, and the ciphertext in them can no longer be decrypted.

The functions that take a connection run in the caller's transaction, which must have set
the tenant with `set_tenant`. Only the application role may read the vault.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID, uuid4

import orjson
import psycopg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from email_validator import EmailNotValidError, validate_email

from ledger.database import set_tenant
from ledger.errors import CommandInvalid, ContactDecryptionFailed, ReporterNotFound
from ledger.events import JsonObject, NewEvent
from ledger.store import PostgresEventStore

if TYPE_CHECKING:
    from ledger.commands import Actor

logger = logging.getLogger(__name__)

CONTACT_FIELDS = ("name", "email", "phone")
# Identifies the cipher, the token layout and the associated data, so that a later format
# can be distinguished from this one.
CONTACT_SCHEME = "aes-256-gcm-v1"
REPORTER_ERASED = "ReporterErased"

MAX_NAME_LENGTH = 200
MAX_PHONE_LENGTH = 32
MIN_PHONE_DIGITS = 3
MAX_REASON_LENGTH = 500

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16

_PHONE_CHARACTERS = re.compile(r"[0-9+\-() ]+")


@dataclass(frozen=True, slots=True, repr=False)
class ReporterContact:
    """A reporter's validated contact details, in plain text. Never store one in an event."""

    name: str | None = None
    email: str | None = None
    phone: str | None = None

    def fields(self) -> dict[str, str]:
        """Return the fields that are set, by name."""
        values = {"name": self.name, "email": self.email, "phone": self.phone}
        return {name: value for name, value in values.items() if value is not None}

    def __repr__(self) -> str:
        # Tracebacks and logs show which fields are set, never their values.
        return f"ReporterContact(fields={sorted(self.fields())})"


@dataclass(frozen=True, slots=True, repr=False)
class ReporterKey:
    """A reporter's live AES-256 key, as read from the vault."""

    tenant_id: str
    reporter_id: UUID
    key: bytes

    def __repr__(self) -> str:
        return f"ReporterKey(tenant_id={self.tenant_id!r}, reporter_id={self.reporter_id})"


@dataclass(frozen=True, slots=True)
class ContactDetails:
    """An incident's contact details, decrypted, or marked erased once the key is gone."""

    reporter_id: UUID
    name: str | None = field(default=None, repr=False)
    email: str | None = field(default=None, repr=False)
    phone: str | None = field(default=None, repr=False)
    erased_at: datetime | None = None

    @property
    def erased(self) -> bool:
        return self.erased_at is not None

    def fields(self) -> dict[str, str]:
        """Return the decrypted fields that are set, by name. The result is empty once erased."""
        values = {"name": self.name, "email": self.email, "phone": self.phone}
        return {name: value for name, value in values.items() if value is not None}

    def as_dict(self) -> dict[str, Any]:
        """Return the details as JSON: `{"erased": true, "erased_at": ...}` once erased."""
        if self.erased_at is not None:
            return {
                "reporter_id": str(self.reporter_id),
                "erased": True,
                "erased_at": self.erased_at.isoformat(),
            }
        return {
            "reporter_id": str(self.reporter_id),
            "erased": False,
            "name": self.name,
            "email": self.email,
            "phone": self.phone,
        }


@dataclass(frozen=True, slots=True)
class Erasure:
    """The outcome of erasing a reporter.

    `already_erased` is true when an earlier erasure destroyed the key: `erased_at` and
    `reason` are then that erasure's, and `position` is None because nothing was appended.
    """

    tenant_id: str
    reporter_id: UUID
    erased_at: datetime
    reason: str
    already_erased: bool
    position: int | None = None


def reporter_stream_id(tenant_id: str) -> str:
    """Return the id of the tenant's stream of reporter events, such as erasures."""
    return f"reporters-{tenant_id}"


# Validation


def validate_reporter(raw: Mapping[str, Any] | None) -> ReporterContact | None:
    """Validate a reporter's `name`, `email` and `phone`, each optional.

    Returns None when no field has a value. Raises CommandInvalid on an unknown field, a
    value that is not text, a NUL character or a value that fails its field's check. The
    messages never repeat the value, because they may be logged.
    """
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise CommandInvalid(
            f"invalid reporter: expected an object with name, email and phone, "
            f"got {type(raw).__name__}"
        )
    unknown = sorted(str(key) for key in set(raw) - set(CONTACT_FIELDS))
    if unknown:
        raise CommandInvalid(
            f"unknown reporter field(s) {', '.join(unknown)}; a reporter has name, email and phone"
        )

    values: dict[str, str] = {}
    for name in CONTACT_FIELDS:
        value = raw.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise CommandInvalid(
                f"invalid reporter {name}: expected text, got {type(value).__name__}"
            )
        if "\x00" in value:
            raise CommandInvalid(f"reporter {name} contains a NUL character; remove it")
        value = value.strip()
        if not value:
            continue  # an empty field counts as not given
        values[name] = _VALIDATORS[name](value)
    return ReporterContact(**values) if values else None


def _validate_name(value: str) -> str:
    if len(value) > MAX_NAME_LENGTH:
        raise CommandInvalid(
            f"reporter name is {len(value)} characters long; the limit is {MAX_NAME_LENGTH}"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise CommandInvalid(
            "reporter name contains a lone surrogate code point, which UTF-8 cannot encode; "
            "send valid Unicode text"
        ) from error
    return value


def _validate_email(value: str) -> str:
    try:
        # No DNS look-up: a report must not wait on, or fail because of, a mail domain.
        checked = validate_email(value, check_deliverability=False)
    except EmailNotValidError as error:
        raise CommandInvalid(f"reporter email is not a valid e-mail address: {error}") from error
    normalized: str = checked.normalized
    return normalized


def _validate_phone(value: str) -> str:
    if len(value) > MAX_PHONE_LENGTH:
        raise CommandInvalid(
            f"reporter phone is {len(value)} characters long; the limit is {MAX_PHONE_LENGTH}"
        )
    if not _PHONE_CHARACTERS.fullmatch(value):
        raise CommandInvalid(
            "reporter phone may contain only digits, spaces and the characters + - ( )"
        )
    digits = sum(character.isdigit() for character in value)
    if digits < MIN_PHONE_DIGITS:
        raise CommandInvalid(
            f"reporter phone has {digits} digit(s); a phone number needs at least "
            f"{MIN_PHONE_DIGITS}"
        )
    return value


_VALIDATORS = {"name": _validate_name, "email": _validate_email, "phone": _validate_phone}


def validate_reason(reason: str) -> str:
    """Check an erasure reason: required text of at most MAX_REASON_LENGTH characters."""
    if "\x00" in reason:
        raise CommandInvalid("erasure reason contains a NUL character; remove it")
    reason = reason.strip()
    if not reason:
        raise CommandInvalid("missing erasure reason: say why the reporter is erased")
    if len(reason) > MAX_REASON_LENGTH:
        raise CommandInvalid(
            f"erasure reason is {len(reason)} characters long; the limit is {MAX_REASON_LENGTH}"
        )
    return reason


# Encryption


def _associated_data(tenant_id: str, reporter_id: UUID, field_name: str) -> bytes:
    # Binds each ciphertext to its tenant, reporter and field: moved anywhere else, it no
    # longer decrypts.
    return orjson.dumps([CONTACT_SCHEME, tenant_id, str(reporter_id), field_name])


def encrypt_field(key: ReporterKey, field_name: str, value: str) -> str:
    """Encrypt one contact field and return base64 text of nonce, ciphertext and tag.

    Each call draws a fresh random 96-bit nonce, so encrypting the same value twice gives
    two different tokens.
    """
    # NOTE: random 96-bit nonces stay safe for about 2**32 encryptions under one key (NIST
    # SP 800-38D). One reporter's key encrypts three fields per report, far below that.
    nonce = os.urandom(NONCE_BYTES)
    associated_data = _associated_data(key.tenant_id, key.reporter_id, field_name)
    ciphertext = AESGCM(key.key).encrypt(nonce, value.encode("utf-8"), associated_data)
    return base64.b64encode(nonce + ciphertext).decode("ascii")


def decrypt_field(key: ReporterKey, field_name: str, token: Any) -> str:
    """Decrypt a token written by `encrypt_field` for the same reporter and field.

    Raises ContactDecryptionFailed when the token is malformed or does not authenticate.
    """

    def failed(reason: str) -> ContactDecryptionFailed:
        return ContactDecryptionFailed(key.tenant_id, str(key.reporter_id), field_name, reason)

    if not isinstance(token, str):
        raise failed(f"expected base64 text, got {type(token).__name__}")
    try:
        sealed = base64.b64decode(token, validate=True)
    except (binascii.Error, ValueError) as error:
        raise failed("the value is not valid base64") from error
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise failed(f"the value is {len(sealed)} bytes long, shorter than a nonce and a tag")

    nonce, ciphertext = sealed[:NONCE_BYTES], sealed[NONCE_BYTES:]
    associated_data = _associated_data(key.tenant_id, key.reporter_id, field_name)
    try:
        plaintext = AESGCM(key.key).decrypt(nonce, ciphertext, associated_data)
    except InvalidTag as error:
        raise failed("the authentication tag does not match") from error
    try:
        return plaintext.decode("utf-8")
    except UnicodeDecodeError as error:
        raise failed("the decrypted bytes are not UTF-8") from error


def seal_contact(key: ReporterKey, contact: ReporterContact) -> JsonObject:
    """Return the `contact` object of an event payload: the reporter id and each field
    encrypted. It contains no plain personal data.
    """
    return {
        "reporter_id": str(key.reporter_id),
        "scheme": CONTACT_SCHEME,
        "fields": {
            name: encrypt_field(key, name, value) for name, value in contact.fields().items()
        },
    }


def open_contact(
    conn: psycopg.Connection[Any], tenant_id: str, sealed: Mapping[str, Any]
) -> ContactDetails:
    """Decrypt a `contact` object made by `seal_contact`.

    Returns the details marked erased when the reporter's key was destroyed. Raises
    ReporterNotFound when the tenant has no such reporter, and ContactDecryptionFailed when
    the object is malformed or a field does not decrypt.
    """
    reporter_text = sealed.get("reporter_id")
    try:
        reporter_id = UUID(str(reporter_text))
    except ValueError as error:
        raise ContactDecryptionFailed(
            tenant_id, str(reporter_text), "reporter_id", "the reporter id is not a UUID"
        ) from error
    key, erased_at = _load_key(conn, tenant_id, reporter_id)
    if key is None:
        assert erased_at is not None
        return ContactDetails(reporter_id, erased_at=erased_at)

    scheme = sealed.get("scheme")
    if scheme != CONTACT_SCHEME:
        raise ContactDecryptionFailed(
            tenant_id, str(reporter_id), "scheme", f"unknown scheme {scheme!r}"
        )
    fields = sealed.get("fields")
    if not isinstance(fields, Mapping):
        raise ContactDecryptionFailed(
            tenant_id, str(reporter_id), "fields", "the contact object has no fields object"
        )
    values: dict[str, str] = {}
    for name, token in fields.items():
        if name not in CONTACT_FIELDS:
            raise ContactDecryptionFailed(tenant_id, str(reporter_id), name, "unknown field")
        values[name] = decrypt_field(key, name, token)
    return ContactDetails(
        reporter_id, name=values.get("name"), email=values.get("email"), phone=values.get("phone")
    )


# The vault


def _lookup_secret(conn: psycopg.Connection[Any], tenant_id: str) -> bytes:
    """Return the tenant's lookup secret, creating it on first use."""
    query = "SELECT secret FROM reporter_lookup_keys WHERE tenant_id = %s"
    row = conn.execute(query, (tenant_id,)).fetchone()
    if row is None:
        # A concurrent first use inserts too: the loser's row is dropped by ON CONFLICT, and
        # both read the winner's secret.
        conn.execute(
            "INSERT INTO reporter_lookup_keys (tenant_id, secret) VALUES (%s, %s) "
            "ON CONFLICT (tenant_id) DO NOTHING",
            (tenant_id, os.urandom(KEY_BYTES)),
        )
        row = conn.execute(query, (tenant_id,)).fetchone()
        assert row is not None
    return bytes(row[0])


def lookup_digest(secret: bytes, field_name: str, value: str) -> bytes:
    """Return the HMAC-SHA256 under which a reporter is found by e-mail or phone.

    E-mail addresses are compared case-insensitively and phone numbers by their digits and
    a leading +, so "+1 (617) 555-0100" and "+16175550100" find the same reporter.
    """
    if field_name == "email":
        canonical = value.casefold()
    elif field_name == "phone":
        plus = "+" if value.lstrip().startswith("+") else ""
        canonical = plus + "".join(character for character in value if character.isdigit())
    else:
        raise ValueError(f"no lookup for reporter field {field_name!r}; use email or phone")
    message = f"{field_name}\x00{canonical}".encode()
    return hmac.new(secret, message, hashlib.sha256).digest()


def find_or_create_reporter(
    conn: psycopg.Connection[Any], tenant_id: str, contact: ReporterContact
) -> ReporterKey:
    """Return the key of the live reporter with this e-mail address or phone number, or
    create a reporter with a new key.

    The e-mail address is tried before the phone number. A contact with only a name always
    makes a new reporter, because names do not identify people.
    """
    # NOTE: a reporter is found only by the e-mail address and phone number given when it
    # was created. A phone number first given on a later report is encrypted in that report
    # but does not become a way to find the reporter, since vault rows change only to erase.
    secret = _lookup_secret(conn, tenant_id)
    digests = {
        name: lookup_digest(secret, name, value)
        for name, value in contact.fields().items()
        if name in ("email", "phone")
    }
    # Two tries: an insert that loses a race on an e-mail or phone digest finds the
    # winner's row on the second look, since the winner has committed by then.
    for _ in range(2):
        for name, digest in digests.items():
            row = conn.execute(
                f"SELECT reporter_id, data_key FROM reporter_keys "
                f"WHERE tenant_id = %s AND {name}_lookup = %s",
                (tenant_id, digest),
            ).fetchone()
            if row is not None:
                return ReporterKey(tenant_id, row[0], bytes(row[1]))

        # A random (version 4) id rather than a time-ordered one: staff see reporter ids,
        # and an id should not tell when the person first reported.
        key = ReporterKey(tenant_id, uuid4(), AESGCM.generate_key(bit_length=256))
        inserted = conn.execute(
            """
            INSERT INTO reporter_keys (tenant_id, reporter_id, data_key, email_lookup,
                phone_lookup)
            VALUES (%s, %s, %s, %s, %s)
            ON CONFLICT DO NOTHING
            RETURNING reporter_id
            """,
            (tenant_id, key.reporter_id, key.key, digests.get("email"), digests.get("phone")),
        ).fetchone()
        if inserted is not None:
            logger.info("created reporter %s in tenant %s", key.reporter_id, tenant_id)
            return key
    raise RuntimeError(
        f"could not find or create a reporter in tenant {tenant_id!r}: a concurrent "
        "transaction kept changing the same e-mail or phone lookup; retry the request"
    )


def _load_key(
    conn: psycopg.Connection[Any], tenant_id: str, reporter_id: UUID
) -> tuple[ReporterKey | None, datetime | None]:
    """Return the reporter's key and erasure time: (key, None) or (None, erased_at)."""
    row = conn.execute(
        "SELECT data_key, erased_at FROM reporter_keys WHERE tenant_id = %s AND reporter_id = %s",
        (tenant_id, reporter_id),
    ).fetchone()
    if row is None:
        raise ReporterNotFound(tenant_id, str(reporter_id))
    data_key, erased_at = row
    if data_key is None:
        return None, erased_at
    return ReporterKey(tenant_id, reporter_id, bytes(data_key)), None


# Erasure


def erase_reporter(
    store: PostgresEventStore,
    tenant_id: str,
    reporter_id: UUID,
    *,
    reason: str,
    actor: Actor,
    erased_at: datetime | None = None,
) -> Erasure:
    """Destroy a reporter's key and lookup digests, and append a ReporterErased event.

    Both happen in one transaction. The event, in the tenant's `reporters-<tenant>` stream,
    carries the reporter id and the reason, and no personal data. Every event that contains the
    reporter's ciphertext stays unchanged, so hash chains still verify.

    Idempotent: erasing an erased reporter changes nothing and returns the first erasure
    with `already_erased` set. Raises ReporterNotFound when the tenant has no such reporter
    and CommandInvalid when the reason is missing or too long.
    """
    reason = validate_reason(reason)
    moment = erased_at or datetime.now(UTC)
    with store.pool.connection() as conn, conn.transaction():
        set_tenant(conn, tenant_id)
        # The row lock makes concurrent erasures of one reporter take turns, so exactly
        # one of them appends the event.
        row = conn.execute(
            """
            SELECT data_key IS NULL, erased_at, erased_reason FROM reporter_keys
            WHERE tenant_id = %s AND reporter_id = %s
            FOR UPDATE
            """,
            (tenant_id, reporter_id),
        ).fetchone()
        if row is None:
            raise ReporterNotFound(tenant_id, str(reporter_id))
        already_erased, first_erased_at, first_reason = row
        if already_erased:
            return Erasure(
                tenant_id, reporter_id, first_erased_at, first_reason, already_erased=True
            )

        conn.execute(
            """
            UPDATE reporter_keys
            SET data_key = NULL, email_lookup = NULL, phone_lookup = NULL,
                erased_at = %s, erased_reason = %s
            WHERE tenant_id = %s AND reporter_id = %s
            """,
            (moment, reason, tenant_id, reporter_id),
        )
        event = NewEvent(
            REPORTER_ERASED,
            {"reporter_id": str(reporter_id), "reason": reason},
            moment,
            metadata={
                "actor": actor.name,
                "role": actor.role,
                "channel": actor.channel,
                **({"actor_id": str(actor.key_id)} if actor.key_id else {}),
            },
        )
        result = store.append(
            tenant_id, reporter_stream_id(tenant_id), [event], expected_version=None, conn=conn
        )
    logger.info(
        "erased reporter %s of tenant %s (ReporterErased at position %d)",
        reporter_id,
        tenant_id,
        result.positions[0],
    )
    return Erasure(
        tenant_id,
        reporter_id,
        moment,
        reason,
        already_erased=False,
        position=result.positions[0],
    )


CONTACT_ACCESSED = "ContactDetailsAccessed"


def record_contact_access(
    store: PostgresEventStore,
    tenant_id: str,
    incident_id: UUID,
    reporter_id: UUID,
    *,
    reason: str,
    actor: Actor,
) -> int:
    """Append a ContactDetailsAccessed event before an officer sees contact details.

    The event goes to the tenant's `reporters-<tenant>` stream, not the incident's, so that
    reading a report never changes its version. Returns the event's position.
    """
    if "\x00" in reason:
        raise CommandInvalid("access reason contains a NUL character; remove it")
    reason = reason.strip()
    if not reason:
        raise CommandInvalid("missing access reason: say why you need the contact details")
    event = NewEvent(
        CONTACT_ACCESSED,
        {"incident_id": str(incident_id), "reporter_id": str(reporter_id), "reason": reason},
        datetime.now(UTC),
        metadata={
            "actor": actor.name,
            "role": actor.role,
            "channel": actor.channel,
            **({"actor_id": str(actor.key_id)} if actor.key_id else {}),
        },
    )
    result = store.append(tenant_id, reporter_stream_id(tenant_id), [event], expected_version=None)
    return result.positions[0]
