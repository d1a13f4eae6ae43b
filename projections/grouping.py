"""The duplicate grouping read model: groups of likely duplicate reports, per tenant.

Groups are the connected components of a graph whose nodes are reports and whose edges are
`match` links (the symmetric rule of ledger.grouping) and `merge` links (staff merges). A
`split` link, left by a staff split, keeps the rule from linking that pair again. Each group
is named by the smallest incident id among its members, so neither arrival order nor the
members' statuses change a group or its name.

Only links that join groups are stored: a report is linked with the earliest report it
matches in each group it joins (earliest by submission time, then incident id), not with
every report it matches. So a dense cluster stores about one link per report rather than
one per pair. When a link that joined reports goes away (a category change, a staff
split), the pairs of the former group are evaluated again, and matching pairs that lie in
different parts are linked. So the group divides only where no matching pair connects its
parts.

Every event takes effect in log order with the settings in force at its position: a link
found under old settings stays when the settings change. A report's links are evaluated
again when its category changes.
"""

from __future__ import annotations

import bisect
import copy
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar
from uuid import UUID

import psycopg
from psycopg import sql
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
from projections.base import INCIDENT_STREAM_PREFIX, Folded, Projection

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
T = TypeVar("T")


class _Groups(Generic[T]):
    """Groups of nodes as a union-find that also lists each group's members.

    A union moves the smaller group's members under the larger group's root, so `find` is
    one lookup and a report is moved at most log2(n) times. Keeping the member lists lets
    a group be dissolved and found again from its links after a link is removed.
    """

    def __init__(self) -> None:
        self.root_of: dict[T, T] = {}
        self.members: dict[T, list[T]] = {}

    def __contains__(self, node: T) -> bool:
        return node in self.root_of

    def add(self, node: T) -> None:
        if node not in self.root_of:
            self.root_of[node] = node
            self.members[node] = [node]

    def find(self, node: T) -> T:
        return self.root_of[node]

    def union(self, first: T, second: T) -> None:
        a, b = self.root_of[first], self.root_of[second]
        if a == b:
            return
        if len(self.members[a]) < len(self.members[b]):
            a, b = b, a
        moved = self.members.pop(b)
        for node in moved:
            self.root_of[node] = a
        self.members[a].extend(moved)

    def group_of(self, node: T) -> list[T]:
        return self.members[self.root_of[node]]

    def dissolve(self, node: T) -> list[T]:
        """Make every member of the node's group a group of its own; return the members."""
        nodes = self.members.pop(self.root_of[node])
        for member in nodes:
            self.root_of[member] = member
            self.members[member] = [member]
        return nodes

    def discard(self, node: T) -> None:
        """Forget a node that is a group of its own."""
        assert self.members[node] == [node], "only a group of one node can be discarded"
        del self.root_of[node]
        del self.members[node]


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

    def __init__(self, conn: psycopg.Connection[Any], names: _TableNames) -> None:
        self.conn = conn
        self.names = names
        self.settings: dict[str, GroupingSettings] = {}
        self.settings_changed: dict[str, int] = {}
        self.reports: dict[TextKey, GroupedReport] = {}
        # The stored group id of each report loaded from the table.
        self.group_of: dict[TextKey, str] = {}
        # The groups at this point of the batch. Nodes are the loaded and new reports, and
        # one label node per stored group (see _label) that stands for the members not
        # loaded. A loaded report starts in its stored group's label's group.
        self.groups: _Groups[TextKey] = _Groups()
        # Stored groups whose members were all loaded and grouped again from their links
        # (after a removed link): their label nodes are gone, and their members are
        # written one by one.
        self.dissolved: set[TextKey] = set()
        self.new: set[TextKey] = set()
        self.changed: set[TextKey] = set()
        # (tenant, cell, category) -> (submission time, incident id, report key) of each
        # report: the in-memory spatial index, in entries that sort in submission order.
        self.index: dict[tuple[str, int, str | None], list[tuple[datetime, str, TextKey]]] = (
            defaultdict(list)
        )
        # Whether each report's location is usable under the settings in force, and the
        # categories related to each category; both emptied when a tenant's settings
        # change. (Reading the settings' own cache costs more than the rule's tests.)
        self.usable: dict[TextKey, bool] = {}
        self.related_to: dict[tuple[str, str | None], list[str | None]] = {}
        # Links stored before the batch, loaded per report on first use.
        self.stored_links: dict[TextKey, dict[str, str]] = {}
        # Link changes of this batch, per endpoint (None removes a link).
        self.pending: dict[TextKey, dict[str, str | None]] = defaultdict(dict)

    # Loading.

    def load(self, events: list[RecordedEvent]) -> None:
        tenants = {event.tenant_id for event in events}
        with self.conn.cursor() as cur:
            cur.execute(
                f"SELECT tenant_id, settings FROM {self.names.settings} WHERE tenant_id = ANY(%s)",
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
            related_to: dict[str | None, set[str | None]] = {}
            cells_by_category: dict[str | None, set[int]] = defaultdict(set)
            times = []
            for key, (lat, lon, at) in points.items():
                if key[0] != tenant_id or not isinstance(lat, int | float):
                    continue
                if not isinstance(lon, int | float):
                    continue
                times.append(at)
                cells = cells_near(lat, lon, distance)
                for category in categories[key]:
                    related = related_to.get(category)
                    if related is None:
                        related = related_to[category] = {
                            other
                            for settings in in_force
                            for other in settings.categories_related_to(category)
                        }
                    for other in related:
                        cells_by_category[other].update(cells)
            if not cells_by_category:
                continue
            # One range scan of the tenant's located reports inside the time window. The
            # (cell, category) pairs are checked in Python, because a join on them in the
            # query took more server time than the rows it saved. A missing category and
            # an empty one share the key '' here, and the rule distinguishes them later. The
            # cells go as a text literal, because psycopg adapts list elements one by one.
            # NOTE: a stored report is read again by every batch whose time window covers
            # it. Keeping the reports across batches would need proof that the previous
            # batch committed and that nothing else wrote the tables since.
            cells_for: dict[str, set[int]] = defaultdict(set)
            for category, near in cells_by_category.items():
                cells_for[category or ""].update(near)
            every_cell = set().union(*cells_for.values())
            self._load_reports(
                tenant_id,
                condition="g.submitted_at BETWEEN %s AND %s AND g.cell = ANY(%s::bigint[])",
                params=(
                    tenant_id,
                    min(times) - window,
                    max(times) + window,
                    _array_literal(sorted(every_cell)),
                ),
                cells_for=cells_for,
            )

    def settings_for(self, tenant_id: str) -> GroupingSettings:
        return self.settings.get(tenant_id, DEFAULT_SETTINGS)

    def _load_reports(
        self,
        tenant_id: str,
        condition: str,
        params: tuple[Any, ...],
        cells_for: dict[str, set[int]] | None = None,
    ) -> None:
        """Add the stored reports of the reports table `g` that match `condition` to the batch.

        `params` fill the tenant id, then the placeholders of `condition`. With `cells_for`,
        only reports in one of the cells listed for their category ('' for none) are added.
        """
        query = (
            "SELECT g.incident_id::text, g.submitted_at, g.category, g.category_source, g.text, "
            f"g.latitude, g.longitude, g.group_id::text, g.cell FROM {self.names.reports} AS g "
            f"WHERE g.tenant_id = %s AND {condition}"
        )
        no_cells: set[int] = set()
        with self.conn.cursor() as cur:
            # Planned for each batch's values: a prepared statement's generic plan, chosen
            # without the cell and time bounds, took twice as long in the catch-up bench.
            cur.execute(query, params, prepare=False)
            for incident_id, *values, group_id, cell in cur:
                if cells_for is not None and cell not in cells_for.get(values[1] or "", no_cells):
                    continue
                key = (tenant_id, incident_id)
                if key not in self.reports:
                    self._add(key, GroupedReport(incident_id, *values))
                    self.group_of[key] = group_id
                    label = _label(tenant_id, group_id)
                    assert label not in self.dissolved, "a dissolved group had a member left"
                    self.groups.add(label)
                    self.groups.add(key)
                    self.groups.union(label, key)

    def _load_links(self, tenant_id: str, ids: Iterable[str]) -> None:
        missing = [i for i in ids if (tenant_id, i) not in self.stored_links]
        for incident_id in missing:
            self.stored_links[(tenant_id, incident_id)] = {}
        with self.conn.cursor() as cur:
            cur.execute(
                f"SELECT incident_id::text, other_id::text, kind FROM {self.names.links} "
                "WHERE tenant_id = %s AND incident_id = ANY(%s::uuid[])",
                (tenant_id, missing),
            )
            for incident_id, other_id, kind in cur:
                self.stored_links[(tenant_id, incident_id)][other_id] = kind

    def _add(self, key: TextKey, report: GroupedReport) -> None:
        self.reports[key] = report
        if report.latitude is not None and report.longitude is not None:
            cell = cell_of(report.latitude, report.longitude)
            self.index[(key[0], cell, report.category)].append((report.submitted_at, key[1], key))

    def _remove_from_index(self, key: TextKey, report: GroupedReport) -> None:
        if report.latitude is not None and report.longitude is not None:
            cell = cell_of(report.latitude, report.longitude)
            self.index[(key[0], cell, report.category)].remove((report.submitted_at, key[1], key))

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
        self.pending[key][other[1]] = kind
        self.pending[other][key[1]] = kind
        if kind in JOINING:
            self.groups.union(key, other)

    # Groups.

    def load_group(self, key: TextKey) -> list[TextKey]:
        """Load every member of the report's group and their links; return the members."""
        tenant_id = key[0]
        labels = [node[1] for node in self.groups.group_of(key) if _is_label(node)]
        if labels:
            self._load_reports(
                tenant_id,
                condition="g.group_id = ANY(%s::uuid[])",
                params=(tenant_id, [label.removeprefix(_LABEL_PREFIX) for label in labels]),
            )
        members = [node for node in self.groups.group_of(key) if not _is_label(node)]
        self._load_links(
            tenant_id,
            [member[1] for member in members if member not in self.new],
        )
        return members

    def regroup(self, members: list[TextKey]) -> None:
        """Find the groups among `members`, a former group that lost a link, again.

        `members` comes from `load_group` before the link was removed. Matching pairs that
        now lie in different parts are linked, in submission order, as `fold_grouping`
        does.
        """
        for node in self.groups.dissolve(members[0]):
            if _is_label(node):
                self.groups.discard(node)
                self.dissolved.add(node)
        for member in members:
            for other_id, kind in self.links_of(member).items():
                if kind in JOINING:
                    self.groups.union(member, (member[0], other_id))
        if len(self.groups.group_of(members[0])) == len(members):
            return
        within = set(members)
        for member in sorted(members, key=self._submission_order):
            self.evaluate(member, within)

    def _submission_order(self, key: TextKey) -> tuple[datetime, str]:
        return self.reports[key].submitted_at, key[1]

    # Events.

    def apply(self, event: RecordedEvent) -> None:
        kind = event.event_type
        if kind == GROUPING_CONFIGURED:
            self.settings[event.tenant_id] = settings_from_payload(event.payload)
            self.settings_changed[event.tenant_id] = event.stream_version
            self.usable = {
                key: value for key, value in self.usable.items() if key[0] != event.tenant_id
            }
            self.related_to = {
                key: value for key, value in self.related_to.items() if key[0] != event.tenant_id
            }
            return
        key = _text_key(event)
        if kind == lc.REPORT_SUBMITTED:
            if key in self.reports:
                return
            self.new.add(key)
            self._add(key, new_report(event, key[1]))
            self.groups.add(key)
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
                matched = [other for other, link in self.links_of(key).items() if link == MATCH]
                if matched:
                    former = self.load_group(key)
                    for other_id in matched:
                        self.set_link(key, (key[0], other_id), None)
                    self.regroup(former)
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
            if len(self.groups.group_of(key)) == 1:
                return
            former = self.load_group(key)
            for member in former:
                if member != key:
                    self.set_link(key, member, SPLIT)
            self.regroup(former)

    def evaluate(self, key: TextKey, within: set[TextKey] | None = None) -> None:
        """Link the report with the earliest report it matches in each other group.

        Reports already linked with it, merged or split by staff are skipped. With
        `within`, only reports of that set are compared.
        """
        # NOTE: the comparisons still grow with the square of a cluster's size, because
        # each report is checked against every report near it to find the groups it
        # joins. Only the checks of reports in a group already joined are cheap (no
        # distance or text score); the links stay about one per report.
        tenant_id = key[0]
        settings = self.settings_for(tenant_id)
        report = self.reports[key]
        if not self._usable(key, settings):
            return
        assert report.latitude is not None and report.longitude is not None
        window = timedelta(hours=settings.window_hours)
        earliest, latest = report.submitted_at - window, report.submitted_at + window
        cells = cells_near(report.latitude, report.longitude, settings.distance_m)
        index = self.index
        related = self.related_to.get((tenant_id, report.category))
        if related is None:
            related = settings.categories_related_to(report.category)
            self.related_to[(tenant_id, report.category)] = related
        found: list[tuple[datetime, str, TextKey]] = []
        for category in related:
            for cell in cells:
                entries = index.get((tenant_id, cell, category))
                if entries:
                    found.extend(entry for entry in entries if earliest <= entry[0] <= latest)
        if not found:
            return
        found.sort()
        root_of = self.groups.root_of
        reports = self.reports
        usable = self.usable
        for _, _, other in found:
            if other == key:
                continue
            if within is not None and other not in within:
                continue
            if root_of[other] == root_of[key] or self.link_kind(key, other) is not None:
                continue  # in its group already, or merged or split by staff
            other_usable = usable.get(other)
            if other_usable is None:
                other_usable = self._usable(other, settings)
            if other_usable and candidates(
                settings, report, reports[other], checked_locations=True
            ):
                self.set_link(key, other, MATCH)

    # Writing.

    def write(self) -> None:
        cur = self.conn.cursor()
        names = self._group_names()
        for tenant_id, version in self.settings_changed.items():
            cur.execute(
                f"INSERT INTO {self.names.settings} (tenant_id, settings, version) "
                "VALUES (%s, %s, %s) "
                "ON CONFLICT (tenant_id) DO UPDATE SET settings = EXCLUDED.settings, "
                "version = EXCLUDED.version",
                (tenant_id, Jsonb(self.settings[tenant_id].to_payload()), version),
            )
        updates = [
            (self.reports[key].category, self.reports[key].category_source, *key)
            for key in self.changed - self.new
        ]
        if updates:
            cur.executemany(
                f"UPDATE {self.names.reports} SET category = %s, category_source = %s "
                "WHERE tenant_id = %s AND incident_id = %s",
                updates,
            )
        upserts, removals = self._link_changes()
        if removals:
            cur.executemany(
                f"DELETE FROM {self.names.links} "
                "WHERE tenant_id = %s AND incident_id = %s AND other_id = %s",
                removals,
            )
        if self.new or upserts:
            self._write_rows(cur, names, upserts)
        self._write_groups(cur, names)

    def _link_changes(
        self,
    ) -> tuple[list[tuple[str, str, str, str]], list[tuple[str, str, str]]]:
        """Return the links to insert or update and the links to delete."""
        upserts = []
        removals = []
        for (tenant_id, incident_id), changes in self.pending.items():
            for other_id, kind in changes.items():
                if kind is None:
                    removals.append((tenant_id, incident_id, other_id))
                else:
                    upserts.append((tenant_id, incident_id, other_id, kind))
        return upserts, removals

    def _write_rows(
        self,
        cur: psycopg.Cursor[Any],
        names: dict[TextKey, str],
        upserts: list[tuple[str, str, str, str]],
    ) -> None:
        """Insert the new reports and upsert the changed links in one statement.

        COPY cannot write to a table with row-level security, so the rows go to temporary
        tables first. One statement empties both into the tables, because `failing_event`
        applies events one by one in a single transaction. Two TRUNCATE statements would
        cost two more round trips and give the tables new files each time.
        """
        cur.execute(
            "CREATE TEMP TABLE IF NOT EXISTS grouping_reports_batch "
            "(LIKE grouping_reports) ON COMMIT DELETE ROWS; "
            "CREATE TEMP TABLE IF NOT EXISTS grouping_links_batch "
            "(LIKE grouping_links) ON COMMIT DELETE ROWS"
        )
        if self.new:
            with cur.copy("COPY grouping_reports_batch FROM STDIN") as copy:
                for key in self.new:
                    name = names[self.groups.find(key)]
                    copy.write_row((*key, *report_row(self.reports[key], name)))
        if upserts:
            with cur.copy(
                "COPY grouping_links_batch (tenant_id, incident_id, other_id, kind) FROM STDIN"
            ) as copy:
                for row in upserts:
                    copy.write_row(row)
        # PostgreSQL runs every data-modifying WITH clause, read or not.
        cur.execute(
            "WITH reports AS (DELETE FROM grouping_reports_batch RETURNING *), "
            f"inserted AS (INSERT INTO {self.names.reports} SELECT * FROM reports), "
            "links AS (DELETE FROM grouping_links_batch RETURNING *) "
            f"INSERT INTO {self.names.links} SELECT * FROM links "
            "ON CONFLICT (tenant_id, incident_id, other_id) DO UPDATE SET kind = EXCLUDED.kind"
        )

    def _group_names(self) -> dict[TextKey, str]:
        """Return each group's name, the smallest incident id among its members, by root.

        A label node stands for the members not loaded, and its stored group id is the
        smallest of those.
        """
        names = {}
        for root, nodes in self.groups.members.items():
            names[root] = min(node[1].removeprefix(_LABEL_PREFIX) for node in nodes)
        return names

    def _write_groups(self, cur: psycopg.Cursor[Any], names: dict[TextKey, str]) -> None:
        """Write the group ids that changed: by stored group, then report by report.

        A stored group whose label node is still in the batch moved whole, so one UPDATE
        renames all its members, loaded or not. The members of dissolved groups were all
        loaded and are written one by one. New reports were written with their names.
        """
        renamed: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
        for root, nodes in self.groups.members.items():
            for node in nodes:
                if not _is_label(node):
                    continue
                old = node[1].removeprefix(_LABEL_PREFIX)
                if old != names[root]:
                    renamed[node[0]][0].append(old)
                    renamed[node[0]][1].append(names[root])
        for tenant_id, (old_names, new_names) in renamed.items():
            cur.execute(
                f"UPDATE {self.names.reports} AS r SET group_id = m.new_id "
                "FROM unnest(%s::uuid[], %s::uuid[]) AS m(old_id, new_id) "
                "WHERE r.tenant_id = %s AND r.group_id = m.old_id",
                (old_names, new_names, tenant_id),
            )

        moved: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
        for key, old in self.group_of.items():
            if _label(key[0], old) not in self.dissolved:
                continue
            new = names[self.groups.find(key)]
            if new != old:
                moved[key[0]][0].append(key[1])
                moved[key[0]][1].append(new)
        for tenant_id, (incident_ids, group_ids) in moved.items():
            cur.execute(
                f"UPDATE {self.names.reports} AS r SET group_id = m.group_id "
                "FROM unnest(%s::uuid[], %s::uuid[]) AS m(incident_id, group_id) "
                "WHERE r.tenant_id = %s AND r.incident_id = m.incident_id",
                (incident_ids, group_ids, tenant_id),
            )


def _array_literal(numbers: list[int]) -> str:
    """Return integers as a PostgreSQL array literal, such as {1,2,3}."""
    return "{" + ",".join(map(str, numbers)) + "}"


# Label nodes of _Batch.groups are the tenant and a stored group id behind this prefix, which
# no incident id (hexadecimal text) starts with.
_LABEL_PREFIX = "group:"


def _label(tenant_id: str, group_id: str) -> TextKey:
    return tenant_id, _LABEL_PREFIX + group_id


def _is_label(node: TextKey) -> bool:
    return node[1].startswith(_LABEL_PREFIX)


SETTINGS_TABLE = "grouping_settings"
REPORTS_TABLE = "grouping_reports"
LINKS_TABLE = "grouping_links"
# Row keys of the folded states, after the tenant id: ("settings",), ("report", incident
# id) and ("link", incident id, other id).
SETTINGS_ROW = "settings"
REPORT_ROW = "report"
LINK_ROW = "link"
_REPORT_FIELDS = (
    "submitted_at",
    "category",
    "category_source",
    "text",
    "latitude",
    "longitude",
    "cell",
    "group_id",
)


@dataclass(frozen=True, slots=True)
class _TableNames:
    """The quoted, schema-qualified names of the tables a batch reads and writes."""

    settings: str
    reports: str
    links: str


class GroupingProjection(Projection):
    """The duplicate grouping read model.

    Its rows span streams, because a group joins reports of many incidents. So a rebuild
    folds each tenant in one partition, and time travel uses a snapshot only when all its
    events happened by `as_of`. The folded states contain the three tables' rows, keyed as
    described at SETTINGS_ROW.
    """

    name = "grouping"
    tables = (SETTINGS_TABLE, REPORTS_TABLE, LINKS_TABLE)
    stream_keyed = False
    replayable = True
    payload_types: frozenset[str] | None = GROUPING_EVENT_TYPES
    # Fields of the records `to_records` writes, for CSV output.
    columns = ("row", "incident_id", "other_id", "kind", *_REPORT_FIELDS, "settings", "version")

    def __init__(self) -> None:
        self.schema: str | None = None
        self.table_names = {table: table for table in self.tables}

    def retarget(self, schema: str, tables: dict[str, str]) -> GroupingProjection:
        clone = copy.copy(self)
        clone.schema = schema
        clone.table_names = {live: tables[live] for live in self.tables}
        return clone

    def _names(self, conn: psycopg.Connection[Any]) -> _TableNames:
        def quoted(table: str) -> str:
            name = self.table_names[table]
            identifier = (
                sql.Identifier(name) if self.schema is None else sql.Identifier(self.schema, name)
            )
            return identifier.as_string(conn)

        return _TableNames(quoted(SETTINGS_TABLE), quoted(REPORTS_TABLE), quoted(LINKS_TABLE))

    def apply(self, conn: psycopg.Connection[Any], events: list[RecordedEvent]) -> None:
        relevant = [event for event in events if event.event_type in GROUPING_EVENT_TYPES]
        if not relevant:
            return
        batch = _Batch(conn, self._names(conn))
        batch.load(relevant)
        for event in relevant:
            batch.apply(event)
        batch.write()

    def fold(self, events: Iterable[RecordedEvent], initial: Folded | None = None) -> Folded:
        """Fold events onto `initial` in memory, with a spatial index of the reports.

        Tests compare it with the streaming `apply` and with the fold that compares every
        pair of reports.
        """
        start = tables_from_states(initial) if initial else None
        return states_from_tables(fold_grouping(events, start, indexed=True))

    def read_tables(
        self, conn: psycopg.Connection[Any], tenant_id: str | None = None
    ) -> GroupingTables:
        """Read the rows of every tenant, or of `tenant_id`, as GroupingTables."""
        names = self._names(conn)
        where = " WHERE tenant_id = %s" if tenant_id is not None else ""
        params = (tenant_id,) if tenant_id is not None else ()
        tables = GroupingTables()
        with conn.cursor() as cur:
            cur.execute(f"SELECT tenant_id, settings, version FROM {names.settings}{where}", params)
            for tenant, settings, version in cur:
                tables.settings[tenant] = (settings, version)
            cur.execute(
                "SELECT tenant_id, incident_id, submitted_at, category, category_source, text, "
                f"latitude, longitude, cell, group_id FROM {names.reports}{where}",
                params,
            )
            for tenant, incident_id, *values in cur:
                tables.reports[(tenant, incident_id)] = tuple(values)
            cur.execute(
                f"SELECT tenant_id, incident_id, other_id, kind FROM {names.links}{where}", params
            )
            tables.links.update(cur.fetchall())
        return tables

    def read_all(self, conn: psycopg.Connection[Any]) -> Folded:
        """Read every tenant's rows back as states, for comparisons with a fresh fold."""
        return states_from_tables(self.read_tables(conn))

    def read_states(self, conn: psycopg.Connection[Any], tenant_id: str) -> Folded:
        return states_from_tables(self.read_tables(conn, tenant_id))

    def write_states(self, conn: psycopg.Connection[Any], states: Folded) -> None:
        names = self._names(conn)
        tables = tables_from_states(states)
        with conn.cursor() as cur:
            with cur.copy(
                f"COPY {names.settings} (tenant_id, settings, version) FROM STDIN"
            ) as copy_:
                for tenant, (settings, version) in tables.settings.items():
                    copy_.write_row((tenant, Jsonb(settings), version))
            with cur.copy(
                f"COPY {names.reports} (tenant_id, incident_id, {', '.join(_REPORT_FIELDS)}) "
                "FROM STDIN"
            ) as copy_:
                for key, row in tables.reports.items():
                    copy_.write_row((*key, *row))
            with cur.copy(
                f"COPY {names.links} (tenant_id, incident_id, other_id, kind) FROM STDIN"
            ) as copy_:
                for link in tables.links:
                    copy_.write_row(link)

    def to_records(self, states: Folded) -> list[dict[str, Any]]:
        """Serialize states as JSON objects sorted by tenant, row kind and ids.

        Times are written in UTC with microseconds and ids as text, so equal states give
        equal bytes.
        """
        records = []
        for key in sorted(states, key=lambda item: (item[0], *map(str, item[1]))):
            tenant, (row, *ids) = key
            value = states[key]
            record: dict[str, Any] = {"tenant_id": tenant, "row": row}
            if row == SETTINGS_ROW:
                record.update(settings=value[0], version=value[1])
            elif row == REPORT_ROW:
                record["incident_id"] = str(ids[0])
                for name, field_value in zip(_REPORT_FIELDS, value, strict=True):
                    record[name] = _encode(field_value)
            else:
                record.update(incident_id=str(ids[0]), other_id=str(ids[1]), kind=value)
            records.append(record)
        return records

    def from_records(self, tenant_id: str, records: list[dict[str, Any]]) -> Folded:
        states: Folded = {}
        for record in records:
            row = record["row"]
            if row == SETTINGS_ROW:
                states[(tenant_id, (SETTINGS_ROW,))] = (record["settings"], record["version"])
            elif row == REPORT_ROW:
                values = [record[name] for name in _REPORT_FIELDS]
                values[0] = datetime.fromisoformat(values[0])
                values[-1] = UUID(values[-1])
                states[(tenant_id, (REPORT_ROW, UUID(record["incident_id"])))] = tuple(values)
            elif row == LINK_ROW:
                key = (LINK_ROW, UUID(record["incident_id"]), UUID(record["other_id"]))
                states[(tenant_id, key)] = record["kind"]
            else:
                raise ValueError(f"unknown grouping row kind {row!r} in a snapshot record")
        return states


def states_from_tables(tables: GroupingTables) -> Folded:
    """Return the rows of `tables` as folded states, keyed as described at SETTINGS_ROW."""
    states: Folded = {}
    for tenant, settings in tables.settings.items():
        states[(tenant, (SETTINGS_ROW,))] = settings
    for (tenant, incident_id), row in tables.reports.items():
        states[(tenant, (REPORT_ROW, incident_id))] = row
    for tenant, incident_id, other_id, kind in tables.links:
        states[(tenant, (LINK_ROW, incident_id, other_id))] = kind
    return states


def tables_from_states(states: Folded) -> GroupingTables:
    """Return folded states as the rows of the three tables: `states_from_tables` reversed."""
    tables = GroupingTables()
    for (tenant, (row, *ids)), value in states.items():
        if row == SETTINGS_ROW:
            tables.settings[tenant] = value
        elif row == REPORT_ROW:
            tables.reports[(tenant, ids[0])] = value
        else:
            tables.links.add((tenant, ids[0], ids[1], value))
    return tables


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    if isinstance(value, UUID):
        return str(value)
    return value


class _SpatialIndex:
    """A tenant's located reports by grid cell and category, each list in submission order.

    A lookup returns the reports in the cells within the distance setting, in a related
    category, submitted within the time window. `candidates` still decides each pair.
    """

    def __init__(self) -> None:
        self.cells: dict[tuple[str, int, str | None], list[tuple[datetime, UUID]]] = defaultdict(
            list
        )

    def add(self, key: Key, report: GroupedReport) -> None:
        if report.latitude is not None and report.longitude is not None:
            cell = cell_of(report.latitude, report.longitude)
            bisect.insort(
                self.cells[(key[0], cell, report.category)], (report.submitted_at, key[1])
            )

    def remove(self, key: Key, report: GroupedReport) -> None:
        if report.latitude is not None and report.longitude is not None:
            cell = cell_of(report.latitude, report.longitude)
            self.cells[(key[0], cell, report.category)].remove((report.submitted_at, key[1]))

    def near(self, key: Key, report: GroupedReport, settings: GroupingSettings) -> list[Key]:
        if report.latitude is None or report.longitude is None:
            return []
        window = timedelta(hours=settings.window_hours)
        earliest, latest = report.submitted_at - window, report.submitted_at + window
        found = []
        for category in settings.categories_related_to(report.category):
            for cell in cells_near(report.latitude, report.longitude, settings.distance_m):
                entries = self.cells.get((key[0], cell, category))
                if not entries:
                    continue
                # (earliest,) sorts before every entry submitted at `earliest` or later.
                start = bisect.bisect_left(entries, (earliest,))
                for position in range(start, len(entries)):
                    submitted_at, incident_id = entries[position]
                    if submitted_at > latest:
                        break
                    found.append((key[0], incident_id))
        return found


def fold_grouping(
    events: Iterable[RecordedEvent],
    initial: GroupingTables | None = None,
    *,
    indexed: bool = False,
    every_link: bool = False,
) -> GroupingTables:
    """Fold events onto `initial` (or nothing) by comparing reports in memory.

    By default it compares every pair of a tenant's reports. That is quadratic, and it is
    the reference that tests compare the streaming `apply` and the indexed fold with. With
    `indexed`, a report is compared only with those a spatial index finds near it in space,
    time and category, which rebuilds and time travel need for large tenants. Group ids are
    computed again from the links, so those of `initial` are not read.

    With `every_link`, it stores a link for every matching pair, as the projection did
    before links were bounded to the ones that join groups. Tests use it to check that
    bounding the links leaves the groups as they were.
    """
    settings: dict[str, GroupingSettings] = {}
    versions: dict[str, int] = {}
    reports: dict[Key, GroupedReport] = {}
    links: dict[Key, dict[UUID, str]] = defaultdict(dict)
    groups: _Groups[Key] = _Groups()
    index = _SpatialIndex() if indexed else None
    if initial is not None:
        for tenant_id, (payload, version) in initial.settings.items():
            settings[tenant_id] = settings_from_payload(payload)
            versions[tenant_id] = version
        for key, row in initial.reports.items():
            reports[key] = GroupedReport(key[1], *row[:6])
            groups.add(key)
            if index is not None:
                index.add(key, reports[key])
        for tenant_id, incident_id, other_id, kind in initial.links:
            links[(tenant_id, incident_id)][other_id] = kind
            if kind in JOINING:
                groups.union((tenant_id, incident_id), (tenant_id, other_id))

    def link(key: Key, other: Key, kind: str | None) -> None:
        if kind is None:
            links[key].pop(other[1], None)
            links[other].pop(key[1], None)
        else:
            links[key][other[1]] = kind
            links[other][key[1]] = kind
            if kind in JOINING:
                groups.union(key, other)

    def submission_order(key: Key) -> tuple[datetime, UUID]:
        return reports[key].submitted_at, key[1]

    def evaluate(key: Key, within: set[Key] | None = None) -> None:
        """Link the report with the earliest report it matches in each other group.

        With `within`, only reports of that set are compared.
        """
        current = settings.get(key[0], DEFAULT_SETTINGS)
        if index is not None:
            others = index.near(key, reports[key], current)
        elif within is not None:
            others = list(within)
        else:
            others = [other for other in reports if other[0] == key[0]]
        for other in sorted(others, key=submission_order):
            if other == key or (within is not None and other not in within):
                continue
            if not every_link and groups.find(other) == groups.find(key):
                continue
            if other[1] in links[key]:
                continue
            if candidates(current, reports[key], reports[other]):
                link(key, other, MATCH)

    def regroup(members: list[Key]) -> None:
        """Find the groups among `members`, a former group that lost a link, again.

        Matching pairs that now lie in different parts are linked, in submission order.
        """
        groups.dissolve(members[0])
        for member in members:
            for other_id, kind in links[member].items():
                if kind in JOINING:
                    groups.union(member, (member[0], other_id))
        if every_link or len(groups.group_of(members[0])) == len(members):
            return
        within = set(members)
        for member in sorted(members, key=submission_order):
            evaluate(member, within)

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
                groups.add(key)
                if index is not None:
                    index.add(key, reports[key])
                evaluate(key)
            continue
        if key not in reports:
            continue
        report = reports[key]
        if kind in (lc.REPORT_CLASSIFIED, lc.CLASSIFICATION_CORRECTED):
            category, report.category_source = category_after(report, event)
            if category != report.category:
                if index is not None:
                    index.remove(key, report)
                report.category = category
                if index is not None:
                    index.add(key, report)
                matched = [other for other, existing in links[key].items() if existing == MATCH]
                if matched:
                    former = list(groups.group_of(key))
                    for other_id in matched:
                        link(key, (key[0], other_id), None)
                    regroup(former)
                evaluate(key)
        elif kind == lc.REPORTS_MERGED:
            other = (key[0], UUID(event.payload["with_incident"]))
            if other in reports:
                link(key, other, MERGE)
        elif kind == lc.REPORT_SPLIT_FROM_GROUP:
            former = list(groups.group_of(key))
            if len(former) > 1:
                for member in former:
                    if member != key:
                        link(key, member, SPLIT)
                regroup(former)

    tables = GroupingTables()
    for tenant_id, in_force in settings.items():
        tables.settings[tenant_id] = (in_force.to_payload(), versions[tenant_id])
    for members in groups.members.values():
        group_id = min(incident_id for _, incident_id in members)
        for key in members:
            tables.reports[key] = report_row(reports[key], group_id)
    for (tenant_id, incident_id), others in links.items():
        for other_id, kind in others.items():
            tables.links.add((tenant_id, incident_id, other_id, kind))
    return tables


def grouping_projection() -> GroupingProjection:
    return GroupingProjection()
