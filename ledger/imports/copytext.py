"""Rows of the events table in PostgreSQL's COPY text format.

Import workers format rows here, so the single writer only streams bytes to the server.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

EVENT_COPY_COLUMNS = (
    "tenant_id, stream_id, stream_version, event_type, schema_version, payload, metadata, "
    "occurred_at, event_id, hash"
)


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
