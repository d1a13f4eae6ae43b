"""What-if replay: a tenant's SLA record under a proposed policy, against the one in force.

The tenant's events are read once and folded twice in memory by the SLA projection. The
first fold uses the configuration as recorded. The second puts the proposed
`sla_policies` (and `calendars`, when the proposal gives them) in place of the recorded
sections in every configuration version, from the tenant's creation on. Other sections
(categories, routing) keep their recorded history.
Nothing is appended and no table is written: the live read models, their checkpoints and
the event log stay as they were.

Incidents that keep their own target (imported reports, reports that carry due times) are
judged by that target under any policy, as in the live model, so a proposal changes no
verdict of theirs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg

from ledger.config_sections import (
    SECTIONS,
    current_payloads,
    section_for_event,
    validate_document,
)
from ledger.database import set_tenant
from ledger.errors import ConfigInvalid, ConfigProblem
from ledger.events import normalize_json
from ledger.parking import tenant_parked_positions, without_parked
from ledger.tenants import TenantConfig
from projections.sla import NOT_JUDGED, SlaProjection, SlaState, resolution_breached
from projections.sla_queries import SlaCounts, consistent_snapshot, summarize_states
from replay.time_travel import read_tenant_events

# Sections a proposal may contain. Calendars are allowed because policies name them.
PROPOSAL_SECTIONS = ("calendars", "sla_policies")


@dataclass(frozen=True, slots=True)
class CaseChange:
    """One incident whose resolution verdict differs under the proposal."""

    incident_id: UUID
    category: str | None
    department: str | None
    status: str
    submitted_at: datetime
    resolved_at: datetime | None
    policy_in_force: str | None
    due_in_force: datetime | None
    policy_proposed: str | None
    due_proposed: datetime | None


@dataclass(frozen=True, slots=True)
class CategoryComparison:
    """SLA figures of one category under the policy in force and under the proposal."""

    category: str | None
    in_force: SlaCounts
    proposed: SlaCounts


@dataclass(frozen=True, slots=True)
class WhatIfReport:
    """The difference a proposed policy makes to a tenant's SLA record.

    `newly_breached` lists the incidents that breach under the proposal and not under the
    policy in force; `no_longer_breached` the reverse. Both are sorted by submission time.
    """

    tenant_id: str
    as_of: datetime | None
    known_at: datetime | None
    judged_at: datetime
    events_folded: int
    # Configuration sections the proposal replaces, such as "sla_policies".
    sections: list[str]
    totals_in_force: SlaCounts
    totals_proposed: SlaCounts
    categories: list[CategoryComparison]
    newly_breached: list[CaseChange]
    no_longer_breached: list[CaseChange]

    def to_json(self) -> dict[str, Any]:
        """Return the report as JSON-ready values: times in ISO 8601, ids as text."""
        return {
            "tenant_id": self.tenant_id,
            "as_of": _iso(self.as_of),
            "known_at": _iso(self.known_at),
            "judged_at": _iso(self.judged_at),
            "events_folded": self.events_folded,
            "sections": self.sections,
            "totals": {
                "in_force": counts_json(self.totals_in_force),
                "proposed": counts_json(self.totals_proposed),
            },
            "categories": [
                {
                    "category": item.category,
                    "in_force": counts_json(item.in_force),
                    "proposed": counts_json(item.proposed),
                }
                for item in self.categories
            ],
            "newly_breached": [_change_json(change) for change in self.newly_breached],
            "no_longer_breached": [_change_json(change) for change in self.no_longer_breached],
        }


NOTHING_REPLAYED = "nothing replayed"


def parse_proposal(
    document: Any, tenant: TenantConfig, base_dir: Path | None = None
) -> dict[str, dict[str, Any]]:
    """Validate a proposed policy document; return its payloads by configuration event type.

    The document has the form `civicpulse config apply` takes, limited to the
    `sla_policies` section (required) and `calendars`. Policies may name the tenant's
    current calendars. Raises ConfigInvalid naming every problem, as `config apply` does.
    """
    if isinstance(document, dict):
        problems = [
            ConfigProblem(
                name,
                "",
                None,
                "a what-if replay compares SLA policies only: remove this section, or "
                "apply it with `civicpulse config apply`",
            )
            for name in document
            if name in SECTIONS and name not in PROPOSAL_SECTIONS
        ]
        if "sla_policies" not in document:
            problems.append(
                ConfigProblem(
                    "sla_policies",
                    "",
                    None,
                    "missing: give the proposed policies under `sla_policies`, in the form "
                    "`civicpulse config apply` takes",
                )
            )
        if problems:
            raise ConfigInvalid(problems, outcome=NOTHING_REPLAYED)
    # NOTE: a policy may name a current calendar that the proposal leaves out. Versions
    # recorded before that calendar existed lack it, and there the policy counts business
    # targets in calendar time (see sla_policy._policy).
    try:
        payloads = validate_document(document, current_payloads(tenant), base_dir)
    except ConfigInvalid as error:
        raise ConfigInvalid(error.problems, outcome=NOTHING_REPLAYED) from None
    return {
        SECTIONS[name].event_type: normalize_json(payload) for name, payload in payloads.items()
    }


def what_if(
    conn: psycopg.Connection[Any],
    tenant_id: str,
    proposal: dict[str, dict[str, Any]],
    *,
    judged_at: datetime,
    as_of: datetime | None = None,
    known_at: datetime | None = None,
) -> WhatIfReport:
    """Compare a tenant's SLA record under `proposal` (from `parse_proposal`) with its record
    under the policies in force, judged at `judged_at`.

    `as_of` and `known_at` select the events as time travel does; None means no limit.
    Reads the log on one database snapshot and writes nothing.
    """
    with consistent_snapshot(conn):
        set_tenant(conn, tenant_id)
        events = read_tenant_events(conn, tenant_id, as_of=as_of, known_at=known_at)
        events = without_parked(events, tenant_parked_positions(conn, "sla", tenant_id))

    # Both folds start from nothing, because a snapshot contains rows judged by the policies
    # in force.
    in_force: dict[Any, SlaState] = SlaProjection().fold(events)
    proposed: dict[Any, SlaState] = SlaProjection(proposed=proposal).fold(events)

    newly, no_longer = [], []
    for key, before in in_force.items():
        after = proposed[key]
        if before.status in NOT_JUDGED:
            continue
        was = resolution_breached(before, judged_at)
        will = resolution_breached(after, judged_at)
        if will and not was:
            newly.append(_change(before, after))
        elif was and not will:
            no_longer.append(_change(before, after))

    summary_in_force = summarize_states(in_force.values(), judged_at)["category"]
    summary_proposed = summarize_states(proposed.values(), judged_at)["category"]
    categories = [
        CategoryComparison(
            category,
            summary_in_force.get(category, SlaCounts()),
            summary_proposed.get(category, SlaCounts()),
        )
        for category in sorted(
            summary_in_force.keys() | summary_proposed.keys(), key=lambda name: name or ""
        )
    ]
    return WhatIfReport(
        tenant_id=tenant_id,
        as_of=as_of,
        known_at=known_at,
        judged_at=judged_at,
        events_folded=len(events),
        sections=sorted(_section_name(event_type) for event_type in proposal),
        totals_in_force=sum(summary_in_force.values(), SlaCounts()),
        totals_proposed=sum(summary_proposed.values(), SlaCounts()),
        categories=categories,
        newly_breached=sorted(newly, key=_submission_order),
        no_longer_breached=sorted(no_longer, key=_submission_order),
    )


def _section_name(event_type: str) -> str:
    section = section_for_event(event_type)
    return section.name if section is not None else event_type


def _change(before: SlaState, after: SlaState) -> CaseChange:
    return CaseChange(
        incident_id=before.incident_id,
        category=before.category,
        department=before.department,
        status=before.status,
        submitted_at=before.submitted_at,
        resolved_at=before.resolved_at,
        policy_in_force=before.policy_id,
        due_in_force=before.resolution_due_at,
        policy_proposed=after.policy_id,
        due_proposed=after.resolution_due_at,
    )


def _submission_order(change: CaseChange) -> tuple[datetime, str]:
    return change.submitted_at, str(change.incident_id)


def counts_json(counts: SlaCounts) -> dict[str, Any]:
    return {
        "total": counts.total,
        "with_target": counts.with_target,
        "open": counts.open,
        "breached": counts.breached,
        "on_time": counts.on_time,
        "on_time_rate": counts.on_time_rate,
    }


def _change_json(change: CaseChange) -> dict[str, Any]:
    return {
        "incident_id": str(change.incident_id),
        "category": change.category,
        "department": change.department,
        "status": change.status,
        "submitted_at": _iso(change.submitted_at),
        "resolved_at": _iso(change.resolved_at),
        "policy_in_force": change.policy_in_force,
        "due_in_force": _iso(change.due_in_force),
        "policy_proposed": change.policy_proposed,
        "due_proposed": _iso(change.due_proposed),
    }


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()
