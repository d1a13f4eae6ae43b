"""The duplicate grouping read model: groups of likely duplicate reports, per tenant.

Groups are the connected components of a graph whose nodes are reports and whose edges are
`match` links (the symmetric rule of ledger.grouping) and `merge` links (staff merges). A
`split` link, left by a staff split, keeps the rule from linking that pair again. Each group
is named by the smallest incident id among its members, so neither arrival order nor the
members' statuses change a group or its name.

Every event takes effect in log order with the settings in force at its position: a link
found under old settings stays when the settings change. A report's links are evaluated
again when its category changes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar
from uuid import UUID

import psycopg
from psycopg.types.json import Jsonb

from ledger import lifecycle as lc
from ledger.events import RecordedEvent
from ledger.grouping import (
    DEFAULT_SETTINGS,
    GROUPING_CONFIGURED,
    GroupedReport,
    GroupingSettings,
    candidates,
    cell_of,
    cells_near,
    report_text,
    settings_from_payload,
    usable_location,
)
from projections.base import INCIDENT_STREAM_PREFIX, Projection

logger = logging.getLogger(__name__)

MATCH = "match"
MERGE = "merge"
SPLIT = "split"
JOINING = frozenset({MATCH, MERGE})

GROUPING_EVENT_TYPES = frozenset(
    {
        lc.REPORT_SUBMITTED,
        lc.REPORT_CLASSIFIED,
        lc.CLASSIFICATION_CORRECTED,
        lc.REPORTS_MERGED,
        lc.REPORT_SPLIT_FROM_GROUP,
        GROUPING_CONFIGURED,
    }
)

Key = tuple[str, UUID]
TextKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class GroupingTables:
    """The three tables of the read model, as comparable values."""

    settings: dict[str, tuple[dict[str, Any], int]] = field(default_factory=dict)
    reports: dict[Key, tuple[Any, ...]] = field(default_factory=dict)
    links: set[tuple[str, UUID, UUID, str]] = field(default_factory=set)


def _incident_key(event: RecordedEvent) -> Key:
    return event.tenant_id, UUID(event.stream_id.removeprefix(INCIDENT_STREAM_PREFIX))


def _text_key(event: RecordedEvent) -> TextKey:
    return event.tenant_id, event.stream_id.removeprefix(INCIDENT_STREAM_PREFIX)


def new_report(event: RecordedEvent, incident_id: Any) -> GroupedReport:
    """Build the grouping view of a report from its ReportSubmitted event."""
    payload = event.payload
    latitude: Any = payload.get("latitude")
    longitude: Any = payload.get("longitude")
    located = isinstance(latitude, int | float) and isinstance(longitude, int | float)
    category = payload.get("category")
    return GroupedReport(
        incident_id=incident_id,
        submitted_at=event.occurred_at,
        category=category,
        category_source=lc.CATEGORY_FROM_REPORT if category else None,
        text=report_text(payload),
        latitude=float(latitude) if located else None,
        longitude=float(longitude) if located else None,
    )


def category_after(report: GroupedReport, event: RecordedEvent) -> tuple[str | None, str | None]:
    """Return the category and its source after a classification event.

    The same precedence as the incident fold: a staff correction wins over everything, and
    the latest one wins. A classifier fills in only a category the report did not bring.
    Any correction, even of severity alone, marks the source "staff", because the incident
    fold ignores classifier results from then on.
    """
    payload = event.payload
    if event.event_type == lc.CLASSIFICATION_CORRECTED:
        return payload.get("category") or report.category, lc.CATEGORY_FROM_STAFF
    if report.category_source in (lc.CATEGORY_FROM_STAFF, lc.CATEGORY_FROM_REPORT):
        return report.category, report.category_source
    if payload.get("category"):
        return payload["category"], lc.CATEGORY_FROM_CLASSIFIER
    return report.category, report.category_source


def report_row(report: GroupedReport, group_id: Any) -> tuple[Any, ...]:
    """Return the grouping_reports columns after tenant_id and incident_id."""
    located = report.latitude is not None and report.longitude is not None
    return (
        report.submitted_at,
        report.category,
        report.category_source,
        report.text,
        report.latitude,
        report.longitude,
        cell_of(report.latitude, report.longitude) if located else None,  # type: ignore[arg-type]
        group_id,
    )


class _Batch:
    """The part of the read model one batch touches, loaded up front, changed in memory in
    log order, then written back.

    Incident ids are kept as text here: hashing and comparing UUID objects costs more than
    the grouping rule itself, and the text form of a UUID sorts as its bytes do.
    """

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.settings: dict[str, GroupingSettings] = {}
        self.settings_changed: dict[str, int] = {}
        self.reports: dict[TextKey, GroupedReport] = {}
        self.group_of: dict[TextKey, str] = {}
        self.new: set[TextKey] = set()
        self.changed: set[TextKey] = set()
        # (tenant, cell, category) -> reports: the in-memory spatial index.
        self.index: dict[tuple[str, int, str | None], list[TextKey]] = defaultdict(list)
        # Whether each report's location is usable under the settings in force; emptied
        # when a tenant's settings change.
        self.usable: dict[TextKey, bool] = {}
        # Links stored before the batch, loaded per report on first use.
        self.stored_links: dict[TextKey, dict[str, str]] = {}
        # Link changes of this batch, per endpoint (None removes a link).
        self.pending: dict[TextKey, dict[str, str | None]] = defaultdict(dict)
        # Reports that lost a link that joined them to another: their groups may divide.
        self.divided: set[TextKey] = set()

    # Loading.

    def load(self, events: list[RecordedEvent]) -> None:
        tenants = {event.tenant_id for event in events}
        with self.conn.cursor() as cur:
            cur.execute(
                "SELECT tenant_id, settings FROM grouping_settings WHERE tenant_id = ANY(%s)",
                (list(tenants),),
            )
            for tenant_id, settings in cur:
                self.settings[tenant_id] = settings_from_payload(settings)

        # Reports the batch names by id (classified, merged or split ones), the categories
        # each report may have during the batch, and every settings version in force.
        named: dict[str, set[str]] = defaultdict(set)
        submitted: dict[TextKey, RecordedEvent] = {}
        categories: dict[TextKey, set[str | None]] = defaultdict(set)
        versions: dict[str, list[GroupingSettings]] = defaultdict(list)
        for tenant_id in tenants:
            versions[tenant_id].append(self.settings_for(tenant_id))
        for event in events:
            kind = event.event_type
            if kind == GROUPING_CONFIGURED:
                versions[event.tenant_id].append(settings_from_payload(event.payload))
                continue
            key = _text_key(event)
            if kind == lc.REPORT_SUBMITTED:
                submitted[key] = event
                categories[key].add(event.payload.get("category"))
                continue
            named[key[0]].add(key[1])
            if kind in (lc.REPORT_CLASSIFIED, lc.CLASSIFICATION_CORRECTED):
                categories[key].add(event.payload.get("category"))
            elif kind == lc.REPORTS_MERGED:
                named[key[0]].add(str(UUID(event.payload["with_incident"])))
        for tenant_id, ids in named.items():
            self._load_reports(
                tenant_id,
                condition="g.incident_id = ANY(%s::uuid[])",
                params=(tenant_id, list(ids)),
            )
            self._load_links(tenant_id, ids)

        # Every stored report that a report of this batch may be evaluated against: in a
        # nearby cell, inside the time window, in a related category, under any settings
        # version in force during the batch.
        points: dict[TextKey, tuple[Any, Any, datetime]] = {
            key: (event.payload.get("latitude"), event.payload.get("longitude"), event.occurred_at)
            for key, event in submitted.items()
        }
        for key, report in self.reports.items():
            points[key] = (report.latitude, report.longitude, report.submitted_at)
            categories[key].add(report.category)
        for tenant_id in tenants:
            in_force = versions[tenant_id]
            distance = max(settings.distance_m for settings in in_force)
            window = timedelta(hours=max(settings.window_hours for settings in in_force))
            pairs: set[tuple[int, str | None]] = set()
            times = []
            for key, (lat, lon, at) in points.items():
                if key[0] != tenant_id or not isinstance(lat, int | float):
                    continue
                if not isinstance(lon, int | float):
                    continue
                related = {
                    other
                    for category in categories[key]
                    for settings in in_force
                    for other in settings.categories_related_to(category)
                }
                times.append(at)
                for cell in cells_near(lat, lon, distance):
                    pairs.update((cell, category) for category in related)
            if not pairs:
                continue
            cells, names = zip(*pairs, strict=True)
            # A join on the pairs, so that each pair is one search of the cell index. A
            # missing category and an empty one share the key '': the rule distinguishes them.
            self._load_reports(
                tenant_id,
                source="unnest(%s::bigint[], %s::text[]) AS q(cell, category) "
                "JOIN grouping_reports AS g "
                "ON g.cell = q.cell AND coalesce(g.category, '') = q.category",
                condition="g.submitted_at BETWEEN %s AND %s",
                params=(
                    list(cells),
                    [name or "" for name in names],
                    tenant_id,
                    min(times) - window,
                    max(times) + window,
                ),
            )

    def settings_for(self, tenant_id: str) -> GroupingSettings:
        return self.settings.get(tenant_id, DEFAULT_SETTINGS)

    def _load_reports(
        self,
        tenant_id: str,
        source: str = "grouping_reports AS g",
        condition: str = "",
        params: tuple[Any, ...] = (),
    ) -> None:
        """Add the stored reports of `source` that match `condition` to the batch.

        `params` fill the placeholders of `source`, then the tenant id, then `condition`.
        """
        query = (
            "SELECT g.incident_id::text, g.submitted_at, g.category, g.category_source, g.text, "
            f"g.latitude, g.longitude, g.group_id::text FROM {source} "
            f"WHERE g.tenant_id = %s AND {condition}"
        )
        with self.conn.cursor() as cur:
            cur.execute(query, params)
            for incident_id, *values, group_id in cur:
                key = (tenant_id, incident_id)
                if key not in self.reports:
                    self._add(key, GroupedReport(incident_id, *values))
                    self.group_of[key] = group_id

    def _load_links(self, tenant_id: str, ids: Iterable[str]) -> None:
        missing = [i for i in ids if (tenant_id, i) not in self.stored_links]
        for incident_id in missing:
            self.stored_links[(tenant_id, incident_id)] = {}
        with self.conn.cursor() as cur:
            cur.execute(
                "SELECT incident_id::text, other_id::text, kind FROM grouping_links "
                "WHERE tenant_id = %s AND incident_id = ANY(%s::uuid[])",
                (tenant_id, missing),
            )
            for incident_id, other_id, kind in cur:
                self.stored_links[(tenant_id, incident_id)][other_id] = kind

    def _add(self, key: TextKey, report: GroupedReport) -> None:
        self.reports[key] = report
        if report.latitude is not None and report.longitude is not None:
            cell = cell_of(report.latitude, report.longitude)
            self.index[(key[0], cell, report.category)].append(key)

    def _remove_from_index(self, key: TextKey, report: GroupedReport) -> None:
        if report.latitude is not None and report.longitude is not None:
            cell = cell_of(report.latitude, report.longitude)
            self.index[(key[0], cell, report.category)].remove(key)

    def _usable(self, key: TextKey, settings: GroupingSettings) -> bool:
        usable = self.usable.get(key)
        if usable is None:
            usable = self.usable[key] = usable_location(settings, self.reports[key])
        return usable

    # Links.

    def links_of(self, key: TextKey) -> dict[str, str]:
        """Return the report's links as they stand at this point of the batch."""
        if key in self.new:
            stored: dict[str, str] = {}
        else:
            if key not in self.stored_links:
                self._load_links(key[0], [key[1]])
            stored = self.stored_links[key]
        changes = self.pending.get(key)
        if not changes:
            return stored
        merged = {**stored, **changes}
        return {other: kind for other, kind in merged.items() if kind is not None}

    def link_kind(self, key: TextKey, other: TextKey) -> str | None:
        changes = self.pending.get(key)
        if changes and other[1] in changes:
            return changes[other[1]]
        if key in self.new or other in self.new:
            return None
        return self.links_of(key).get(other[1])

    def set_link(self, key: TextKey, other: TextKey, kind: str | None) -> None:
        if kind not in JOINING and self.link_kind(key, other) in JOINING:
            self.divided.update((key, other))
        self.pending[key][other[1]] = kind
        self.pending[other][key[1]] = kind

    def component(self, key: TextKey) -> set[TextKey]:
        """Return the report's group at this point of the batch (breadth-first search)."""
        seen = {key}
        frontier = [key]
        while frontier:
            current = frontier.pop()
            for other_id, kind in self.links_of(current).items():
                other = (key[0], other_id)
                if kind in JOINING and other not in seen:
                    seen.add(other)
                    frontier.append(other)
        return seen

    # Events.

    def apply(self, event: RecordedEvent) -> None:
        kind = event.event_type
        if kind == GROUPING_CONFIGURED:
            self.settings[event.tenant_id] = settings_from_payload(event.payload)
            self.settings_changed[event.tenant_id] = event.stream_version
            self.usable = {
                key: value for key, value in self.usable.items() if key[0] != event.tenant_id
            }
            return
        key = _text_key(event)
        if kind == lc.REPORT_SUBMITTED:
            if key in self.reports:
                return
            self.new.add(key)
            self.group_of[key] = key[1]
            self._add(key, new_report(event, key[1]))
            self.evaluate(key)
            return
        report_or_none = self.reports.get(key)
        if report_or_none is None:
            logger.warning(
                "grouping skips %s of tenant %s incident %s: no report was projected for it",
                kind,
                key[0],
                key[1],
            )
            return
        report = report_or_none
        if kind in (lc.REPORT_CLASSIFIED, lc.CLASSIFICATION_CORRECTED):
            category, source = category_after(report, event)
            if source != report.category_source:
                report.category_source = source
                self.changed.add(key)
            if category != report.category:
                self._remove_from_index(key, report)
                report.category = category
                self._add(key, report)
                self.changed.add(key)
                for other_id, link in self.links_of(key).items():
                    if link == MATCH:
                        self.set_link(key, (key[0], other_id), None)
                self.evaluate(key)
        elif kind == lc.REPORTS_MERGED:
            other = (key[0], str(UUID(event.payload["with_incident"])))
            if other not in self.reports:
                logger.warning(
                    "grouping skips a merge of tenant %s incident %s with unknown incident %s",
                    key[0],
                    key[1],
                    other[1],
                )
                return
            self.set_link(key, other, MERGE)
        elif kind == lc.REPORT_SPLIT_FROM_GROUP:
            for member in self.component(key) - {key}:
                self.set_link(key, member, SPLIT)

    def evaluate(self, key: TextKey) -> None:
        """Link the report with every report the rule pairs it with, unless staff decided."""
        tenant_id = key[0]
        settings = self.settings_for(tenant_id)
        report = self.reports[key]
        if not self._usable(key, settings):
            return
        assert report.latitude is not None and report.longitude is not None
        cells = cells_near(report.latitude, report.longitude, settings.distance_m)
        index = self.index
        for category in settings.categories_related_to(report.category):
            for cell in cells:
                for other in index.get((tenant_id, cell, category), ()):
                    if other == key or self.link_kind(key, other) is not None:
                        continue  # itself, or already linked, merged or split by staff
                    if self._usable(other, settings) and candidates(
                        settings, report, self.reports[other], checked_locations=True
                    ):
                        self.set_link(key, other, MATCH)

    # Writing.

    def write(self) -> None:
        cur = self.conn.cursor()
        for tenant_id, version in self.settings_changed.items():
            cur.execute(
                "INSERT INTO grouping_settings (tenant_id, settings, version) VALUES (%s, %s, %s) "
                "ON CONFLICT (tenant_id) DO UPDATE SET settings = EXCLUDED.settings, "
                "version = EXCLUDED.version",
                (tenant_id, Jsonb(self.settings[tenant_id].to_payload()), version),
            )
        if self.new:
            # COPY cannot write to a table with row-level security: it goes to a temporary
            # table first.
            cur.execute(
                "CREATE TEMP TABLE IF NOT EXISTS grouping_reports_batch "
                "(LIKE grouping_reports) ON COMMIT DELETE ROWS"
            )
            with cur.copy("COPY grouping_reports_batch FROM STDIN") as copy:
                for key in self.new:
                    copy.write_row((*key, *report_row(self.reports[key], key[1])))
            cur.execute("INSERT INTO grouping_reports SELECT * FROM grouping_reports_batch")
            cur.execute("TRUNCATE grouping_reports_batch")
        updates = [
            (self.reports[key].category, self.reports[key].category_source, *key)
            for key in self.changed - self.new
        ]
        if updates:
            cur.executemany(
                "UPDATE grouping_reports SET category = %s, category_source = %s "
                "WHERE tenant_id = %s AND incident_id = %s",
                updates,
            )
        self._write_links(cur)
        self._relabel(cur)

    def _write_links(self, cur: psycopg.Cursor[Any]) -> None:
        upserts = []
        removals = []
        for (tenant_id, incident_id), changes in self.pending.items():
            for other_id, kind in changes.items():
                if kind is None:
                    removals.append((tenant_id, incident_id, other_id))
                else:
                    upserts.append((tenant_id, incident_id, other_id, kind))
        if removals:
            cur.executemany(
                "DELETE FROM grouping_links "
                "WHERE tenant_id = %s AND incident_id = %s AND other_id = %s",
                removals,
            )
        if upserts:
            cur.execute(
                "CREATE TEMP TABLE IF NOT EXISTS grouping_links_batch "
                "(LIKE grouping_links) ON COMMIT DELETE ROWS"
            )
            with cur.copy(
                "COPY grouping_links_batch (tenant_id, incident_id, other_id, kind) FROM STDIN"
            ) as copy:
                for row in upserts:
                    copy.write_row(row)
            cur.execute(
                "INSERT INTO grouping_links SELECT * FROM grouping_links_batch "
                "ON CONFLICT (tenant_id, incident_id, other_id) DO UPDATE SET kind = EXCLUDED.kind"
            )
            cur.execute("TRUNCATE grouping_links_batch")

    def _relabel(self, cur: psycopg.Cursor[Any]) -> None:
        """Name each group whose links changed after its smallest member.

        New links join groups: the groups before the batch that they connect become one,
        named by the smallest of their names, and no link needs reading. Where a link that
        joined two reports went away, the group may divide, so its members and links are
        read and its parts found again.
        """
        touched = {key for key in self.pending}
        unknown: dict[str, list[str]] = defaultdict(list)
        for tenant_id, incident_id in touched:
            if (tenant_id, incident_id) not in self.group_of:
                unknown[tenant_id].append(incident_id)
        for tenant_id, ids in unknown.items():
            cur.execute(
                "SELECT incident_id::text, group_id::text FROM grouping_reports "
                "WHERE tenant_id = %s AND incident_id = ANY(%s::uuid[])",
                (tenant_id, ids),
            )
            for incident_id, group_id in cur:
                self.group_of[(tenant_id, incident_id)] = group_id

        # Groups before the batch, joined by the links the batch added.
        label_edges = []
        labels: set[TextKey] = set()
        for key, changes in self.pending.items():
            label = (key[0], self.group_of[key])
            labels.add(label)
            for other_id, kind in changes.items():
                if kind in JOINING:
                    label_edges.append((label, (key[0], self.group_of[(key[0], other_id)])))
        joined = components(labels, label_edges)
        divided = {joined[(key[0], self.group_of[key])] for key in self.divided}

        renamed: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
        parts: dict[TextKey, list[str]] = defaultdict(list)
        for (tenant_id, old), (_, new) in joined.items():
            if (tenant_id, new) in divided:
                parts[(tenant_id, new)].append(old)
            elif old != new:
                renamed[tenant_id][0].append(old)
                renamed[tenant_id][1].append(new)
        for tenant_id, (old_names, new_names) in renamed.items():
            cur.execute(
                "UPDATE grouping_reports AS r SET group_id = m.new_id "
                "FROM unnest(%s::uuid[], %s::uuid[]) AS m(old_id, new_id) "
                "WHERE r.tenant_id = %s AND r.group_id = m.old_id",
                (old_names, new_names, tenant_id),
            )
        for (tenant_id, _), old_names in parts.items():
            self._regroup(cur, tenant_id, old_names)

    def _regroup(self, cur: psycopg.Cursor[Any], tenant_id: str, old_names: list[str]) -> None:
        """Find the groups among the members of the given groups from their stored links."""
        cur.execute(
            "SELECT incident_id::text, group_id::text FROM grouping_reports "
            "WHERE tenant_id = %s AND group_id = ANY(%s::uuid[])",
            (tenant_id, old_names),
        )
        old_group = dict(cur.fetchall())
        cur.execute(
            "SELECT incident_id::text, other_id::text FROM grouping_links WHERE tenant_id = %s "
            "AND incident_id = ANY(%s::uuid[]) AND kind <> 'split'",
            (tenant_id, list(old_group)),
        )
        new_group = components(old_group, cur.fetchall())
        moved = [(i, g) for i, g in new_group.items() if old_group[i] != g]
        if moved:
            cur.execute(
                "UPDATE grouping_reports AS r SET group_id = m.group_id "
                "FROM unnest(%s::uuid[], %s::uuid[]) AS m(incident_id, group_id) "
                "WHERE r.tenant_id = %s AND r.incident_id = m.incident_id",
                ([i for i, _ in moved], [g for _, g in moved], tenant_id),
            )


