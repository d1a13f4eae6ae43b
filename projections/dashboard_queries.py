"""Dashboard widgets as tables: columns and rows computed from the read models.

Every widget returns a `WidgetTable`, so the JSON API, the HTML tables, the charts and the
CSV exports all show the same rows. Without `known_at`, widgets read the read models as of
`as_of`. With `known_at`, the trends model is folded again from the events recorded by then
(`replay.time_travel.replay`, which starts from the nearest snapshot), and the widgets count
the folded states with the same rules.

Widgets never return texts of reports, addresses or anything about reporters: only
categories, departments, areas, times, counts, rounded coordinates and ids.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from ledger.dashboards import (
    BacklogWidget,
    OnTimeRateWidget,
    OpenMapWidget,
    RankingWidget,
    RecentSealsWidget,
    TimeToCloseWidget,
    Widget,
)
from ledger.database import set_tenant
from ledger.seals import SEAL_EVENT_TYPE, Seal, seal_from_event, seal_stream_id
from projections.sla import NOT_JUDGED, RESOLUTION_BREACHED_SQL, resolution_breached
from projections.sla_queries import SlaCounts, consistent_snapshot, summarize_states
from projections.trends import TrendState, trends_projection
from projections.trends_queries import FLAGGED_SQL, period_start, rankings
from replay.point_in_time import (
    TRENDS_MODEL,
    KnownAt,
    known_at_states,
    known_sql,
    straddling_trend_states,
)
from replay.time_travel import replay

# Public coordinates are rounded to 3 decimal places (about 110 m of latitude), so a map
# of open incidents cannot point at one home.
MAP_DECIMALS = 3
# Bucket edges of the time-to-close histogram, in hours; the last bucket has no end.
CLOSE_EDGES_HOURS = (0, 1, 4, 24, 72, 168, 720)
NO_VALUE = "(none)"


@dataclass(frozen=True, slots=True)
class WidgetTable:
    """A widget's figures: column names and rows of plain JSON values."""

    columns: list[str]
    rows: list[list[Any]]


# Folds of the incidents that straddle a past as_of, run while the widgets' SQL runs.
_FOLDS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dashboard-fold")


@dataclass(slots=True)
class DashboardContext:
    """Inputs of one request's widgets: the tenant, the times and the folded states.

    With `fold_pool`, `widget_tables` folds the incidents that straddle `as_of` in a thread,
    on another connection of that pool that shares the snapshot of `conn`. The fold is
    Python work and the widgets' SQL is the server's, so the two overlap.
    """

    conn: psycopg.Connection[Any]
    tenant_id: str
    time_zone: str
    as_of: datetime  # the valid time the figures are judged at
    known_at: datetime | None
    fold_pool: ConnectionPool[Any] | None = None
    snapshot_id: int | None = None
    _known: KnownAt | None = field(default=None, repr=False)
    _folded: list[TrendState] | None = field(default=None, repr=False)
    _pending: Future[list[TrendState]] | None = field(default=None, repr=False)

    @property
    def replaying(self) -> bool:
        """True when every incident is folded from the log and no row is counted in SQL."""
        return self.known_at is not None and self._known is None

    @property
    def known(self) -> KnownAt | None:
        """The split of `split_known`, or None."""
        return self._known

    def split_known(self) -> None:
        """With `known_at`, split the trends model into rows counted in SQL and incidents
        folded again. When the configuration history prevents the split, the whole tenant
        is folded instead.

        Call it inside the transaction of `conn`, before any widget runs.
        """
        if self.known_at is not None and self._known is None:
            self._known = known_at_states(
                self.conn, TRENDS_MODEL, self.tenant_id, self.known_at, self.as_of
            )

    def settled(self, alias: str = "") -> str:
        """Return the condition on the rows that widgets count in SQL; `alias` is the
        table's alias and a dot, if any."""
        condition = f"{alias}latest_occurred_at <= %(now)s"
        if self._known is not None:
            condition += f" AND {known_sql(alias)}"
        return condition

    def folded(self) -> list[TrendState]:
        """Return the states that the widgets count in Python, folded once per request.

        With `known_at`: the incidents `known_at_states` folds again, or, when it could not
        split the model, every incident's state, replayed as of `as_of` and as known at
        `known_at`. Without it: only the incidents with events on both sides of `as_of`,
        whose read-model rows are ahead of `as_of`. SQL counts the other rows, which
        `settled` selects.
        """
        if self._folded is None and self._pending is not None:
            self._folded = self._pending.result()
        if self._folded is None:
            if self._known is not None:
                states: Iterable[Any] = self._known.folded
            elif self.replaying:
                replayed = replay(
                    self.conn,
                    trends_projection(),
                    self.tenant_id,
                    as_of=self.as_of,
                    known_at=self.known_at,
                )
                self.snapshot_id = replayed.snapshot_id
                states = replayed.states.values()
            else:
                states = straddling_trend_states(self.conn, self.tenant_id, self.as_of)
            self._folded = [state for state in states if isinstance(state, TrendState)]
        return self._folded

    def start_fold(self) -> None:
        """Start folding the straddling incidents in a thread, when a pool is given.

        Call it inside the transaction of `conn`, which must stay open until `folded`
        returns: the thread's connection imports that transaction's snapshot.
        """
        if self.fold_pool is None or self.known_at is not None or self._folded is not None:
            return
        row = self.conn.execute("SELECT pg_export_snapshot()").fetchone()
        assert row is not None
        self._pending = _FOLDS.submit(_fold_in_snapshot, self.fold_pool, row[0], self)

    @property
    def local_day(self) -> date:
        """The tenant-local date of `as_of`, counting local midnight as the end of a day."""
        moment = self.as_of.astimezone(ZoneInfo(self.time_zone)) - timedelta(microseconds=1)
        return moment.date()

    def params(self, **extra: Any) -> dict[str, Any]:
        known = self._known.params() if self._known is not None else {}
        return {"tenant": self.tenant_id, "now": self.as_of, **known, **extra}


