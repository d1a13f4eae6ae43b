"""Trend routes: counts per period, duration percentiles and rankings of the trends model."""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at run
# time.

from dataclasses import asdict
from datetime import date, datetime, timedelta
from typing import Annotated, Any

from fastapi import FastAPI, Query
from psycopg_pool import ConnectionPool
from pydantic import BaseModel, Field

from api.auth import allow
from ledger.errors import InvalidRequest
from ledger.keys import Principal, Role
from ledger.store import PostgresEventStore
from ledger.tenants import require_tenant
from projections.runtime import projection_progress
from projections.sla_queries import consistent_snapshot
from projections.trends_queries import (
    DEFAULT_MIN_CASES,
    check_period,
    duration_percentiles,
    rankings,
    trend_counts,
)

TENANT = "/tenants/{tenant_id}"
TenantPath = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{1,62}$")]
# How far back a range reaches when `since` is left out.
DEFAULT_SPANS = {
    "day": timedelta(days=30),
    "week": timedelta(weeks=12),
    "month": timedelta(days=365),
}

PeriodQuery = Annotated[str, Query(description="day, week (ISO, Monday first) or month")]
ByQuery = Annotated[
    str | None, Query(description="category, department or area; none for the tenant's totals")
]
SinceQuery = Annotated[
    str | None,
    Query(description="First day (YYYY-MM-DD, tenant's time zone); default: a span before until"),
]
UntilQuery = Annotated[
    str | None, Query(description="Last day (YYYY-MM-DD, tenant's time zone); default: today")
]
NowQuery = Annotated[
    str | None,
    Query(
        description="The clock to judge against (ISO 8601); records dated after it are "
        "flagged. Defaults to the request time.",
        json_schema_extra={"format": "date-time"},
    ),
]


class TrendRowOut(BaseModel):
    period: date = Field(description="First day of the period")
    key: str | None
    opened: int
    closed: int
    backlog: int = Field(description="Incidents open at the end of the period")
    flagged: int = Field(description="Incidents opened in the period with impossible times")


class DurationRowOut(BaseModel):
    period: date
    key: str | None
    count: int
    business_median: float = Field(description="Seconds, in the SLA policy's business time")
    business_p90: float
    calendar_median: float = Field(description="Seconds, in calendar time")
    calendar_p90: float


class RankRowOut(BaseModel):
    rank: int
    key: str
    cases: int
    on_time: int
    on_time_rate: float


class TrendsMeta(BaseModel):
    tenant_id: str
    now: datetime
    caught_up: bool = Field(
        description="False while the projector is still applying events: the figures are "
        "then partial."
    )


class TrendsOut(TrendsMeta):
    period: str
    by: str | None
    since: date
    until: date
    rows: list[TrendRowOut]


class DurationsOut(TrendsMeta):
    measure: str
    period: str
    by: str | None
    since: date
    until: date
    rows: list[DurationRowOut]


class RankingsOut(TrendsMeta):
    by: str
    min_cases: int
    since: date | None
    until: date | None
    rows: list[RankRowOut]


def parse_day(name: str, value: str | None) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError as error:
        raise InvalidRequest(
            f"invalid {name} {value!r}: use a date such as 2015-06-30 (YYYY-MM-DD)"
        ) from error


def date_range(
    period: str, since: str | None, until: str | None, now: datetime, zone: str
) -> tuple[date, date]:
    """Read `since` and `until`, with defaults that end today in `zone`."""
    from zoneinfo import ZoneInfo

    check_period(period)
    last = parse_day("until", until) or now.astimezone(ZoneInfo(zone)).date()
    first = parse_day("since", since) or last - DEFAULT_SPANS[period]
    return first, last


