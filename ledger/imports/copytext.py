"""Rows of the events table in PostgreSQL's COPY formats, binary and text.

Import workers format rows here, so the single writer only streams bytes to the server.
They use the binary format: the server then reads times, ids, hashes and numbers as they
are, where the text format makes it parse each. On the Boston export's 222,417 events, a
COPY into a bare table took 1.03 s in binary against 1.69 s in text. The writer's one
COPY is what an import waits on, so its server time is the import's time.

A binary row is a field count, then each field as its length and its bytes: text in
UTF-8, integers big-endian, jsonb as a version byte (1) and the JSON text, timestamptz as
microseconds since 2000-01-01 UTC, uuid as its 16 bytes and bytea as it is. A COPY starts
with BINARY_SIGNATURE; psycopg adds the end marker.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from ledger.events import canonical_json, event_hash_serialized

EVENT_COPY_COLUMNS = (
    "tenant_id, stream_id, stream_version, event_type, schema_version, payload, metadata, "
    "occurred_at, event_id, hash"
)


# The signature, no flags, and no header extension.
BINARY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_FIELD_COUNT = struct.pack(">h", 10)
_LENGTH = struct.Struct(">i")
_INT4 = struct.Struct(">ii")  # a length of 4 and the value
_INT2 = struct.Struct(">ih")  # a length of 2 and the value
_TIMESTAMP = struct.Struct(">iq")  # a length of 8 and the microseconds
_UUID_LENGTH = _LENGTH.pack(16)
_JSONB_VERSION = b"\x01"
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def text_field(value: str) -> bytes:
    """Return a text value as a binary COPY field."""
    data = value.encode()
    return _LENGTH.pack(len(data)) + data


def jsonb_field(json: bytes) -> bytes:
    """Return JSON text as a binary COPY jsonb field."""
    return _LENGTH.pack(len(json) + 1) + _JSONB_VERSION + json


def binary_row(
    tenant_field: bytes,
    stream_id: str,
    stream_version: int,
    event_type: str,
    payload_json: bytes,
    metadata_field: bytes,
    occurred_at_utc: str,
    event_id: str,
    digest: bytes,
    schema_version: int = 1,
) -> bytes:
    """Return one events row in binary COPY format, in the columns of EVENT_COPY_COLUMNS.

    `tenant_field` and `metadata_field` come from text_field and jsonb_field, made once
    per chunk since every row of an import repeats them. `occurred_at_utc` is UTC text
    in ISO 8601, as LocalTimeReader.utc_text writes it.
    """
    micros = (datetime.fromisoformat(occurred_at_utc) - _PG_EPOCH) // _MICROSECOND
    return b"".join(
        (
            _FIELD_COUNT,
            tenant_field,
            text_field(stream_id),
            _INT4.pack(4, stream_version),
            text_field(event_type),
            _INT2.pack(2, schema_version),
            jsonb_field(payload_json),
            metadata_field,
            _TIMESTAMP.pack(8, micros),
            _UUID_LENGTH,
            bytes.fromhex(event_id.replace("-", "")),
            _LENGTH.pack(len(digest)),
            digest,
        )
    )


class EventRows:
    """A builder of the binary COPY rows of one import's events, which share a tenant and
    the import's metadata."""

    def __init__(self, tenant_id: str, metadata_json: bytes) -> None:
        self.tenant_id = tenant_id
        self.metadata_json = metadata_json
        self._tenant_field = text_field(tenant_id)
        self._metadata_field = jsonb_field(metadata_json)

    def row(
        self,
        stream_id: str,
        stream_version: int,
        event_type: str,
        occurred_at_utc: str,
        payload: dict[str, Any],
        event_id: str,
        previous: bytes | None,
    ) -> tuple[bytes, bytes]:
        """Return an event's binary COPY row and its hash, chained to `previous`. Payload
        entries whose value is None are left out."""
        payload_json = canonical_json({k: v for k, v in payload.items() if v is not None})
        digest = event_hash_serialized(
            previous,
            tenant_id=self.tenant_id,
            stream_id=stream_id,
            stream_version=stream_version,
            event_type=event_type,
            schema_version=1,
            event_id=event_id,
            occurred_at_utc=occurred_at_utc,
            payload_json=payload_json,
            metadata_json=self.metadata_json,
        )
        row = binary_row(
            self._tenant_field,
            stream_id,
            stream_version,
            event_type,
            payload_json,
            self._metadata_field,
            occurred_at_utc,
            event_id,
            digest,
        )
        return row, digest