def _fold_in_snapshot(
    pool: ConnectionPool[Any], snapshot: str, context: DashboardContext
) -> list[TrendState]:
    with pool.connection() as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        set_tenant(conn, context.tenant_id)
        return straddling_trend_states(conn, context.tenant_id, context.as_of)


# Each widget is a generator that runs its SQL over the settled rows, yields once, then
# counts the folded states and returns its table. All widgets run their SQL before any
# waits for the fold.
WidgetSteps = Generator[None, None, WidgetTable]


def widget_tables(context: DashboardContext, widgets: Sequence[Widget]) -> list[WidgetTable]:
    """Compute the tables of `widgets` on one database snapshot."""
    handlers: dict[type[Any], Callable[[DashboardContext, Any], WidgetSteps]] = {
        OnTimeRateWidget: _on_time_rate,
        BacklogWidget: _backlog,
        TimeToCloseWidget: _time_to_close,
        RankingWidget: _ranking,
        OpenMapWidget: _open_map,
        RecentSealsWidget: _recent_seals,
    }
    with consistent_snapshot(context.conn):
        set_tenant(context.conn, context.tenant_id)
        context.split_known()
        context.start_fold()
        steps = [handlers[type(widget)](context, widget) for widget in widgets]
        for step in steps:
            next(step)
        return [_finish(step) for step in steps]


def _finish(step: WidgetSteps) -> WidgetTable:
    try:
        next(step)
    except StopIteration as done:
        table: WidgetTable = done.value
        return table
    raise RuntimeError("a dashboard widget yielded more than once")


def widget_table(context: DashboardContext, widget: Widget) -> WidgetTable:
    """Compute one widget's table."""
    return widget_tables(context, [widget])[0]


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _flagged(state: TrendState, now: datetime) -> bool:
    """Judge a folded state as the trend queries' FLAGGED_SQL judges a row."""
    return (
        state.flagged
        or state.submitted_at > now
        or (state.resolved_at is not None and state.resolved_at > now)
        or (state.first_response_at is not None and state.first_response_at > now)
    )


# On-time rate.


def _on_time_rate(context: DashboardContext, widget: OnTimeRateWidget) -> WidgetSteps:
    groups: dict[str | None, SlaCounts] = defaultdict(SlaCounts)
    if not context.replaying:
        # The counts of sla_summary, over the trends model's copy of the SLA columns, so
        # that the incidents straddling as_of are folded once for every widget.
        column = "category" if widget.by == "category" else "department"
        rows = context.conn.execute(
            f"""
            SELECT {column}, count(*),
                   count(*) FILTER (WHERE resolution_due_at IS NOT NULL),
                   count(*) FILTER (WHERE resolved_at IS NULL),
                   count(*) FILTER (WHERE {RESOLUTION_BREACHED_SQL})
            FROM incident_trends
            WHERE tenant_id = %(tenant)s AND {context.settled()}
              AND status <> ALL(%(not_judged)s)
            GROUP BY {column}
            """,
            context.params(not_judged=list(NOT_JUDGED)),
        )
        for key, total, with_target, still_open, breached in rows:
            groups[key] += SlaCounts(total, with_target, still_open, breached)
    yield
    for key, counts in summarize_states(context.folded(), context.as_of)[widget.by].items():
        groups[key] += counts
    ordered = sorted(groups.items(), key=lambda item: (-item[1].total, item[0] or ""))
    rows_out = [_rate_row(key, counts) for key, counts in ordered[: widget.limit]]
    return WidgetTable([widget.by, "incidents", "breached", "on_time_rate"], rows_out)


