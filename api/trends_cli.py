"""The `civicpulse trends` commands: counts per period, duration percentiles, rankings."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from typing import Annotated, Any

import psycopg
import typer
from psycopg_pool import ConnectionPool
from rich.console import Console
from rich.table import Table

from ledger.errors import LedgerError
from ledger.store import PostgresEventStore
from ledger.tenants import require_tenant
from projections.runtime import projection_progress
from projections.trends_queries import (
    DEFAULT_MIN_CASES,
    duration_percentiles,
    rankings,
    trend_counts,
)

trends_app = typer.Typer(help="Trends: counts, durations and rankings.", no_args_is_help=True)

TenantOption = Annotated[str, typer.Option("--tenant", help="Tenant id")]
PeriodOption = Annotated[str, typer.Option(help="day, week (ISO) or month")]
ByOption = Annotated[str | None, typer.Option(help="category, department or area")]
SinceOption = Annotated[
    str | None, typer.Option(help="First day, YYYY-MM-DD in the tenant's time zone")
]
UntilOption = Annotated[
    str | None, typer.Option(help="Last day, YYYY-MM-DD in the tenant's time zone (default: today)")
]
NowOption = Annotated[
    str | None,
    typer.Option(help="ISO 8601 clock to judge against; naive times use the tenant's zone"),
]


@dataclass(frozen=True, slots=True)
class _Query:
    conn: psycopg.Connection[Any]
    now: datetime
    time_zone: str


@contextmanager
def _query(tenant: str, now: str | None) -> Iterator[_Query]:
    """Connect, read the tenant and the clock, and turn ledger errors into exit code 2."""
    # Imported here: api.cli imports this module to register the commands.
    from api.app import parse_as_of
    from api.cli import _fail, _migrated, console

    _, database = _migrated()
    with ConnectionPool(database.app_conninfo, min_size=1, max_size=1) as pool:
        try:
            config = require_tenant(PostgresEventStore(pool), tenant)
            moment = parse_as_of(now, config.time_zone, "--now")
            with pool.connection() as conn:
                progress = projection_progress(conn).get("trends")
                if progress is None or not progress.caught_up:
                    console.print(
                        "[yellow]warning:[/yellow] the trends read model has not applied every "
                        "event yet, so these figures are partial; run `civicpulse project "
                        "--once` or wait for the running projector"
                    )
                yield _Query(conn, moment, config.time_zone)
        except LedgerError as error:
            raise _fail(str(error)) from error


def _print(title: str, columns: list[str], rows: list[list[str]]) -> None:
    table = Table(title=title)
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index < 2 else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def _dates(period: str, since: str | None, until: str | None, query: _Query) -> tuple[date, date]:
    from api.trends import date_range

    return date_range(period, since, until, query.now, query.time_zone)


@trends_app.command("counts")
def trends_counts(
    tenant: TenantOption,
    period: PeriodOption = "month",
    by: ByOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    now: NowOption = None,
) -> None:
    """Print incidents opened and closed, the backlog and flagged records per period."""
    with _query(tenant, now) as query:
        first, last = _dates(period, since, until, query)
        rows = trend_counts(
            query.conn,
            tenant,
            period=period,
            by=by,
            since=first,
            until=last,
            now=query.now,
            time_zone=query.time_zone,
        )
    _print(
        f"{tenant} by {period} from {first} to {last}",
        ["period", by or "all", "opened", "closed", "backlog", "flagged"],
        [
            [
                row.period.isoformat(),
                row.key or ("(none)" if by else "all"),
                str(row.opened),
                str(row.closed),
                str(row.backlog),
                str(row.flagged),
            ]
            for row in rows
        ],
    )


@trends_app.command("durations")
def trends_durations(
    tenant: TenantOption,
    measure: Annotated[str, typer.Option(help="first_response or resolution")] = "resolution",
    period: PeriodOption = "month",
    by: ByOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    now: NowOption = None,
) -> None:
    """Print median and 90th percentile durations, in business and calendar hours."""
    with _query(tenant, now) as query:
        first, last = _dates(period, since, until, query)
        rows = duration_percentiles(
            query.conn,
            tenant,
            measure=measure,
            period=period,
            by=by,
            since=first,
            until=last,
            now=query.now,
            time_zone=query.time_zone,
        )
    _print(
        f"{tenant}: time to {measure.replace('_', ' ')} in hours, from {first} to {last}",
        ["period", by or "all", "count", "business p50", "business p90", "p50", "p90"],
        [
            [
                row.period.isoformat(),
                row.key or ("(none)" if by else "all"),
                str(row.count),
                *(
                    f"{seconds / 3600:.1f}"
                    for seconds in (
                        row.business_median,
                        row.business_p90,
                        row.calendar_median,
                        row.calendar_p90,
                    )
                ),
            ]
            for row in rows
        ],
    )


@trends_app.command("rankings")
def trends_rankings(
    tenant: TenantOption,
    by: Annotated[str, typer.Option(help="department or area")] = "department",
    min_cases: Annotated[
        int, typer.Option(min=1, help="Fewest decided cases a group needs to be ranked")
    ] = DEFAULT_MIN_CASES,
    since: SinceOption = None,
    until: UntilOption = None,
    now: NowOption = None,
) -> None:
    """Print departments or areas by on-time rate, best first."""
    from api.trends import parse_day

    with _query(tenant, now) as query:
        rows = rankings(
            query.conn,
            tenant,
            by=by,
            min_cases=min_cases,
            since=parse_day("since", since),
            until=parse_day("until", until),
            now=query.now,
            time_zone=query.time_zone,
        )
    _print(
        f"{tenant}: {by}s with at least {min_cases} cases, as of {query.now.isoformat()}",
        ["rank", by, "cases", "on time", "rate"],
        [
            [str(row.rank), row.key, str(row.cases), str(row.on_time), f"{row.on_time_rate:.1%}"]
            for row in rows
        ],
    )
