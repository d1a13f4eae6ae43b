"""The `civicpulse rebuild`, `replay`, `what-if` and `snapshot` commands."""

from __future__ import annotations

import csv
import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from ledger.database import Database
from ledger.errors import LedgerError

logger = logging.getLogger("civicpulse.replay")
snapshot_app = typer.Typer(help="Take, list and prune read-model snapshots.", no_args_is_help=True)
console = Console(stderr=True, soft_wrap=True)

TIME_HELP = "RFC 3339; without an offset it is read in the tenant's time zone"


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(code=2)


def _database() -> Database:
    from api.cli import _migrated

    return _migrated()[1]


def _projections(names: list[str] | None) -> list[Any]:
    from projections.runtime import projection_named, replayable_projections

    if not names:
        return replayable_projections()
    try:
        return [projection_named(name, replayable=True) for name in names]
    except ValueError as error:
        raise _fail(str(error)) from error


def rebuild_command(
    projections: Annotated[
        list[str] | None,
        typer.Argument(help="Projections to rebuild, together on one process pool (default: all)"),
    ] = None,
    tenant: Annotated[
        str | None, typer.Option("--tenant", help="Rebuild this tenant's rows only")
    ] = None,
    workers: Annotated[
        int, typer.Option(min=0, help="Worker processes that fold the log (0: one per CPU)")
    ] = 0,
) -> None:
    """Rebuild read models from the log on a process pool and swap each in atomically.

    Events appended meanwhile are included. A failed or interrupted rebuild leaves the
    live models not yet swapped in, and their checkpoints, unchanged.
    """
    from replay.rebuild import RebuildFailed, RebuildProgress, RebuildReport, rebuild_many

    chosen = _projections(projections)
    database = _database()
    count = workers or os.cpu_count() or 1
    done: list[str] = []

    def show_report(report: RebuildReport) -> None:
        done.append(report.projection)
        console.print(
            f"rebuilt {report.projection}"
            + (f" for tenant {report.tenant_id}" if report.tenant_id else "")
            + f": {report.rows} rows, {report.events_folded} events folded in "
            f"{report.partitions} partitions on {report.workers} workers, "
            f"{report.events_caught_up} caught up; checkpoint at position "
            f"{report.checkpoint.position}; apply lock held {report.swap_seconds * 1000:.0f} ms, "
            f"{report.total_seconds:.1f} s in all"
        )

    def run(progress: Any) -> None:
        try:
            rebuild_many(
                database,
                chosen,
                tenant_id=tenant,
                workers=count,
                progress=progress,
                swapped=show_report,
            )
        except RebuildFailed as error:
            # The error names the projection it stopped; the others need naming too.
            suffix = _unchanged(chosen, done) if len(chosen) > 1 else ""
            raise _fail(str(error) + suffix) from error
        except KeyboardInterrupt:
            console.print(
                "[yellow]interrupted:[/yellow] the rebuild stopped" + _unchanged(chosen, done)
            )
            raise typer.Exit(code=130) from None

    if console.is_terminal:
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as bar:
            tasks = {
                projection.name: bar.add_task(f"folding {projection.name}", total=None)
                for projection in chosen
            }

            def show(step: RebuildProgress) -> None:
                bar.update(
                    tasks[step.projection], completed=step.events_folded, total=step.events_total
                )

            run(show)
    else:

        def log(step: RebuildProgress) -> None:
            logger.info(
                "rebuild of %s: partitions %d of %d done, events folded %d of %d",
                step.projection,
                step.partitions_done,
                step.partitions,
                step.events_folded,
                step.events_total,
            )

        run(log)


def _unchanged(chosen: list[Any], done: list[str]) -> str:
    """Name the projections a stopped rebuild left as they were, for its error message."""
    left = [projection.name for projection in chosen if projection.name not in done]
    if not left:
        return ""
    return f"; for {', '.join(left)} the live model and its checkpoint are unchanged" + (
        f" ({', '.join(done)} were rebuilt and swapped in)" if done else ""
    )


