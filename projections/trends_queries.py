"""Queries over the trends read model: counts per period, duration percentiles, rankings.

Periods are days, ISO weeks (Monday first) and months of the tenant's time zone. Every
figure that depends on the clock takes `now` as an argument.

A record is flagged when its history is impossible: an importer flagged it, it was closed
or responded to before it was opened, or it is dated after `now`. Flagged records count in
`opened`, `closed` and `backlog` like the others, are counted again in `flagged`, and are
left out of durations and rankings.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg

from ledger.database import set_tenant
from ledger.errors import InvalidRequest
from projections.sla import NOT_JUDGED, RESOLUTION_BREACHED_SQL
from projections.sla_queries import consistent_snapshot
from replay.point_in_time import KnownAt, known_sql

PERIODS = ("day", "week", "month")
# Dimension name -> column of incident_trends.
DIMENSIONS = {"category": "category", "department": "department", "area": "report_area"}
RANKED_DIMENSIONS = ("department", "area")
MEASURES = {"first_response": "first_response", "resolution": "resolution"}
MAX_PERIODS = 1000
DEFAULT_MIN_CASES = 20

# Never NULL: a NULL here would drop records from `NOT flagged` filters unseen.
FLAGGED_SQL = """
    (flagged OR submitted_at > %(now)s OR COALESCE(resolved_at > %(now)s, false)
     OR COALESCE(first_response_at > %(now)s, false))
"""


@dataclass(frozen=True, slots=True)
class TrendRow:
    period: date  # first day of the period, in the tenant's time zone
    key: str | None  # the dimension's value; None without a dimension or without a value
    opened: int
    closed: int
    backlog: int  # incidents open at the end of the period
    flagged: int  # incidents opened in the period whose records are impossible


@dataclass(frozen=True, slots=True)
class DurationRow:
    period: date  # period of the response or of the resolution
    key: str | None
    count: int
    business_median: float  # seconds
    business_p90: float
    calendar_median: float
    calendar_p90: float


@dataclass(frozen=True, slots=True)
class RankRow:
    rank: int
    key: str
    cases: int
    on_time: int

    @property
    def on_time_rate(self) -> float:
        return self.on_time / self.cases


def period_start(day: date, period: str) -> date:
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def next_period(start: date, period: str) -> date:
    if period == "day":
        return start + timedelta(days=1)
    if period == "week":
        return start + timedelta(days=7)
    return date(start.year + start.month // 12, start.month % 12 + 1, 1)


def check_period(period: str) -> None:
    if period not in PERIODS:
        raise InvalidRequest(f"invalid period {period!r}: use day, week or month")


def check_dimension(by: str | None, allowed: tuple[str, ...] = tuple(DIMENSIONS)) -> None:
    if by is not None and by not in allowed:
        raise InvalidRequest(f"invalid by {by!r}: use {', '.join(allowed)}")


def period_range(period: str, since: date, until: date) -> list[date]:
    """Return the starts of the periods from the one that contains `since` to `until`'s."""
    check_period(period)
    if since > until:
        raise InvalidRequest(
            f"since {since.isoformat()} is after until {until.isoformat()}: swap them"
        )
    starts = [period_start(since, period)]
    last = period_start(until, period)
    while starts[-1] < last:
        if len(starts) >= MAX_PERIODS:
            raise InvalidRequest(
                f"{since.isoformat()}..{until.isoformat()} spans more than {MAX_PERIODS} "
                f"{period}s: use a longer period or a shorter range"
            )
        starts.append(next_period(starts[-1], period))
    return starts


def _instant(day: date, zone: ZoneInfo) -> datetime:
    """Local midnight of `day` as an aware time."""
    return datetime(day.year, day.month, day.day, tzinfo=zone)


def _key_sql(by: str | None) -> str:
    return DIMENSIONS[by] if by is not None else "NULL::text"