def _rate_row(key: str | None, counts: SlaCounts) -> list[Any]:
    return [key or NO_VALUE, counts.total, counts.breached, _rate(counts.on_time, counts.total)]


# Backlog over time.

Marks = dict[date | None, list[int]]  # period start (None: before the first) -> counts


def _backlog(context: DashboardContext, widget: BacklogWidget) -> WidgetSteps:
    last = period_start(context.local_day, widget.period)
    starts = [last]
    while len(starts) < widget.periods:
        starts.insert(0, period_start(starts[0] - timedelta(days=1), widget.period))
    zone = ZoneInfo(context.time_zone)
    begin = datetime(starts[0].year, starts[0].month, starts[0].day, tzinfo=zone)
    marks: Marks = defaultdict(lambda: [0, 0, 0])
    if not context.replaying:
        _add_backlog_marks_sql(context, widget.period, begin, marks)
    yield
    _add_backlog_marks(context, widget.period, begin, marks)
    before = marks[None][0] - marks[None][2]
    rows = []
    backlog = before
    for start in starts:
        opened, closed, left = marks.get(start, [0, 0, 0])
        backlog += opened - left
        rows.append([start.isoformat(), opened, closed, backlog])
    return WidgetTable(["period", "opened", "closed", "backlog"], rows)


def _add_backlog_marks_sql(
    context: DashboardContext, period: str, begin: datetime, marks: Marks
) -> None:
    """Count openings, resolutions and backlog exits per period in the settled rows.

    An incident leaves the backlog at greatest(opened, resolved), as in trend counts.
    """
    # One aggregate counts the marks before `begin`; only the later ones are bucketed,
    # which saves a time zone conversion per mark on the long history.
    query = f"""
        WITH facts AS (
            SELECT submitted_at, resolved_at,
                   CASE WHEN resolved_at IS NOT NULL THEN greatest(submitted_at, resolved_at) END
                   AS left_at
            FROM incident_trends
            WHERE tenant_id = %(tenant)s AND submitted_at <= %(now)s AND {context.settled()}
        )
        SELECT NULL::date, count(*) FILTER (WHERE submitted_at < %(begin)s),
               count(*) FILTER (WHERE resolved_at < %(begin)s),
               count(*) FILTER (WHERE left_at < %(begin)s)
        FROM facts
        UNION ALL
        SELECT date_trunc(%(unit)s, submitted_at AT TIME ZONE %(zone)s)::date, count(*), 0, 0
        FROM facts WHERE submitted_at >= %(begin)s GROUP BY 1
        UNION ALL
        SELECT date_trunc(%(unit)s, resolved_at AT TIME ZONE %(zone)s)::date, 0, count(*), 0
        FROM facts WHERE resolved_at >= %(begin)s GROUP BY 1
        UNION ALL
        SELECT date_trunc(%(unit)s, left_at AT TIME ZONE %(zone)s)::date, 0, 0, count(*)
        FROM facts WHERE left_at >= %(begin)s GROUP BY 1
    """
    params = context.params(begin=begin, unit=period, zone=context.time_zone)
    for bucket, opened, closed, left in context.conn.execute(query, params):
        counts = marks[bucket]
        counts[0] += int(opened)
        counts[1] += int(closed)
        counts[2] += int(left)


def _add_backlog_marks(
    context: DashboardContext, period: str, begin: datetime, marks: Marks
) -> None:
    """Count the marks of `_add_backlog_marks_sql` in the folded states."""
    zone = ZoneInfo(context.time_zone)

    def bucket(moment: datetime) -> date | None:
        return None if moment < begin else period_start(moment.astimezone(zone).date(), period)

    for state in context.folded():
        if state.submitted_at > context.as_of:
            continue
        marks[bucket(state.submitted_at)][0] += 1
        resolved = state.resolved_at
        if resolved is not None:
            marks[bucket(resolved)][1] += 1
            marks[bucket(max(state.submitted_at, resolved))][2] += 1


# Time to close.


def _bucket_labels() -> list[tuple[str, float, float | None]]:
    labels = []
    edges: Sequence[float | None] = [*CLOSE_EDGES_HOURS, None]
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        assert low is not None
        label = f"{_hours(low)}–{_hours(high)}" if high is not None else f"{_hours(low)} or more"
        labels.append((label, low, high))
    return labels