def add_trends_routes(
    app: FastAPI,
    *,
    pool: ConnectionPool[Any],
    store: PostgresEventStore,
    responses: dict[int | str, dict[str, Any]],
) -> None:
    """Declare the trend routes on `app`."""
    from api.app import parse_as_of

    readers = allow(Role.STAFF, Role.OFFICER, Role.ADMIN, action="read trends")

    def caught_up() -> bool:
        with pool.connection() as conn:
            progress = projection_progress(conn).get("trends")
        return progress.caught_up if progress else False

    @app.get(TENANT + "/trends", response_model=TrendsOut, responses=responses, tags=["queries"])
    def get_trends(
        tenant_id: TenantPath,
        _: Annotated[Principal, readers],
        period: PeriodQuery = "month",
        by: ByQuery = None,
        since: SinceQuery = None,
        until: UntilQuery = None,
        now: NowQuery = None,
    ) -> TrendsOut:
        """Count incidents opened and closed, the backlog and the flagged records per period."""
        tenant = require_tenant(store, tenant_id)
        moment = parse_as_of(now, tenant.time_zone, "now")
        first, last = date_range(period, since, until, moment, tenant.time_zone)
        with pool.connection() as conn, consistent_snapshot(conn):
            rows = trend_counts(
                conn,
                tenant_id,
                period=period,
                by=by,
                since=first,
                until=last,
                now=moment,
                time_zone=tenant.time_zone,
            )
        return TrendsOut(
            tenant_id=tenant_id,
            now=moment,
            caught_up=caught_up(),
            period=period,
            by=by,
            since=first,
            until=last,
            rows=[TrendRowOut(**asdict(row)) for row in rows],
        )

    @app.get(
        TENANT + "/trends/durations",
        response_model=DurationsOut,
        responses=responses,
        tags=["queries"],
    )
    def get_trend_durations(
        tenant_id: TenantPath,
        _: Annotated[Principal, readers],
        measure: Annotated[str, Query(description="first_response or resolution")] = "resolution",
        period: PeriodQuery = "month",
        by: ByQuery = None,
        since: SinceQuery = None,
        until: UntilQuery = None,
        now: NowQuery = None,
    ) -> DurationsOut:
        """Median and 90th percentile times to first response or to resolution, in seconds."""
        tenant = require_tenant(store, tenant_id)
        moment = parse_as_of(now, tenant.time_zone, "now")
        first, last = date_range(period, since, until, moment, tenant.time_zone)
        with pool.connection() as conn:
            rows = duration_percentiles(
                conn,
                tenant_id,
                measure=measure,
                period=period,
                by=by,
                since=first,
                until=last,
                now=moment,
                time_zone=tenant.time_zone,
            )
        return DurationsOut(
            tenant_id=tenant_id,
            now=moment,
            caught_up=caught_up(),
            measure=measure,
            period=period,
            by=by,
            since=first,
            until=last,
            rows=[DurationRowOut(**asdict(row)) for row in rows],
        )

    @app.get(
        TENANT + "/trends/rankings",
        response_model=RankingsOut,
        responses=responses,
        tags=["queries"],
    )
    def get_trend_rankings(
        tenant_id: TenantPath,
        _: Annotated[Principal, readers],
        by: Annotated[str, Query(description="department or area")] = "department",
        min_cases: Annotated[
            int, Query(description="Fewest decided cases a group needs to be ranked")
        ] = DEFAULT_MIN_CASES,
        since: SinceQuery = None,
        until: UntilQuery = None,
        now: NowQuery = None,
    ) -> RankingsOut:
        """Rank departments or areas by the share of cases resolved within their SLA target."""
        tenant = require_tenant(store, tenant_id)
        moment = parse_as_of(now, tenant.time_zone, "now")
        first, last = parse_day("since", since), parse_day("until", until)
        with pool.connection() as conn:
            rows = rankings(
                conn,
                tenant_id,
                by=by,
                min_cases=min_cases,
                since=first,
                until=last,
                now=moment,
                time_zone=tenant.time_zone,
            )
        return RankingsOut(
            tenant_id=tenant_id,
            now=moment,
            caught_up=caught_up(),
            by=by,
            min_cases=min_cases,
            since=first,
            until=last,
            rows=[
                RankRowOut(
                    rank=row.rank,
                    key=row.key,
                    cases=row.cases,
                    on_time=row.on_time,
                    on_time_rate=row.on_time_rate,
                )
                for row in rows
            ],
        )