def trend_counts(
    conn: psycopg.Connection[Any],
    tenant_id: str,
    *,
    period: str,
    by: str | None,
    since: date,
    until: date,
    now: datetime,
    time_zone: str,
) -> list[TrendRow]:
    """Count opened, closed, backlog and flagged incidents per period and dimension value.

    An incident counts as closed in the period of its latest resolution (resolved, closed,
    rejected or marked duplicate). A reopen takes it back into the backlog until then.
    """
    check_dimension(by)
    starts = period_range(period, since, until)
    zone = ZoneInfo(time_zone)
    begin = _instant(starts[0], zone)
    end = _instant(next_period(starts[-1], period), zone)
    # An incident leaves the backlog at greatest(opened, resolved): one closed "before" it
    # was opened never enters it, so the running sum never goes below zero.
    query = f"""
        WITH facts AS (
            SELECT {_key_sql(by)} AS key, submitted_at, resolved_at,
                   {FLAGGED_SQL} AS is_flagged
            FROM incident_trends WHERE tenant_id = %(tenant)s
        ), marks AS (
            SELECT key, submitted_at AS at, 1 AS opened, 0 AS closed, 0 AS left_backlog,
                   is_flagged::int AS flagged
            FROM facts
            UNION ALL
            SELECT key, resolved_at, 0, 1, 0, 0 FROM facts WHERE resolved_at IS NOT NULL
            UNION ALL
            SELECT key, greatest(submitted_at, resolved_at), 0, 0, 1, 0
            FROM facts WHERE resolved_at IS NOT NULL
        )
        SELECT CASE WHEN at < %(begin)s THEN NULL
                    ELSE date_trunc(%(unit)s, at AT TIME ZONE %(zone)s)::date END,
               key, sum(opened), sum(closed), sum(left_backlog), sum(flagged)
        FROM marks WHERE at < %(end)s
        GROUP BY 1, 2
    """
    params = {
        "tenant": tenant_id,
        "now": now,
        "begin": begin,
        "end": end,
        "unit": period,
        "zone": time_zone,
    }
    with consistent_snapshot(conn):
        set_tenant(conn, tenant_id)
        rows = conn.execute(query, params).fetchall()

    before: dict[str | None, int] = defaultdict(int)
    figures: dict[tuple[date, str | None], tuple[int, int, int, int]] = {}
    for bucket, key, opened, closed, left, flagged in rows:
        if bucket is None:
            before[key] += int(opened) - int(left)
        else:
            figures[(bucket, key)] = (int(opened), int(closed), int(left), int(flagged))
    keys = sorted(
        set(before) | {key for _, key in figures}, key=lambda item: (item is None, item or "")
    )
    result = []
    for key in keys:
        backlog = before.get(key, 0)
        for start in starts:
            opened, closed, left, flagged = figures.get((start, key), (0, 0, 0, 0))
            backlog += opened - left
            if opened or closed or backlog or flagged:
                result.append(TrendRow(start, key, opened, closed, backlog, flagged))
    result.sort(key=lambda row: (row.period, row.key is None, row.key or ""))
    return result


def duration_percentiles(
    conn: psycopg.Connection[Any],
    tenant_id: str,
    *,
    measure: str,
    period: str,
    by: str | None,
    since: date,
    until: date,
    now: datetime,
    time_zone: str,
) -> list[DurationRow]:
    """Median and 90th percentile of the time to first response or to resolution, in seconds.

    Durations are grouped by the period in which the response or the resolution happened,
    in business time (the calendar of the incident's SLA policy) and in calendar time.
    Flagged records, rejected reports and duplicates are left out.
    """
    if measure not in MEASURES:
        raise InvalidRequest(f"invalid measure {measure!r}: use first_response or resolution")
    check_dimension(by)
    starts = period_range(period, since, until)
    zone = ZoneInfo(time_zone)
    end_column = "first_response_at" if measure == "first_response" else "resolved_at"
    business = f"{measure}_business_seconds"
    query = f"""
        SELECT date_trunc(%(unit)s, {end_column} AT TIME ZONE %(zone)s)::date,
               {_key_sql(by)},
               count(*),
               percentile_cont(ARRAY[0.5, 0.9]) WITHIN GROUP (ORDER BY {business}),
               percentile_cont(ARRAY[0.5, 0.9]) WITHIN GROUP (
                   ORDER BY extract(epoch FROM {end_column} - submitted_at)::float8)
        FROM incident_trends
        WHERE tenant_id = %(tenant)s
          AND {end_column} >= %(begin)s AND {end_column} < %(end)s
          AND {business} IS NOT NULL
          AND status <> ALL(%(not_judged)s)
          AND NOT {FLAGGED_SQL}
        GROUP BY 1, 2
        ORDER BY 1, 2 NULLS LAST
    """
    params = {
        "tenant": tenant_id,
        "now": now,
        "begin": _instant(starts[0], zone),
        "end": _instant(next_period(starts[-1], period), zone),
        "unit": period,
        "zone": time_zone,
        "not_judged": list(NOT_JUDGED),
    }
    with consistent_snapshot(conn):
        set_tenant(conn, tenant_id)
        rows = conn.execute(query, params).fetchall()
    return [
        DurationRow(bucket, key, int(count), b[0], b[1], c[0], c[1])
        for bucket, key, count, b, c in rows
    ]