def _hours(value: float) -> str:
    return f"{value / 24:g} d" if value >= 24 else f"{value:g} h"


def _bucket_index(seconds: float) -> int:
    hours = seconds / 3600
    index = 0
    for number, edge in enumerate(CLOSE_EDGES_HOURS):
        if hours >= edge:
            index = number
    return index


def _time_to_close(context: DashboardContext, widget: TimeToCloseWidget) -> WidgetSteps:
    since = context.as_of - timedelta(days=widget.span_days)
    counts: Counter[int] = Counter()
    if not context.replaying:
        rows = context.conn.execute(
            f"""
            SELECT extract(epoch FROM resolved_at - submitted_at)::float8
            FROM incident_trends
            WHERE tenant_id = %(tenant)s AND resolved_at > %(since)s AND resolved_at <= %(now)s
              AND status <> ALL(%(not_judged)s) AND NOT {FLAGGED_SQL} AND {context.settled()}
            """,
            context.params(since=since, not_judged=list(NOT_JUDGED)),
        )
        for (seconds,) in rows:
            counts[_bucket_index(seconds)] += 1
    yield
    for state in context.folded():
        if (
            state.resolved_at is None
            or not since < state.resolved_at <= context.as_of
            or state.status in NOT_JUDGED
            or _flagged(state, context.as_of)
        ):
            continue
        counts[_bucket_index((state.resolved_at - state.submitted_at).total_seconds())] += 1
    return WidgetTable(
        ["time_to_close", "from_hours", "to_hours", "incidents"],
        [
            [label, low, high, counts.get(index, 0)]
            for index, (label, low, high) in enumerate(_bucket_labels())
        ],
    )


# Rankings.


def _ranking(context: DashboardContext, widget: RankingWidget) -> WidgetSteps:
    until = context.local_day
    since = until - timedelta(days=widget.span_days - 1) if widget.span_days else None
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    if not context.replaying:
        # Every group, whatever its size: the folded states may add cases to it.
        for row in rankings(
            context.conn,
            context.tenant_id,
            by=widget.by,
            min_cases=1,
            since=since,
            until=until,
            now=context.as_of,
            time_zone=context.time_zone,
            settled_by=context.as_of,
            known=context.known,
        ):
            groups[row.key][0] += row.cases
            groups[row.key][1] += row.on_time
    yield
    zone = ZoneInfo(context.time_zone)
    for state in context.folded():
        key = state.report_area if widget.by == "area" else state.department
        local = state.submitted_at.astimezone(zone).date()
        if (
            key is None
            or state.resolution_due_at is None
            or state.status in NOT_JUDGED
            or _flagged(state, context.as_of)
            or local > until
            or (since is not None and local < since)
        ):
            continue
        breached = resolution_breached(state, context.as_of)
        if state.resolved_at is None and not breached:
            continue
        groups[key][0] += 1
        groups[key][1] += 0 if breached else 1
    # The order of trends_queries.rankings: rate, then more cases, then name (bytewise).
    kept = [
        (key, cases, on_time)
        for key, (cases, on_time) in groups.items()
        if cases >= widget.min_cases
    ]
    kept.sort(key=lambda item: (-item[2] / item[1], -item[1], item[0].encode()))
    rows = [
        [rank, key, cases, on_time, _rate(on_time, cases)]
        for rank, (key, cases, on_time) in enumerate(kept[: widget.limit], start=1)
    ]
    return WidgetTable(["rank", widget.by, "cases", "on_time", "on_time_rate"], rows)


# Map of open incidents.

MAP_COLUMNS = [
    "incident_id",
    "category",
    "submitted_at",
    "latitude",
    "longitude",
    "group_id",
    "group_open_reports",
]