T = TypeVar("T")


def components(nodes: Iterable[T], edges: Iterable[tuple[T, T]]) -> dict[T, T]:
    """Return each node's component, named by its smallest node (union-find)."""
    parent = {node: node for node in nodes}

    def root(node: T) -> T:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for first, second in edges:
        if first not in parent or second not in parent:
            continue
        a, b = root(first), root(second)
        if a != b:
            # The smaller id becomes the root, so every root is its component's minimum.
            if b < a:  # type: ignore[operator]
                a, b = b, a
            parent[b] = a
    return {node: root(node) for node in parent}


class GroupingProjection(Projection):
    """The duplicate grouping read model."""

    name = "grouping"
    tables = ("grouping_settings", "grouping_reports", "grouping_links")

    def apply(self, conn: psycopg.Connection[Any], events: list[RecordedEvent]) -> None:
        relevant = [event for event in events if event.event_type in GROUPING_EVENT_TYPES]
        if not relevant:
            return
        batch = _Batch(conn)
        batch.load(relevant)
        for event in relevant:
            batch.apply(event)
        batch.write()

    def fold(self, events: Iterable[RecordedEvent], initial: Any = None) -> Any:
        """Fold events from nothing, in memory and without any index: the reference.

        Returns GroupingTables. The model is not replayable yet, so there is no `initial`
        state to start from.
        """
        # TODO: implement the replay contract of projections.base (retarget, write_states,
        # read_states, records) so that grouping can be rebuilt, replayed and snapshotted.
        if initial is not None:
            raise ValueError("the grouping model folds only from nothing")
        return fold_grouping(events)

    def read_all(self, conn: psycopg.Connection[Any]) -> GroupingTables:
        tables = GroupingTables()
        with conn.cursor() as cur:
            cur.execute("SELECT tenant_id, settings, version FROM grouping_settings")
            for tenant_id, settings, version in cur:
                tables.settings[tenant_id] = (settings, version)
            cur.execute(
                "SELECT tenant_id, incident_id, submitted_at, category, category_source, text, "
                "latitude, longitude, cell, group_id FROM grouping_reports"
            )
            for tenant_id, incident_id, *values in cur:
                tables.reports[(tenant_id, incident_id)] = tuple(values)
            cur.execute("SELECT tenant_id, incident_id, other_id, kind FROM grouping_links")
            tables.links.update(cur.fetchall())
        return tables