def replay_command(
    projection: Annotated[str, typer.Argument(help="Projection to replay, such as sla")],
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant id")],
    as_of: Annotated[
        str | None,
        typer.Option(help=f"Valid time: keep the events that happened by then ({TIME_HELP})"),
    ] = None,
    known_at: Annotated[
        str | None,
        typer.Option(help=f"Transaction time: keep the events recorded by then ({TIME_HELP})"),
    ] = None,
    output_format: Annotated[str, typer.Option("--format", help="json or csv")] = "json",
    output: Annotated[
        Path | None, typer.Option(help="File to write; standard output when left out")
    ] = None,
    snapshots: Annotated[
        bool, typer.Option(help="Start from the nearest usable snapshot (same result, faster)")
    ] = True,
) -> None:
    """Print a tenant's rows of a read model as of a valid time and as known at a
    transaction time, folded from the log."""
    from api.cli import _store
    from ledger.audit import parse_time
    from ledger.tenants import require_tenant
    from replay.time_travel import replay

    if output_format not in ("json", "csv"):
        raise _fail(f"invalid --format {output_format!r}: use json or csv")
    (chosen,) = _projections([projection])
    database = _database()
    pool, store = _store(database)
    with pool:
        try:
            zone = require_tenant(store, tenant).time_zone
            valid = parse_time("as_of", as_of, zone)
            known = parse_time("known_at", known_at, zone)
        except LedgerError as error:
            raise _fail(str(error)) from error
        with pool.connection() as conn:
            replayed = replay(
                conn, chosen, tenant, as_of=valid, known_at=known, use_snapshots=snapshots
            )
    records = chosen.to_records(replayed.states)
    try:
        target = output.open("wb") if output else sys.stdout.buffer
    except OSError as error:
        raise _fail(f"cannot write {output}: {error}; pass a writable --output") from error
    with target if output else _unclosed(target) as out:
        if output_format == "json":
            out.write(orjson.dumps(records, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
            out.write(b"\n")
        else:
            _write_csv(out, chosen, records)
    source = (
        f"snapshot {replayed.snapshot_id} and {replayed.events_folded} later events"
        if replayed.snapshot_id is not None
        else f"{replayed.events_folded} events"
    )
    console.print(f"{len(records)} rows of {chosen.name} for tenant {tenant}, from {source}")


class _unclosed:
    """Use standard output in a with block without closing it."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def __enter__(self) -> Any:
        return self.stream

    def __exit__(self, *_: object) -> None:
        self.stream.flush()


def _write_csv(out: Any, projection: Any, records: list[dict[str, Any]]) -> None:
    import io

    text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
    columns = ["tenant_id", *projection.columns]
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    for record in records:
        writer.writerow(
            {
                key: orjson.dumps(value).decode() if isinstance(value, dict | list) else value
                for key, value in record.items()
            }
        )
    text.detach()


ProjectionOption = Annotated[
    str | None, typer.Option("--projection", help="Projection name (default: every one)")
]
EveryTenantOption = Annotated[
    str | None, typer.Option("--tenant", help="Tenant id (default: every tenant)")
]


@snapshot_app.command("take")
def snapshot_take(
    projection: Annotated[
        str | None, typer.Argument(help="Projection to snapshot (default: every one)")
    ] = None,
    tenant: EveryTenantOption = None,
) -> None:
    """Snapshot read models now, at their checkpoints. Tenants without new events since
    their latest snapshot are skipped."""
    from replay.snapshots import take_snapshots

    chosen = _projections([projection] if projection else None)
    taken, failed = take_snapshots(_database(), chosen, tenant_id=tenant)
    for info in taken:
        typer.echo(
            f"snapshot {info.snapshot_id}: {info.projection} of tenant {info.tenant_id}, "
            f"{info.row_count} rows, {info.event_count} events through position "
            f"{info.checkpoint.position}, sha256 {info.sha256}"
        )
    if not taken and not failed:
        typer.echo("nothing new to snapshot")
    for key, message in failed.items():
        console.print(f"[red]error:[/red] snapshot of {key} failed: {message}")
    if failed:
        raise typer.Exit(code=1)


@snapshot_app.command("list")
def snapshot_list(tenant: EveryTenantOption = None, projection: ProjectionOption = None) -> None:
    """List stored snapshots without their rows."""
    from replay.snapshots import list_snapshots

    with _database().connect_worker() as conn:
        infos = list_snapshots(conn, tenant, projection)
    table = Table(
        "tenant",
        "projection",
        "id",
        "position",
        "last recorded",
        "events",
        "rows",
        "KiB",
        "sha256",
    )
    for info in infos:
        table.add_row(
            info.tenant_id,
            info.projection,
            str(info.snapshot_id),
            str(info.checkpoint.position),
            info.last_recorded_at.isoformat(timespec="seconds"),
            str(info.event_count),
            str(info.row_count),
            f"{info.compressed_bytes / 1024:.0f}",
            info.sha256[:16],
        )
    Console(width=None if sys.stdout.isatty() else 200).print(table)


@snapshot_app.command("prune")
def snapshot_prune(
    keep: Annotated[
        int, typer.Option(min=0, help="Snapshots to keep per tenant and projection, newest first")
    ] = 3,
    tenant: EveryTenantOption = None,
    projection: ProjectionOption = None,
) -> None:
    """Delete all but the newest snapshots. Replays return the same rows, but those into the
    past of the deleted snapshots take longer."""
    from replay.snapshots import prune_snapshots

    with _database().connect_worker() as conn:
        deleted = prune_snapshots(conn, keep=keep, tenant_id=tenant, projection=projection)
    typer.echo(f"deleted {deleted} snapshots")


def what_if_command(
    policy_file: Annotated[
        Path,
        typer.Argument(
            exists=True,
            dir_okay=False,
            help="YAML or JSON file with the proposed sla_policies section (and calendars), "
            "as `civicpulse config apply` takes it",
        ),
    ],
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant id")],
    as_of: Annotated[
        str | None,
        typer.Option(
            help=f"Valid time: keep the events that happened by then, and judge open "
            f"incidents at it ({TIME_HELP}; default: now)"
        ),
    ] = None,
    known_at: Annotated[
        str | None,
        typer.Option(help=f"Transaction time: keep the events recorded by then ({TIME_HELP})"),
    ] = None,
    output_format: Annotated[str, typer.Option("--format", help="table, json or csv")] = "table",
    cases: Annotated[
        int, typer.Option(min=0, help="Changed cases to list in the table format, per direction")
    ] = 20,
) -> None:
    """Replay a tenant's history under a proposed SLA policy file and compare it with the
    policies in force: cases that would breach or no longer breach, and on-time rates per
    category. Nothing is written."""
    from api.cli import _store
    from api.yaml_files import YamlFileInvalid, load_yaml_file
    from ledger.audit import parse_time
    from ledger.tenants import require_tenant
    from replay.what_if import parse_proposal, what_if

    if output_format not in ("table", "json", "csv"):
        raise _fail(f"invalid --format {output_format!r}: use table, json or csv")
    try:
        document = load_yaml_file(policy_file)
    except YamlFileInvalid as error:
        raise _fail(str(error)) from error
    if isinstance(document, dict):
        named = document.pop("tenant", None)
        if named is not None and named != tenant:
            raise _fail(
                f"{policy_file} names tenant {named!r} but --tenant is {tenant!r}: pass the "
                "same tenant or remove the file's `tenant` key"
            )
    database = _database()
    pool, store = _store(database)
    with pool:
        try:
            config = require_tenant(store, tenant)
            proposal = parse_proposal(document, config, policy_file.resolve().parent)
            valid = parse_time("as_of", as_of, config.time_zone)
            known = parse_time("known_at", known_at, config.time_zone)
        except LedgerError as error:
            raise _fail(str(error)) from error
        # Open incidents are judged at as_of, else at known_at, else now, as the SLA
        # summary judges them.
        judged_at = valid or known or datetime.now(UTC)
        with pool.connection() as conn:
            report = what_if(
                conn, tenant, proposal, judged_at=judged_at, as_of=valid, known_at=known
            )
    if output_format == "json":
        sys.stdout.buffer.write(
            orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
        )
        sys.stdout.buffer.write(b"\n")
    elif output_format == "csv":
        _write_what_if_csv(report)
    else:
        _print_what_if(report, cases)


WHAT_IF_CSV_COLUMNS = (
    "category",
    "total",
    "breached_in_force",
    "breached_proposed",
    "on_time_rate_in_force",
    "on_time_rate_proposed",
)


def _write_what_if_csv(report: Any) -> None:
    """Write one row per category and a last row of totals (category `(all)`)."""
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(WHAT_IF_CSV_COLUMNS)
    rows = [(item.category, item.in_force, item.proposed) for item in report.categories]
    rows.append(("(all)", report.totals_in_force, report.totals_proposed))
    for category, before, after in rows:
        writer.writerow(
            (
                category or "",
                before.total,
                before.breached,
                after.breached,
                _rate(before.on_time_rate),
                _rate(after.on_time_rate),
            )
        )


def _rate(rate: float | None) -> str:
    return "" if rate is None else f"{rate:.6f}"


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.1%}"


def _print_what_if(report: Any, cases: int) -> None:
    out = Console(width=None if sys.stdout.isatty() else 200)
    title = (
        f"{report.tenant_id}: proposed {', '.join(report.sections)} against the policies in "
        f"force, judged at {report.judged_at.isoformat()}"
    )
    table = Table(title=title)
    columns = (
        "category",
        "total",
        "breached (in force)",
        "breached (proposed)",
        "on time (in force)",
        "on time (proposed)",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "category" else "right")
    rows = [(item.category, item.in_force, item.proposed) for item in report.categories]
    for category, before, after in [
        *rows,
        ("(all)", report.totals_in_force, report.totals_proposed),
    ]:
        table.add_row(
            category or "(none)",
            str(before.total),
            str(before.breached),
            str(after.breached),
            _percent(before.on_time_rate),
            _percent(after.on_time_rate),
        )
    out.print(table)
    for label, changes in (
        ("would breach under the proposal", report.newly_breached),
        ("would no longer breach", report.no_longer_breached),
    ):
        out.print(f"{len(changes)} incidents {label}")
        for change in changes[:cases]:
            out.print(
                f"  {change.incident_id}  {change.category or '(none)'}  submitted "
                f"{change.submitted_at.isoformat()}  due {_time(change.due_in_force)} "
                f"({change.policy_in_force or 'own target'}) -> {_time(change.due_proposed)} "
                f"({change.policy_proposed or 'own target'})"
            )
        if len(changes) > cases:
            out.print(f"  ... and {len(changes) - cases} more: use --format json for all")
    console.print(f"{report.events_folded} events folded twice; nothing was written")


def _time(moment: Any) -> str:
    return "none" if moment is None else moment.isoformat()