def _open_map(context: DashboardContext, widget: OpenMapWidget) -> WidgetSteps:
    # (submitted_at, incident_id, category, latitude, longitude, group_id)
    found: list[tuple[datetime, UUID, str | None, float, float, UUID]] = []
    if not context.replaying:
        found = context.conn.execute(
            f"""
            SELECT t.submitted_at, t.incident_id, t.category, g.latitude, g.longitude, g.group_id
            {_settled_open_sql(context)}
            ORDER BY t.submitted_at DESC, t.incident_id DESC
            LIMIT %(limit)s
            """,
            context.params(not_judged=list(NOT_JUDGED), limit=widget.limit),
        ).fetchall()
    yield
    open_states = [
        state
        for state in context.folded()
        if state.submitted_at <= context.as_of
        and state.status not in NOT_JUDGED
        and (state.resolved_at is None or state.resolved_at > context.as_of)
    ]
    located = _locations(context, [state.incident_id for state in open_states])
    sizes: Counter[UUID] = Counter()
    for state in open_states:
        if state.incident_id in located:
            latitude, longitude, group_id = located[state.incident_id]
            sizes[group_id] += 1
            found.append(
                (
                    state.submitted_at,
                    state.incident_id,
                    state.category,
                    latitude,
                    longitude,
                    group_id,
                )
            )
    found.sort(key=lambda item: (item[0], item[1]), reverse=True)
    shown = found[: widget.limit]
    if not context.replaying:
        sizes.update(_settled_group_sizes(context, {item[5] for item in shown}))
    rows = [
        [
            str(incident_id),
            category or NO_VALUE,
            submitted_at.isoformat(),
            round(latitude, MAP_DECIMALS),
            round(longitude, MAP_DECIMALS),
            str(group_id),
            sizes[group_id],
        ]
        for submitted_at, incident_id, category, latitude, longitude, group_id in shown
    ]
    return WidgetTable(MAP_COLUMNS, rows)


def _settled_open_sql(context: DashboardContext) -> str:
    """Return the FROM and WHERE clauses of the settled rows of incidents open at as_of
    that have a location."""
    return f"""
        FROM incident_trends AS t
        JOIN grouping_reports AS g USING (tenant_id, incident_id)
        WHERE t.tenant_id = %(tenant)s AND t.submitted_at <= %(now)s
          AND (t.resolved_at IS NULL OR t.resolved_at > %(now)s)
          AND t.status <> ALL(%(not_judged)s) AND {context.settled("t.")}
          AND g.latitude IS NOT NULL AND g.longitude IS NOT NULL
    """


def _settled_group_sizes(context: DashboardContext, group_ids: set[UUID]) -> dict[UUID, int]:
    rows = context.conn.execute(
        f"SELECT g.group_id, count(*) {_settled_open_sql(context)} "
        "AND g.group_id = ANY(%(groups)s) "
        "GROUP BY g.group_id",
        context.params(not_judged=list(NOT_JUDGED), groups=list(group_ids)),
    ).fetchall()
    return {group_id: int(count) for group_id, count in rows}


def _locations(
    context: DashboardContext, incident_ids: Iterable[UUID]
) -> dict[UUID, tuple[float, float, UUID]]:
    """Return the location and current duplicate group of each incident that has one."""
    # NOTE: locations and groups come from the live grouping model, whatever as_of and
    # known_at ask for.
    rows = context.conn.execute(
        """
        SELECT incident_id, latitude, longitude, group_id FROM grouping_reports
        WHERE tenant_id = %s AND incident_id = ANY(%s)
          AND latitude IS NOT NULL AND longitude IS NOT NULL
        """,
        (context.tenant_id, list(incident_ids)),
    ).fetchall()
    return {row[0]: (row[1], row[2], row[3]) for row in rows}


# Seals.


def recent_seals(context: DashboardContext, limit: int) -> list[tuple[Seal, datetime]]:
    """Return the latest `limit` seals recorded by `known_at` and made by `as_of`, newest
    first, with the time each was recorded."""
    rows = context.conn.execute(
        """
        SELECT stream_version, position, payload - 'leaf_prefixes', recorded_at
        FROM events
        WHERE tenant_id = %(tenant)s AND stream_id = %(stream)s AND event_type = %(type)s
          AND occurred_at <= %(as_of)s
          AND (%(known_at)s::timestamptz IS NULL OR recorded_at <= %(known_at)s)
        ORDER BY stream_version DESC
        LIMIT %(limit)s
        """,
        {
            "tenant": context.tenant_id,
            "stream": seal_stream_id(context.tenant_id),
            "type": SEAL_EVENT_TYPE,
            "as_of": context.as_of,
            "known_at": context.known_at,
            "limit": limit,
        },
    ).fetchall()
    return [
        (seal_from_event(context.tenant_id, version, position, payload), recorded_at)
        for version, position, payload, recorded_at in rows
    ]


def _recent_seals(context: DashboardContext, widget: RecentSealsWidget) -> WidgetSteps:
    rows = [
        [
            seal.stream_version,
            recorded_at.isoformat(),
            seal.event_count,
            seal.merkle_root.hex(),
            seal.previous_root.hex() if seal.previous_root else None,
        ]
        for seal, recorded_at in recent_seals(context, widget.limit)
    ]
    yield
    return WidgetTable(["seal", "sealed_at", "events", "merkle_root", "previous_root"], rows)
