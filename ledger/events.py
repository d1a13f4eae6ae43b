"""Events as they are appended and as they are read back, and the stream hash chain."""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import orjson

from ledger.errors import InvalidEventData
from ledger.ids import new_id

JsonObject = dict[str, Any]

GENESIS_HASH = bytes(32)
_LENGTHS = struct.Struct(">QQQ")

# orjson writes integral floats from 1e16 up with an exponent; PostgreSQL's numeric type
# prints them back as plain integers, which orjson reads as int. Such floats are stored as
# integers from the start, so the hash computed before the append still matches the payload
# read back after it.
_EXPONENT_THRESHOLD = 1e16


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event about to be appended. `event_id` doubles as its idempotency key."""

    event_type: str
    payload: JsonObject
    occurred_at: datetime
    event_id: UUID = field(default_factory=new_id)
    metadata: JsonObject = field(default_factory=dict)
    schema_version: int = 1


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """An event as stored in the log."""

    position: int
    tx_id: int
    tenant_id: str
    stream_id: str
    stream_version: int
    event_type: str
    schema_version: int
    payload: JsonObject
    metadata: JsonObject
    occurred_at: datetime
    recorded_at: datetime
    event_id: UUID
    hash: bytes


def normalize_json(value: Any, path: str = "$") -> Any:
    """Return `value` in the form JSONB stores it, or raise InvalidEventData.

    Rejects what PostgreSQL would reject or silently change: NUL characters, non-finite
    floats, non-string keys and integers outside 64 bits.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidEventData(f"{path} contains a NUL character; remove it")
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise InvalidEventData(f"{path} = {value} is outside 64-bit range; send it as text")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidEventData(f"{path} = {value} is not a finite number")
        if value == 0:
            return 0.0  # numeric has no negative zero: -0.0 would come back as 0.0
        if abs(value) >= _EXPONENT_THRESHOLD and value.is_integer():
            as_int = int(value)
            # orjson reads integers past 64 bits back as floats, so those stay floats.
            if -(2**63) <= as_int < 2**64:
                return as_int
        return value
    if isinstance(value, Mapping):
        normalized = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidEventData(f"{path} has a non-string key {key!r}")
            if "\x00" in key:
                raise InvalidEventData(f"{path} has a key with a NUL character; remove it")
            normalized[key] = normalize_json(item, f"{path}.{key}")
        return normalized
    if isinstance(value, list | tuple):
        return [normalize_json(item, f"{path}[{index}]") for index, item in enumerate(value)]
    raise InvalidEventData(
        f"{path} has a value of type {type(value).__name__}; use JSON types only"
    )


def canonical_json(value: Any) -> bytes:
    """Serialize JSON with sorted keys: the form hashed into the chain."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def event_hash(
    previous_hash: bytes | None,
    *,
    tenant_id: str,
    stream_id: str,
    stream_version: int,
    event_type: str,
    schema_version: int,
    event_id: UUID,
    occurred_at: datetime,
    payload: Any,
    metadata: Any,
) -> bytes:
    """Hash an event's content together with the hash of the event before it in its stream.

    Position, transaction id and `recorded_at` are assigned by the database and are not
    covered. TODO: cover them with seals over ranges of positions, which do not exist yet.
    """
    return event_hash_serialized(
        previous_hash,
        tenant_id=tenant_id,
        stream_id=stream_id,
        stream_version=stream_version,
        event_type=event_type,
        schema_version=schema_version,
        event_id=str(event_id),
        occurred_at_utc=utc_text(occurred_at),
        payload_json=canonical_json(payload),
        metadata_json=canonical_json(metadata),
    )


def utc_text(moment: datetime) -> str:
    """Format a time as the hash covers it: UTC, ISO 8601, microseconds."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def event_hash_serialized(
    previous_hash: bytes | None,
    *,
    tenant_id: str,
    stream_id: str,
    stream_version: int,
    event_type: str,
    schema_version: int,
    event_id: str,
    occurred_at_utc: str,
    payload_json: bytes,
    metadata_json: bytes,
) -> bytes:
    """`event_hash` over values already serialized, for bulk imports.

    `occurred_at_utc` is the time as `utc_text` writes it; payload and metadata are in
    canonical JSON.
    """
    header = orjson.dumps(
        [
            tenant_id,
            stream_id,
            stream_version,
            event_type,
            schema_version,
            event_id,
            occurred_at_utc,
        ]
    )
    # One SHA-256 over the previous hash, the three part lengths and the parts: the
    # lengths keep the parts apart, and a single call is what a bulk import can afford.
    lengths = _LENGTHS.pack(len(header), len(payload_json), len(metadata_json))
    return hashlib.sha256(
        b"".join((previous_hash or GENESIS_HASH, lengths, header, payload_json, metadata_json))
    ).digest()


def recorded_event_hash(event: RecordedEvent, previous_hash: bytes | None) -> bytes:
    """Recompute the hash a recorded event should carry."""
    return event_hash(
        previous_hash,
        tenant_id=event.tenant_id,
        stream_id=event.stream_id,
        stream_version=event.stream_version,
        event_type=event.event_type,
        schema_version=event.schema_version,
        event_id=event.event_id,
        occurred_at=event.occurred_at,
        payload=event.payload,
        metadata=event.metadata,
    )


def require_aware(moment: datetime, name: str) -> datetime:
    """Reject naive datetimes: every stored time carries its offset."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise InvalidEventData(f"{name} = {moment.isoformat()} has no time zone offset")
    return moment