def rankings(
    conn: psycopg.Connection[Any],
    tenant_id: str,
    *,
    by: str,
    min_cases: int = DEFAULT_MIN_CASES,
    since: date | None = None,
    until: date | None = None,
    now: datetime,
    time_zone: str,
    settled_by: datetime | None = None,
    known: KnownAt | None = None,
) -> list[RankRow]:
    """Rank departments or areas by on-time rate, best first.

    A case is an incident with a resolution target whose verdict is known at `now`: it was
    resolved, or it is still open and already late. Groups with fewer than `min_cases`
    cases are left out, so one fast fix cannot top the table. Ties go to the group with
    more cases, then to the name that sorts first. With `settled_by`, only incidents whose
    events all happened by then count. With `known`, only the rows it leaves to SQL count.
    """
    check_dimension(by, RANKED_DIMENSIONS)
    if min_cases < 1:
        raise InvalidRequest(f"invalid min_cases {min_cases}: use 1 or more")
    if since is not None and until is not None and since > until:
        raise InvalidRequest(
            f"since {since.isoformat()} is after until {until.isoformat()}: swap them"
        )
    zone = ZoneInfo(time_zone)
    column = DIMENSIONS[by]
    query = f"""
        SELECT key, count(*) AS cases, count(*) FILTER (WHERE NOT breached) AS on_time
        FROM (
            SELECT {column} AS key, {RESOLUTION_BREACHED_SQL} AS breached, resolved_at
            FROM incident_trends
            WHERE tenant_id = %(tenant)s AND {column} IS NOT NULL
              AND resolution_due_at IS NOT NULL
              AND status <> ALL(%(not_judged)s)
              AND NOT {FLAGGED_SQL}
              AND (%(begin)s::timestamptz IS NULL OR submitted_at >= %(begin)s)
              AND (%(end)s::timestamptz IS NULL OR submitted_at < %(end)s)
              AND (%(settled)s::timestamptz IS NULL OR latest_occurred_at <= %(settled)s)
              {"AND " + known_sql() if known is not None else ""}
        ) AS judged
        WHERE resolved_at IS NOT NULL OR breached
        GROUP BY key
        HAVING count(*) >= %(min_cases)s
        ORDER BY count(*) FILTER (WHERE NOT breached)::numeric / count(*) DESC,
                 count(*) DESC, key COLLATE "C"
    """
    params = {
        "tenant": tenant_id,
        "now": now,
        "not_judged": list(NOT_JUDGED),
        "begin": _instant(since, zone) if since is not None else None,
        "end": _instant(until + timedelta(days=1), zone) if until is not None else None,
        "min_cases": min_cases,
        "settled": settled_by,
        **(known.params() if known is not None else {}),
    }
    with consistent_snapshot(conn):
        set_tenant(conn, tenant_id)
        rows = conn.execute(query, params).fetchall()
    return [
        RankRow(rank, key, int(cases), int(on_time))
        for rank, (key, cases, on_time) in enumerate(rows, start=1)
    ]
