"""Queries over the grouping read model: a report's group, and duplicates of a draft."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg

from ledger.grouping import (
    GroupedReport,
    GroupingSettings,
    candidates,
    cells_near,
    distance_m,
    text_similarity,
)


@dataclass(frozen=True, slots=True)
class GroupMember:
    """A report of a group, without its text or anything about its reporter."""

    incident_id: UUID
    category: str | None
    status: str | None
    submitted_at: datetime
    latitude: float | None
    longitude: float | None


@dataclass(frozen=True, slots=True)
class Suggestion:
    """A stored report that may be the same issue as a draft."""

    incident_id: UUID
    group_id: UUID
    category: str | None
    status: str | None
    submitted_at: datetime
    distance_m: float
    text_similarity: float | None


def group_members(
    conn: psycopg.Connection[Any], tenant_id: str, incident_id: UUID
) -> tuple[UUID, list[GroupMember]] | None:
    """Return the report's group id and members, oldest first, or None when the grouping
    read model has no row for it yet. The connection must be scoped to the tenant."""
    row = conn.execute(
        "SELECT group_id FROM grouping_reports WHERE tenant_id = %s AND incident_id = %s",
        (tenant_id, incident_id),
    ).fetchone()
    if row is None:
        return None
    group_id: UUID = row[0]
    members = conn.execute(
        """
        SELECT g.incident_id, g.category, i.status, g.submitted_at, g.latitude, g.longitude
        FROM grouping_reports AS g
        LEFT JOIN incidents AS i USING (tenant_id, incident_id)
        WHERE g.tenant_id = %s AND g.group_id = %s
        ORDER BY g.submitted_at, g.incident_id
        """,
        (tenant_id, group_id),
    ).fetchall()
    return group_id, [GroupMember(*member) for member in members]


def suggest_duplicates(
    conn: psycopg.Connection[Any],
    tenant_id: str,
    settings: GroupingSettings,
    draft: GroupedReport,
    *,
    limit: int = 10,
) -> list[Suggestion]:
    """Return the stored reports the grouping rule pairs with a draft, nearest first.

    The draft counts as submitted at `draft.submitted_at`. A draft without a usable location
    gets no suggestions. The connection must be scoped to the tenant.
    """
    if draft.latitude is None or draft.longitude is None:
        return []
    if settings.is_placeholder(draft.latitude, draft.longitude):
        return []
    window = timedelta(hours=settings.window_hours)
    rows = conn.execute(
        """
        SELECT g.incident_id, g.submitted_at, g.category, g.category_source, g.text,
               g.latitude, g.longitude, g.group_id, i.status
        FROM grouping_reports AS g
        LEFT JOIN incidents AS i USING (tenant_id, incident_id)
        WHERE g.tenant_id = %s AND g.cell = ANY(%s) AND g.submitted_at BETWEEN %s AND %s
        """,
        (
            tenant_id,
            list(cells_near(draft.latitude, draft.longitude, settings.distance_m)),
            draft.submitted_at - window,
            draft.submitted_at + window,
        ),
    ).fetchall()
    found = []
    for *fields, group_id, status in rows:
        stored = GroupedReport(*fields)
        if not candidates(settings, draft, stored):
            continue
        assert stored.latitude is not None and stored.longitude is not None
        similarity = (
            text_similarity(draft.text, stored.text) if draft.text and stored.text else None
        )
        found.append(
            Suggestion(
                incident_id=stored.incident_id,
                group_id=group_id,
                category=stored.category,
                status=status,
                submitted_at=stored.submitted_at,
                distance_m=round(
                    distance_m(draft.latitude, draft.longitude, stored.latitude, stored.longitude),
                    1,
                ),
                text_similarity=similarity,
            )
        )
    found.sort(key=lambda item: (item.distance_m, -(item.text_similarity or 0)))
    return found[:limit]