def binary_rows(data: bytes) -> list[bytes]:
    """Split binary COPY rows (without the signature) into one bytes object per row."""
    rows = []
    start = 0
    while start < len(data):
        _, end = _binary_fields(data, start)
        rows.append(data[start:end])
        start = end
    return rows


def _binary_fields(data: bytes, start: int = 0) -> tuple[list[bytes | None], int]:
    """Read the binary COPY row at `start`; return its fields (None for NULL) and where it
    ends."""
    fields: list[bytes | None] = []
    position = start + 2
    for _ in range(struct.unpack_from(">h", data, start)[0]):
        (length,) = _LENGTH.unpack_from(data, position)
        position += 4
        if length < 0:
            fields.append(None)
            continue
        fields.append(data[position : position + length])
        position += length
    return fields, position


def escape(text: str) -> str:
    """Escape a value for COPY text format."""
    if "\\" in text:
        text = text.replace("\\", "\\\\")
    if "\t" in text or "\n" in text or "\r" in text:
        text = text.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return text


def unescape(text: str) -> str:
    """Undo `escape`. COPY text escapes are one backslash and one letter or backslash."""
    if "\\" not in text:
        return text
    out = []
    index = 0
    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text):
            following = text[index + 1]
            out.append({"t": "\t", "n": "\n", "r": "\r"}.get(following, following))
            index += 2
        else:
            out.append(char)
            index += 1
    return "".join(out)


@dataclass(frozen=True, slots=True)
class EventLine:
    """One events row, in the fields a COPY line carries."""

    tenant_id: str
    stream_id: str
    stream_version: int
    event_type: str
    schema_version: int
    payload_json: str
    metadata_json: str
    occurred_at: datetime
    event_id: str
    hash: bytes

    def encode(self) -> str:
        return (
            "\t".join(
                (
                    escape(self.tenant_id),
                    escape(self.stream_id),
                    str(self.stream_version),
                    escape(self.event_type),
                    str(self.schema_version),
                    escape(self.payload_json),
                    escape(self.metadata_json),
                    self.occurred_at.isoformat(),
                    self.event_id,
                    "\\\\x" + self.hash.hex(),
                )
            )
            + "\n"
        )

    def encode_binary(self) -> bytes:
        return binary_row(
            text_field(self.tenant_id),
            self.stream_id,
            self.stream_version,
            self.event_type,
            self.payload_json.encode(),
            jsonb_field(self.metadata_json.encode()),
            self.occurred_at.isoformat(),
            self.event_id,
            self.hash,
            self.schema_version,
        )

    @classmethod
    def decode_binary(cls, row: bytes) -> EventLine:
        read, _ = _binary_fields(row)
        if len(read) != 10 or None in read:
            raise ValueError(
                f"an events COPY row has 10 fields and no NULL, this one has {len(read)} "
                f"fields and {read.count(None)} NULL"
            )
        fields = [field for field in read if field is not None]
        return cls(
            tenant_id=fields[0].decode(),
            stream_id=fields[1].decode(),
            stream_version=int.from_bytes(fields[2], "big", signed=True),
            event_type=fields[3].decode(),
            schema_version=int.from_bytes(fields[4], "big", signed=True),
            payload_json=fields[5][1:].decode(),
            metadata_json=fields[6][1:].decode(),
            occurred_at=_PG_EPOCH + int.from_bytes(fields[7], "big", signed=True) * _MICROSECOND,
            event_id=str(UUID(bytes=fields[8])),
            hash=fields[9],
        )

    @classmethod
    def decode(cls, line: str) -> EventLine:
        fields = line.rstrip("\n").split("\t")
        if len(fields) != 10:
            raise ValueError(f"an events COPY line has 10 fields, this one has {len(fields)}")
        return cls(
            tenant_id=unescape(fields[0]),
            stream_id=unescape(fields[1]),
            stream_version=int(fields[2]),
            event_type=unescape(fields[3]),
            schema_version=int(fields[4]),
            payload_json=unescape(fields[5]),
            metadata_json=unescape(fields[6]),
            occurred_at=datetime.fromisoformat(fields[7]),
            event_id=fields[8],
            hash=bytes.fromhex(unescape(fields[9]).removeprefix("\\x")),
        )