def fold_grouping(events: Iterable[RecordedEvent]) -> GroupingTables:
    """Fold events into the grouping tables by comparing every pair of reports.

    Quadratic, for tests and small data: it shares the rule with the projection but not the
    spatial index, the loading or the relabelling.
    """
    settings: dict[str, GroupingSettings] = {}
    versions: dict[str, int] = {}
    reports: dict[Key, GroupedReport] = {}
    links: dict[Key, dict[UUID, str]] = defaultdict(dict)

    def link(key: Key, other: Key, kind: str | None) -> None:
        if kind is None:
            links[key].pop(other[1], None)
            links[other].pop(key[1], None)
        else:
            links[key][other[1]] = kind
            links[other][key[1]] = kind

    def evaluate(key: Key) -> None:
        current = settings.get(key[0], DEFAULT_SETTINGS)
        for other, report in reports.items():
            if other[0] != key[0] or other == key or other[1] in links[key]:
                continue
            if candidates(current, reports[key], report):
                link(key, other, MATCH)

    for event in events:
        kind = event.event_type
        if kind not in GROUPING_EVENT_TYPES:
            continue
        if kind == GROUPING_CONFIGURED:
            settings[event.tenant_id] = settings_from_payload(event.payload)
            versions[event.tenant_id] = event.stream_version
            continue
        key = _incident_key(event)
        if kind == lc.REPORT_SUBMITTED:
            if key not in reports:
                reports[key] = new_report(event, key[1])
                evaluate(key)
            continue
        if key not in reports:
            continue
        report = reports[key]
        if kind in (lc.REPORT_CLASSIFIED, lc.CLASSIFICATION_CORRECTED):
            category, report.category_source = category_after(report, event)
            if category != report.category:
                report.category = category
                for other_id, existing in list(links[key].items()):
                    if existing == MATCH:
                        link(key, (key[0], other_id), None)
                evaluate(key)
        elif kind == lc.REPORTS_MERGED:
            other = (key[0], UUID(event.payload["with_incident"]))
            if other in reports:
                link(key, other, MERGE)
        elif kind == lc.REPORT_SPLIT_FROM_GROUP:
            seen = {key}
            frontier = [key]
            while frontier:
                current = frontier.pop()
                for other_id, existing in links[current].items():
                    other = (key[0], other_id)
                    if existing in JOINING and other not in seen:
                        seen.add(other)
                        frontier.append(other)
            for member in seen - {key}:
                link(key, member, SPLIT)

    tables = GroupingTables()
    for tenant_id, in_force in settings.items():
        tables.settings[tenant_id] = (in_force.to_payload(), versions[tenant_id])
    edges = [
        ((key[0], key[1]), (key[0], other_id))
        for key, others in links.items()
        for other_id, kind in others.items()
        if kind in JOINING
    ]
    by_tenant: dict[str, list[UUID]] = defaultdict(list)
    for tenant_id, incident_id in reports:
        by_tenant[tenant_id].append(incident_id)
    for tenant_id, ids in by_tenant.items():
        groups = components(ids, [(a[1], b[1]) for a, b in edges if a[0] == tenant_id])
        for incident_id in ids:
            key = (tenant_id, incident_id)
            tables.reports[key] = report_row(reports[key], groups[incident_id])
    for (tenant_id, incident_id), others in links.items():
        for other_id, kind in others.items():
            tables.links.add((tenant_id, incident_id, other_id, kind))
    return tables


def grouping_projection() -> GroupingProjection:
    return GroupingProjection()
