"""API keys: issued per tenant with one role, shown once, stored as a hash, revocable.

A key reads `cpk_<key id, 32 hex digits>_<secret>`. Issuing and revoking a key are events in
the tenant's `keys-<tenant>` stream. The `api_keys` table is their read model, written in the
same transaction, so a key works as soon as it is issued.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

from ledger.database import read_as_tenant, read_as_tenant_async, set_tenant
from ledger.errors import AuthenticationFailed, CommandInvalid, KeyNotFound
from ledger.events import NewEvent
from ledger.ids import new_id
from ledger.store import PostgresEventStore
from ledger.tenants import record_config_version, require_tenant, tenant_stream_id

KEY_ISSUED = "ApiKeyIssued"
KEY_REVOKED = "ApiKeyRevoked"
TOKEN_PREFIX = "cpk_"
_TOKEN = re.compile(r"^cpk_([0-9a-f]{32})_([A-Za-z0-9_-]{43})$")


class Role(enum.StrEnum):
    """The permission level of a key within its tenant."""

    REPORTER = "reporter"  # submit reports and follow their own
    STAFF = "staff"  # triage and act on every incident
    OFFICER = "officer"  # read-only audit of everything in the tenant
    ADMIN = "admin"  # tenant configuration and keys


@dataclass(frozen=True, slots=True)
class Principal:
    """The holder of an authenticated key."""

    tenant_id: str
    key_id: UUID
    role: Role
    name: str


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key as listed to admins: everything but the secret."""

    key_id: UUID
    role: Role
    name: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "key_id": str(self.key_id),
            "role": self.role.value,
            "name": self.name,
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }


def keys_stream_id(tenant_id: str) -> str:
    return f"keys-{tenant_id}"


