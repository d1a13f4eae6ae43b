"""Identifiers derived from names, so that retries and re-imports map to the same ids."""

from __future__ import annotations

from uuid import UUID, uuid5

NAMESPACE = UUID("5b0f3a52-8d1e-4c3e-9a55-0c1b7e4d2f61")


def incident_stream_id(incident_id: UUID) -> str:
    return f"incident-{incident_id}"


def derived_id(*parts: str) -> UUID:
    """Return a UUID determined by `parts`: the same parts always give the same id."""
    return uuid5(NAMESPACE, "/".join(parts))
