"""The `civicpulse audit` commands: export a tenant's filtered events."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Annotated
from uuid import UUID

import typer
from psycopg_pool import ConnectionPool

from ledger.audit import AuditFilter, parse_time
from ledger.audit_export import EXPORT_FORMATS, ExportFormat, ExportProgress, export_events
from ledger.errors import InvalidRequest, LedgerError
from ledger.store import PostgresEventStore
from ledger.tenants import require_tenant

audit_app = typer.Typer(help="Audit a tenant's event log.", no_args_is_help=True)

TIME_HELP = "ISO 8601; without an offset it is read in the tenant's time zone"


@audit_app.command("events")
def audit_events(
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant id")],
    actor: Annotated[str | None, typer.Option(help="Actor name in the metadata")] = None,
    role: Annotated[
        str | None, typer.Option(help="reporter, staff, officer, admin or system (imports)")
    ] = None,
    event_type: Annotated[
        list[str] | None,
        typer.Option("--event-type", help="Event type; repeat the option for several"),
    ] = None,
    incident: Annotated[str | None, typer.Option(help="Incident id")] = None,
    stream: Annotated[str | None, typer.Option(help="Stream id, such as keys-TENANT")] = None,
    category: Annotated[
        str | None, typer.Option(help="Category the incidents were reported with")
    ] = None,
    occurred_from: Annotated[
        str | None, typer.Option(help=f"Valid time from, included ({TIME_HELP})")
    ] = None,
    occurred_to: Annotated[
        str | None, typer.Option(help=f"Valid time to, excluded ({TIME_HELP})")
    ] = None,
    recorded_from: Annotated[
        str | None, typer.Option(help=f"Transaction time from, included ({TIME_HELP})")
    ] = None,
    recorded_to: Annotated[
        str | None, typer.Option(help=f"Transaction time to, excluded ({TIME_HELP})")
    ] = None,
    export_format: Annotated[
        str, typer.Option("--format", help="csv or jsonl (JSON Lines)")
    ] = "csv",
    output: Annotated[
        Path | None,
        typer.Option(help="File to write; standard output when left out"),
    ] = None,
) -> None:
    """Export the tenant's events that match every filter given, oldest transaction first.

    The export streams from the database in batches, so its size is not limited by memory.
    It connects as the application role, which row-level security confines to the tenant.
    """
    # Imported here: api.cli imports this module to register the commands.
    from api.cli import _fail, _migrated, console

    if export_format not in EXPORT_FORMATS:
        raise _fail(f"invalid --format {export_format!r}: use csv or jsonl")
    file_format: ExportFormat = "csv" if export_format == "csv" else "jsonl"

    _, database = _migrated()
    # The application role rather than the worker role: the worker reads every tenant, so
    # a mistake in a filter could put another tenant's events in this file.
    with ConnectionPool(database.app_conninfo, min_size=1, max_size=1) as pool:
        try:
            config = require_tenant(PostgresEventStore(pool), tenant)
            zone = config.time_zone
            audit_filter = AuditFilter(
                actor=actor,
                role=role,
                event_types=tuple(event_type or ()),
                incident_id=_incident_id(incident),
                stream_id=stream,
                category=category,
                occurred_from=parse_time("--occurred-from", occurred_from, zone),
                occurred_to=parse_time("--occurred-to", occurred_to, zone),
                recorded_from=parse_time("--recorded-from", recorded_from, zone),
                recorded_to=parse_time("--recorded-to", recorded_to, zone),
            )
            with pool.connection() as conn:
                progress = ExportProgress()
                chunks = export_events(conn, tenant, audit_filter, file_format, progress=progress)
                try:
                    _write(chunks, output)
                finally:
                    chunks.close()
        except LedgerError as error:
            raise _fail(str(error)) from error
        except BrokenPipeError:
            # The reader of standard output went away (`| head`): stop quietly.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(code=1) from None
        except OSError as error:
            raise _fail(
                f"cannot write the export to {output}: {error}; pass --output with a writable path"
            ) from error
    where = str(output) if output else "standard output"
    console.print(f"exported {progress.events} events of tenant {tenant} to {where}")


def _incident_id(value: str | None) -> UUID | None:
    if value is None:
        return None
    try:
        return UUID(value)
    except ValueError:
        raise InvalidRequest(f"invalid --incident {value!r}: use an incident id (a UUID)") from None


def _write(chunks: Iterable[bytes], output: Path | None) -> None:
    """Write the chunks to `output`, or to standard output.

    A file is written under a temporary name and renamed at the end, so a failed export
    never leaves a file that looks complete.
    """
    if output is None:
        _copy(chunks, sys.stdout.buffer)
        return
    partial = output.with_name(output.name + ".partial")
    try:
        with partial.open("wb") as out:
            _copy(chunks, out)
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)


def _copy(chunks: Iterable[bytes], out: IO[bytes]) -> None:
    for chunk in chunks:
        out.write(chunk)
    out.flush()
