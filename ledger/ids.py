"""Identifiers for incidents and events.

Ids are derived from names where retries and re-imports must map to the same id. They are
ordered by time or by source number, so new index entries land at the end of the unique
indexes instead of on random pages.
"""

from __future__ import annotations

import hashlib
import os
import time
from uuid import UUID

NAMESPACE = UUID("5b0f3a52-8d1e-4c3e-9a55-0c1b7e4d2f61")
_NAMESPACE_BYTES = NAMESPACE.bytes

# Source numbers up to this value fit the 48-bit prefix of an ordered id.
MAX_ORDERED_NUMBER = 2**48 - 1


def incident_stream_id(incident_id: UUID | str) -> str:
    return f"incident-{incident_id}"


def derived_id_text(*parts: str) -> str:
    """Return the text of `derived_id(*parts)` without building a UUID object.

    This is uuid5 (RFC 9562) spelled out, for import workers that derive ids for every row.
    """
    digest = hashlib.sha1(_NAMESPACE_BYTES + "/".join(parts).encode()).hexdigest()
    variant = "89ab"[int(digest[16], 16) & 0x3]
    return f"{digest[:8]}-{digest[8:12]}-5{digest[13:16]}-{variant}{digest[17:20]}-{digest[20:32]}"


def derived_id(*parts: str) -> UUID:
    """Return a UUID determined by `parts`: the same parts always give the same id."""
    return UUID(derived_id_text(*parts))


def ordered_id_text(number: int, *parts: str) -> str:
    """Return a UUID (version 8, RFC 9562) whose first 48 bits are `number`.

    The other 74 bits come from a SHA-1 of `parts`, so the id is as deterministic as
    `derived_id_text`, and ids of sources numbered in order (such as a city's case numbers)
    sort in that order.
    """
    digest = hashlib.sha1(_NAMESPACE_BYTES + "/".join(parts).encode()).hexdigest()
    return ordered_id_from_digest(number, digest)


def ordered_id_from_digest(number: int, digest: str) -> str:
    """Return the ordered id of `number` whose other bits are the first 19 hex digits of
    `digest`. Slices of one long digest give a case several ids for the cost of one hash.
    """
    if not 0 <= number <= MAX_ORDERED_NUMBER:
        raise ValueError(f"number {number} does not fit the 48-bit prefix of an ordered id")
    prefix = f"{number:012x}"
    return ordered_id_with_prefix(f"{prefix[:8]}-{prefix[8:]}-8", digest)


# The RFC 9562 variant digit for each hex digit of a digest: its low two bits after "10".
_VARIANT = {digit: "89ab"[int(digit, 16) & 0x3] for digit in "0123456789abcdef"}


def ordered_id_with_prefix(prefix: str, digest: str) -> str:
    """Finish an ordered id from its formatted prefix ("xxxxxxxx-xxxx-8") and a digest."""
    return f"{prefix}{digest[:3]}-{_VARIANT[digest[3]]}{digest[4:7]}-{digest[7:19]}"


def new_id() -> UUID:
    """Return a new random UUID (version 7, RFC 9562) that sorts by creation time.

    The first 48 bits are the Unix time in milliseconds, the other 74 are random.
    """
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    value &= ~(0xF << 76)
    value |= 0x7 << 76  # version 7
    value &= ~(0x3 << 62)
    value |= 0x2 << 62  # RFC 9562 variant
    return UUID(int=value)