def _secret_sha256(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse_role(value: str) -> Role:
    try:
        return Role(value)
    except ValueError:
        roles = ", ".join(role.value for role in Role)
        raise CommandInvalid(f"unknown role {value!r}: use one of {roles}") from None


def issue_key(
    store: PostgresEventStore,
    tenant_id: str,
    *,
    role: Role,
    name: str,
    expires_at: datetime | None = None,
    issued_by: str,
    issuer_key_id: UUID | None = None,
    now: datetime | None = None,
) -> tuple[ApiKey, str]:
    """Issue a key; return it and its token, which is shown this once and never stored."""
    now = now or datetime.now(UTC)
    name = name.strip()
    if not 1 <= len(name) <= 200 or "\x00" in name:
        raise CommandInvalid(
            f"invalid key name {name!r}: use 1 to 200 characters that say who holds the key"
        )
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise CommandInvalid(f"invalid expiry {expires_at}: give a time zone or offset")
        if expires_at <= now:
            raise CommandInvalid(f"invalid expiry {expires_at.isoformat()}: it has passed")
    require_tenant(store, tenant_id)
    key_id = new_id()
    secret = secrets.token_urlsafe(32)
    digest = _secret_sha256(secret)
    event = NewEvent(
        KEY_ISSUED,
        {
            "key_id": str(key_id),
            "role": role.value,
            "name": name,
            "expires_at": expires_at.isoformat() if expires_at else None,
            # A digest of 256 random bits reveals nothing usable, and the table of keys
            # must be rebuildable from the events.
            "secret_sha256": digest.hex(),
        },
        now,
        metadata=_actor_metadata(issued_by, issuer_key_id),
    )
    with store.pool.connection() as conn, conn.transaction():
        set_tenant(conn, tenant_id)
        store.append(
            tenant_id, keys_stream_id(tenant_id), [event], expected_version=None, conn=conn
        )
        conn.execute(
            """
            INSERT INTO api_keys (tenant_id, key_id, role, name, secret_sha256, created_at,
                expires_at)
            VALUES (%s, %s, %s, %s, %s, %s, %s)
            """,
            (tenant_id, key_id, role.value, name, digest, now, expires_at),
        )
    key = ApiKey(key_id, role, name, now, expires_at, None)
    return key, f"{TOKEN_PREFIX}{key_id.hex}_{secret}"


def revoke_key(
    store: PostgresEventStore,
    tenant_id: str,
    key_id: UUID,
    *,
    revoked_by: str,
    revoker_key_id: UUID | None = None,
    reason: str | None = None,
    now: datetime | None = None,
) -> ApiKey:
    """Revoke a key of the tenant. Revoking a revoked key changes nothing and returns it."""
    now = now or datetime.now(UTC)
    with store.pool.connection() as conn, conn.transaction():
        set_tenant(conn, tenant_id)
        row = conn.execute(
            "SELECT revoked_at FROM api_keys WHERE tenant_id = %s AND key_id = %s FOR UPDATE",
            (tenant_id, key_id),
        ).fetchone()
        if row is None:
            raise KeyNotFound(tenant_id, key_id)
        if row[0] is None:
            event = NewEvent(
                KEY_REVOKED,
                {"key_id": str(key_id), "reason": reason},
                now,
                metadata=_actor_metadata(revoked_by, revoker_key_id),
            )
            store.append(
                tenant_id, keys_stream_id(tenant_id), [event], expected_version=None, conn=conn
            )
            conn.execute(
                "UPDATE api_keys SET revoked_at = %s WHERE tenant_id = %s AND key_id = %s",
                (now, tenant_id, key_id),
            )
        return _get_key(conn, tenant_id, key_id)


def _actor_metadata(actor: str, key_id: UUID | None) -> dict[str, Any]:
    """Metadata of a key event, in the form command events use: name, role, key id."""
    metadata: dict[str, Any] = {"actor": actor, "role": Role.ADMIN.value}
    if key_id is not None:
        metadata["actor_id"] = str(key_id)
    return metadata


def list_keys(store: PostgresEventStore, tenant_id: str) -> list[ApiKey]:
    with store.pool.connection() as conn:
        set_tenant(conn, tenant_id)
        rows = conn.execute(
            f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE tenant_id = %s ORDER BY created_at",
            (tenant_id,),
        ).fetchall()
    return [_key(row) for row in rows]


_KEY_COLUMNS = "key_id, role, name, created_at, expires_at, revoked_at"


def _key(row: tuple[Any, ...]) -> ApiKey:
    key_id, role, name, created_at, expires_at, revoked_at = row
    return ApiKey(key_id, Role(role), name, created_at, expires_at, revoked_at)


def _get_key(conn: psycopg.Connection[Any], tenant_id: str, key_id: UUID) -> ApiKey:
    row = conn.execute(
        f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE tenant_id = %s AND key_id = %s",
        (tenant_id, key_id),
    ).fetchone()
    if row is None:
        raise KeyNotFound(tenant_id, key_id)
    return _key(row)


def parse_token(token: str) -> tuple[UUID, bytes]:
    """Return the key id of `token` and the SHA-256 of its secret; raise AuthenticationFailed
    when it is not a token of the form `issue_key` returns."""
    match = _TOKEN.fullmatch(token.strip())
    if match is None:
        raise AuthenticationFailed(
            "malformed API key: send the key that `civicpulse key issue` printed, as "
            "'Authorization: Bearer cpk_...'"
        )
    return UUID(hex=match.group(1)), _secret_sha256(match.group(2))


@dataclass(frozen=True, slots=True)
class _KeyRow:
    """A key's row in api_keys, as authenticate_api_key returns it."""

    tenant_id: str
    role: Role
    name: str
    expires_at: datetime | None
    revoked_at: datetime | None


def _find_key(conn: psycopg.Connection[Any], key_id: UUID, digest: bytes) -> _KeyRow:
    row = conn.execute(
        "SELECT tenant_id, role, name, expires_at, revoked_at FROM authenticate_api_key(%s, %s)",
        (key_id, digest),
    ).fetchone()
    if row is None:
        raise AuthenticationFailed(f"unknown API key {key_id}: ask a tenant admin for a key")
    tenant_id, role, name, expires_at, revoked_at = row
    return _KeyRow(tenant_id, Role(role), name, expires_at, revoked_at)


def _principal(key_id: UUID, key: _KeyRow, now: datetime | None) -> Principal:
    """Return the holder of a key; raise AuthenticationFailed when it is revoked or expired."""
    now = now or datetime.now(UTC)
    if key.revoked_at is not None:
        raise AuthenticationFailed(
            f"API key {key_id} was revoked at {key.revoked_at.isoformat()}: ask for a new key"
        )
    if key.expires_at is not None and key.expires_at <= now:
        raise AuthenticationFailed(
            f"API key {key_id} expired at {key.expires_at.isoformat()}: ask for a new key"
        )
    return Principal(tenant_id=key.tenant_id, key_id=key_id, role=key.role, name=key.name)


def authenticate(
    conn: psycopg.Connection[Any], token: str, *, now: datetime | None = None
) -> Principal:
    """Return the holder of `token`; raise AuthenticationFailed saying why it is not usable.

    The secret is never logged or echoed: messages name the key id at most.
    """
    key_id, digest = parse_token(token)
    return _principal(key_id, _find_key(conn, key_id, digest), now)


@dataclass(frozen=True, slots=True)
class _CachedKey:
    secret_sha256: bytes
    key: _KeyRow
    keys_version: int  # of the tenant's keys stream when `key` was read


class KeyCache:
    """A cache of API key rows for `authenticate`, each kept until its tenant's keys stream
    changes.

    `issue_key` and `revoke_key` append to the tenant's keys stream in the transaction that
    writes api_keys. So each call reads that stream's version, and reads the key again only
    when the version moved: a revoked key fails on the first request that starts after the
    revocation committed. Expiry is checked against the clock on every call.

    NOTE: a change to api_keys made by hand in SQL, without an event in the keys stream, is
    not seen until the keys stream changes or the process restarts.

    Each call also reads the version of the tenant's configuration stream in the same query
    and records it for this request (ledger.tenants.record_config_version), so that loading
    the tenant's configuration afterwards needs no query of its own.
    """

    def __init__(self, *, max_keys: int = 10_000) -> None:
        self.max_keys = max_keys
        self._keys: dict[UUID, _CachedKey] = {}
        self._lock = threading.Lock()

    def authenticate(
        self, conn: psycopg.Connection[Any], token: str, *, now: datetime | None = None
    ) -> Principal:
        """Return the holder of `token`, as `authenticate` does. A cached key costs one
        round trip on a connection outside a transaction (ledger.database.read_as_tenant)."""
        key_id, digest = parse_token(token)
        cached = self._keys.get(key_id)
        if cached is not None and hmac.compare_digest(cached.secret_sha256, digest):
            keys_version = _read_versions(conn, cached.key.tenant_id)
            if keys_version == cached.keys_version:
                return _principal(key_id, cached.key, now)
        # Unknown here, or its keys stream moved: learn the key's tenant, then read the
        # stream version before the row, so that the row cached is never older than the
        # version it is cached under.
        tenant_id = _find_key(conn, key_id, digest).tenant_id
        keys_version = _read_versions(conn, tenant_id)
        key = _find_key(conn, key_id, digest)
        with self._lock:
            if len(self._keys) >= self.max_keys:
                self._keys.clear()
            self._keys[key_id] = _CachedKey(digest, key, keys_version)
        return _principal(key_id, key, now)

    async def authenticate_cached(
        self,
        conn: psycopg.AsyncConnection[Any],
        token: str,
        *,
        now: datetime | None = None,
    ) -> Principal | None:
        """Return the holder of a cached key whose keys stream has not moved, as
        `authenticate` does, on an async connection in one round trip. Return None, having
        read nothing or only the versions, when `authenticate` has to decide: the key is not
        cached, the secret differs, or the stream moved. Raises AuthenticationFailed for a
        token that is no key, and for a cached key that is revoked or expired."""
        key_id, digest = parse_token(token)
        cached = self._keys.get(key_id)
        if cached is None or not hmac.compare_digest(cached.secret_sha256, digest):
            return None
        rows = await read_as_tenant_async(
            conn, cached.key.tenant_id, _versions_query(cached.key.tenant_id)
        )
        if rows is None or _keys_version(cached.key.tenant_id, rows) != cached.keys_version:
            return None
        return _principal(key_id, cached.key, now)


def _versions_query(tenant_id: str) -> sql.Composable:
    return sql.SQL("SELECT stream_id, version FROM streams WHERE stream_id IN ({}, {})").format(
        sql.Literal(keys_stream_id(tenant_id)), sql.Literal(tenant_stream_id(tenant_id))
    )


def _keys_version(tenant_id: str, rows: list[tuple[Any, ...]]) -> int:
    """Return the keys stream's version from the rows of _versions_query, and record the
    configuration stream's for the current request."""
    versions = dict(rows)
    record_config_version(tenant_id, int(versions.get(tenant_stream_id(tenant_id), 0)))
    return int(versions.get(keys_stream_id(tenant_id), 0))


def _read_versions(conn: psycopg.Connection[Any], tenant_id: str) -> int:
    """Return the version of the tenant's keys stream, and record that of its configuration
    stream for the current request."""
    rows = read_as_tenant(conn, tenant_id, _versions_query(tenant_id))
    if rows is None:
        set_tenant(conn, tenant_id)
        rows = conn.execute(
            "SELECT stream_id, version FROM streams WHERE stream_id = ANY(%s)",
            ([keys_stream_id(tenant_id), tenant_stream_id(tenant_id)],),
        ).fetchall()
    return _keys_version(tenant_id, rows)
