"""Identifiers derived from names, so that retries and re-imports map to the same ids."""

from __future__ import annotations

import hashlib
from uuid import UUID

NAMESPACE = UUID("5b0f3a52-8d1e-4c3e-9a55-0c1b7e4d2f61")
_NAMESPACE_BYTES = NAMESPACE.bytes


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
