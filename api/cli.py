"""The `civicpulse` command line."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from uuid import UUID

import psycopg
import typer
from psycopg_pool import ConnectionPool
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TimeElapsedColumn
from rich.table import Table

from api.audit_cli import audit_app
from api.replay_cli import rebuild_command, replay_command, snapshot_app, what_if_command
from api.trends_cli import trends_app
from ledger.database import Database, resolve_database
from ledger.errors import LedgerError
from ledger.logs import configure_logging
from ledger.settings import Settings, get_settings
from ledger.store import PostgresEventStore

if TYPE_CHECKING:
    from projections.base import Projection

app = typer.Typer(help="CivicPulse: an append-only incident ledger.", no_args_is_help=True)
tenant_app = typer.Typer(help="Create and configure tenants.", no_args_is_help=True)
classify_app = typer.Typer(help="Measure the report classifiers.", no_args_is_help=True)
sla_app = typer.Typer(help="SLA figures.", no_args_is_help=True)
key_app = typer.Typer(help="Issue, list and revoke API keys.", no_args_is_help=True)
reporter_app = typer.Typer(help="Reporters' personal data.", no_args_is_help=True)
config_app = typer.Typer(help="Tenant configuration.", no_args_is_help=True)
projections_app = typer.Typer(help="Read-model projections.", no_args_is_help=True)
app.add_typer(tenant_app, name="tenant")
app.add_typer(key_app, name="key")
app.add_typer(sla_app, name="sla")
app.add_typer(reporter_app, name="reporter")
app.add_typer(audit_app, name="audit")
app.add_typer(trends_app, name="trends")
app.add_typer(classify_app, name="classify")
app.add_typer(config_app, name="config")
app.add_typer(projections_app, name="projections")
app.add_typer(snapshot_app, name="snapshot")
app.command("rebuild")(rebuild_command)
app.command("replay")(replay_command)
app.command("what-if")(what_if_command)

console = Console(stderr=True, soft_wrap=True)

HostOption = Annotated[
    str | None,
    typer.Option(help="Address to listen on (default: CIVICPULSE_API_HOST or 127.0.0.1)"),
]
PortOption = Annotated[
    int | None, typer.Option(help="Port to listen on (default: CIVICPULSE_API_PORT or 8000)")
]
WorkersOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        max=64,
        help="uvicorn worker processes, each with its own connection pool "
        "(default: CIVICPULSE_API_WORKERS or 1)",
    ),
]
logger = logging.getLogger("civicpulse")


def _setup() -> tuple[Settings, Database]:
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    return settings, resolve_database(settings)


def _migrated(*, force: bool = False) -> tuple[Settings, Database]:
    """Set up, and migrate the schema when asked to or on the embedded server.

    Otherwise check that the schema is current, and stop with a clear error if it is not:
    on a shared server, migrations are an owner's deliberate step.
    """
    from ledger.schema import check_schema, migrate

    settings, database = _setup()
    if force or database.embedded or settings.migrate_on_start:
        migrate(database, settings)
    else:
        with database.connect_any() as conn:
            check_schema(conn)
    return settings, database


def _store(database: Database) -> tuple[ConnectionPool[Any], PostgresEventStore]:
    pool: ConnectionPool[Any] = ConnectionPool(database.app_conninfo, min_size=1, max_size=4)
    return pool, PostgresEventStore(pool)


def _fail(message: str) -> typer.Exit:
    # Escaped, so that brackets in a message (a field path such as `[key]`) print as they are.
    console.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(code=2)


@app.command()
def migrate() -> None:
    """Create or upgrade the database schema."""
    _migrated(force=True)
    console.print("schema is up to date")


@tenant_app.command("create")
def tenant_create(
    tenant_id: Annotated[str, typer.Argument(help="Tenant id: lowercase letters, digits, -")],
    name: Annotated[str, typer.Option(help="Display name")] = "",
    time_zone: Annotated[str, typer.Option(help="IANA time zone for naive times")] = "UTC",
    resolution_hours: Annotated[
        float, typer.Option(min=0.01, help="Default resolution target, in hours")
    ] = 72,
    first_response_hours: Annotated[
        float, typer.Option(min=0.01, help="First-response target, in hours")
    ] = 24,
) -> None:
    """Create a tenant."""
    from ledger.tenants import create_tenant

    _, database = _migrated()
    pool, store = _store(database)
    with pool:
        try:
            config = create_tenant(
                store,
                tenant_id,
                name=name or tenant_id,
                time_zone=time_zone,
                occurred_at=datetime.now(UTC),
                resolution_hours=resolution_hours,
                first_response_hours=first_response_hours,
            )
        except LedgerError as error:
            raise _fail(str(error)) from error
    console.print(f"created tenant {config.tenant_id} ({config.time_zone})")


TenantOption = Annotated[str, typer.Option("--tenant", help="Tenant id")]


@tenant_app.command("categories")
def tenant_categories(
    tenant: TenantOption,
    file: Annotated[
        Path,
        typer.Option(
            exists=True,
            dir_okay=False,
            help='JSON file: {"categories": [{"name", "department", "keywords"}], '
            '"hazard_words": [...]}',
        ),
    ],
) -> None:
    """Replace the categories reports of a tenant are classified into."""
    from ledger.tenants import configure_categories

    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _fail(f"invalid JSON in {file}: {error}") from error
    _, database = _migrated()
    pool, store = _store(database)
    with pool:
        try:
            config = configure_categories(store, tenant, document, occurred_at=datetime.now(UTC))
        except LedgerError as error:
            raise _fail(str(error)) from error
    console.print(
        f"tenant {tenant} has {len(config.categories)} categories: "
        + ", ".join(config.category_names)
    )


@tenant_app.command("open311")
def tenant_open311(
    tenant: TenantOption,
    public_reads: Annotated[
        bool,
        typer.Option(
            "--public-reads/--no-public-reads",
            help="Serve the tenant's Open311 services and requests to callers without a key",
        ),
    ],
) -> None:
    """Publish or withdraw the tenant's Open311 service list and requests."""
    from ledger.tenants import configure_open311

    _, database = _migrated()
    pool, store = _store(database)
    with pool:
        try:
            configure_open311(
                store, tenant, public_reads=public_reads, occurred_at=datetime.now(UTC)
            )
        except LedgerError as error:
            raise _fail(str(error)) from error
    state = "public" if public_reads else "for API keys of the tenant only"
    console.print(f"Open311 reads of tenant {tenant} are {state}")


@config_app.command("apply")
def config_apply(
    file: Annotated[
        Path,
        typer.Argument(
            exists=True,
            dir_okay=False,
            help="YAML or JSON file of configuration sections (see docs/sla.md)",
        ),
    ],
    tenant: Annotated[
        str | None,
        typer.Option("--tenant", help="Tenant id (default: the file's `tenant` key)"),
    ] = None,
) -> None:
    """Apply a configuration file; each changed section becomes a new version."""
    from api.yaml_files import YamlFileInvalid, load_yaml_file
    from ledger.config_sections import apply_config

    try:
        document = load_yaml_file(file)
    except YamlFileInvalid as error:
        raise _fail(str(error)) from error
    if not isinstance(document, dict):
        raise _fail(f"{file} must contain an object of sections, such as `sla_policies:`")
    named = document.pop("tenant", None)
    tenant = tenant or named
    if not tenant:
        raise _fail(f"no tenant: pass --tenant or add `tenant: ID` to {file}")
    _, database = _migrated()
    pool, store = _store(database)
    with pool:
        try:
            result = apply_config(
                store,
                tenant,
                document,
                occurred_at=datetime.now(UTC),
                base_dir=file.resolve().parent,
            )
        except LedgerError as error:
            raise _fail(str(error)) from error
    if result.changed:
        console.print(
            f"tenant {tenant} configuration is now version {result.version}; changed: "
            + ", ".join(result.changed)
        )
        for warning in result.warnings:
            console.print(f"warning: {warning}", markup=False)
    else:
        console.print(f"tenant {tenant} configuration unchanged at version {result.version}")


@config_app.command("show")
def config_show(tenant: TenantOption) -> None:
    """Print the tenant's current configuration as JSON."""
    from ledger.config_sections import current_payloads
    from ledger.tenants import require_tenant

    _, database = _migrated()
    pool, store = _store(database)
    with pool:
        try:
            config = require_tenant(store, tenant)
        except LedgerError as error:
            raise _fail(str(error)) from error
    document = {"tenant": tenant, "version": config.version, **current_payloads(config)}
    print(json.dumps(document, indent=2, ensure_ascii=False))


@projections_app.command("status")
def projections_status() -> None:
    """Print each projection's checkpoint, lag in events and seconds, and last error."""
    from projections.runtime import projection_status

    _, database = _migrated()
    with database.connect_any() as conn:
        rows = projection_status(conn)
    table = Table(title="projections")
    for column in ("projection", "owner", "checkpoint", "events behind", "lag (s)", "last error"):
        table.add_column(column)
    for item in rows:
        error = "-"
        if item.last_error is not None and item.last_error_at is not None:
            error = f"{item.last_error_at.isoformat(timespec='seconds')}: {item.last_error}"
        table.add_row(
            item.name,
            item.owner or "none: no projector is running it",
            f"tx {item.checkpoint.tx_id}, position {item.checkpoint.position}",
            str(item.events_behind),
            f"{item.lag_seconds:.1f}",
            error,
        )
    Console().print(table)


EventIdOption = Annotated[
    UUID, typer.Option("--event-id", help="The event's id, as the projection's last error names it")
]
ProjectionOption = Annotated[str, typer.Option("--projection", help="Projection name")]
ReasonOption = Annotated[str, typer.Option(help="Why, recorded in the event")]


def _parking_store(database: Database) -> tuple[ConnectionPool[Any], PostgresEventStore]:
    # The worker role reads every tenant's events and writes the park marks.
    pool: ConnectionPool[Any] = ConnectionPool(database.worker_conninfo, min_size=1, max_size=1)
    return pool, PostgresEventStore(pool)


def _known_projection(name: str) -> Projection:
    from projections.runtime import projection_named

    try:
        return projection_named(name)
    except ValueError as error:
        raise _fail(str(error)) from None


@projections_app.command("park")
def projections_park(
    projection: ProjectionOption,
    tenant: TenantOption,
    event_id: EventIdOption,
    reason: ReasonOption,
    by: Annotated[str, typer.Option(help="Who parks it, recorded in the event")] = "cli",
) -> None:
    """Set an event aside for one projection, so that the projection goes on without it.

    Streaming, rebuilds and time travel of that projection all skip the event.
    """
    from ledger.parking import park_event

    if not _known_projection(projection).parkable:
        raise _fail(
            f"projection {projection!r} cannot be parked: it must hold every event; "
            "park the event for the projection that fails on it"
        )
    _, database = _migrated()
    pool, store = _parking_store(database)
    with pool, pool.connection() as conn:
        try:
            parked, new = park_event(
                conn,
                store,
                projection,
                tenant,
                event_id,
                reason=reason,
                parked_by=by,
                occurred_at=datetime.now(UTC),
            )
        except LedgerError as error:
            raise _fail(str(error)) from error
    state = "parked" if new else "already parked"
    console.print(
        f"{state}: event {parked.event_id} at position {parked.position} of tenant "
        f"{parked.tenant_id}, for projection {parked.projection}"
    )


@projections_app.command("unpark")
def projections_unpark(
    projection: ProjectionOption,
    tenant: TenantOption,
    event_id: EventIdOption,
    reason: ReasonOption,
    by: Annotated[str, typer.Option(help="Who unparks it, recorded in the event")] = "cli",
) -> None:
    """Stop skipping a parked event. Rebuild the projection to apply it."""
    from ledger.parking import unpark_event

    _known_projection(projection)
    _, database = _migrated()
    pool, store = _parking_store(database)
    with pool, pool.connection() as conn:
        try:
            removed = unpark_event(
                conn,
                store,
                projection,
                tenant,
                event_id,
                reason=reason,
                unparked_by=by,
                occurred_at=datetime.now(UTC),
            )
        except LedgerError as error:
            raise _fail(str(error)) from error
    if not removed:
        raise _fail(
            f"event {event_id} of tenant {tenant!r} is not parked for projection "
            f"{projection!r}; `civicpulse projections parked` lists the parked events"
        )
    console.print(f"unparked event {event_id}; run `civicpulse rebuild {projection}` to apply it")


@projections_app.command("parked")
def projections_parked(
    projection: Annotated[
        str | None, typer.Option("--projection", help="Only this projection")
    ] = None,
) -> None:
    """List the events set aside, per projection."""
    from ledger.parking import list_parked

    if projection is not None:
        _known_projection(projection)
    _, database = _migrated()
    with database.connect_worker() as conn:
        rows = list_parked(conn, projection)
    if not rows:
        console.print("no event is parked" + (f" for {projection}" if projection else ""))
        return
    table = Table(title="parked events")
    for column in ("projection", "position", "tenant", "event id", "parked", "by", "reason"):
        table.add_column(column)
    for item in rows:
        table.add_row(
            item.projection,
            str(item.position),
            item.tenant_id,
            str(item.event_id),
            item.parked_at.isoformat(timespec="seconds"),
            item.parked_by,
            item.reason,
        )
    Console().print(table)


@key_app.command("issue")
def key_issue(
    tenant: TenantOption,
    role: Annotated[str, typer.Option(help="reporter, staff, officer or admin")],
    name: Annotated[str, typer.Option(help="Who holds the key, for the audit trail")],
    expires_in_days: Annotated[
        float | None, typer.Option(min=0.001, help="Days until the key stops working")
    ] = None,
) -> None:
    """Issue an API key and print it. It is shown this once; only its hash is stored."""
    from datetime import timedelta

    from ledger.keys import issue_key, parse_role

    _, database = _migrated()
    pool, store = _store(database)
    now = datetime.now(UTC)
    expires_at = now + timedelta(days=expires_in_days) if expires_in_days else None
    with pool:
        key, token = issue_key(
            store,
            tenant,
            role=parse_role(role),
            name=name,
            expires_at=expires_at,
            issued_by="cli",
            now=now,
        )
    console.print(
        f"issued {key.role.value} key {key.key_id} for {key.name!r}"
        + (f", expires {expires_at.isoformat()}" if expires_at else "")
        + "; it is shown only now:"
    )
    # The token alone on stdout, so that scripts can capture it.
    print(token)


@key_app.command("list")
def key_list(tenant: TenantOption) -> None:
    """List a tenant's keys without their secrets."""
    from ledger.keys import list_keys
    from ledger.tenants import require_tenant

    _, database = _migrated()
    pool, store = _store(database)
    with pool:
        require_tenant(store, tenant)
        keys = list_keys(store, tenant)
    table = Table("key id", "role", "name", "created", "expires", "revoked")
    for key in keys:
        table.add_row(
            str(key.key_id),
            key.role.value,
            key.name,
            key.created_at.isoformat(timespec="seconds"),
            key.expires_at.isoformat(timespec="seconds") if key.expires_at else "",
            key.revoked_at.isoformat(timespec="seconds") if key.revoked_at else "",
        )
    # Full ids even when the output goes to a pipe, where rich would assume 80 columns.
    Console(width=None if sys.stdout.isatty() else 160).print(table)


@key_app.command("revoke")
def key_revoke(
    tenant: TenantOption,
    key_id: Annotated[str, typer.Argument(help="Key id, as `key list` shows it")],
    reason: Annotated[str | None, typer.Option(help="Why, for the audit trail")] = None,
) -> None:
    """Revoke a key at once."""
    from uuid import UUID

    from ledger.keys import revoke_key

    try:
        parsed = UUID(key_id)
    except ValueError:
        raise _fail(f"invalid key id {key_id!r}: use the id `civicpulse key list` shows") from None
    _, database = _migrated()
    pool, store = _store(database)
    with pool:
        key = revoke_key(store, tenant, parsed, revoked_by="cli", reason=reason)
    assert key.revoked_at is not None
    console.print(f"key {key.key_id} revoked at {key.revoked_at.isoformat(timespec='seconds')}")


@reporter_app.command("erase")
def reporter_erase(
    tenant_id: TenantOption,
    reporter_id: Annotated[
        str, typer.Argument(help="Reporter id, from the contact object of the reporter's reports")
    ],
    reason: Annotated[
        str,
        typer.Option(
            help="Why the reporter is erased, such as an erasure request's reference; it is "
            "stored in an event for good, so write no personal data in it"
        ),
    ],
    actor: Annotated[str, typer.Option(help="Who erases, recorded in the event")] = "cli",
) -> None:
    """Erase a reporter by destroying the key that decrypts their name, e-mail and phone.

    Events stay unchanged, and a ReporterErased event records the erasure.
    """
    from ledger.commands import Actor
    from ledger.personal import erase_reporter
    from ledger.tenants import require_tenant

    try:
        reporter = UUID(reporter_id)
    except ValueError as error:
        raise _fail(
            f"invalid reporter id {reporter_id!r}: expected a UUID such as "
            "0b5c1f4e-2d7a-4c61-9a8e-3f6b2d1c0e9a"
        ) from error
    _, database = _migrated()
    pool, store = _store(database)
    with pool:
        try:
            require_tenant(store, tenant_id)
            erasure = erase_reporter(
                store,
                tenant_id,
                reporter,
                reason=reason,
                actor=Actor(name=actor, role="admin", channel="cli"),
            )
        except LedgerError as error:
            raise _fail(str(error)) from error
    if erasure.already_erased:
        console.print(
            f"reporter {reporter} of tenant {tenant_id} was already erased at "
            f"{erasure.erased_at.isoformat()} (reason: {erasure.reason}); nothing changed"
        )
        return
    console.print(
        f"erased reporter {reporter} of tenant {tenant_id}: destroyed the encryption key and "
        f"the e-mail and phone lookups; ReporterErased recorded at position {erasure.position}"
    )


@app.command("import")
def import_command(
    arguments: Annotated[
        list[str],
        typer.Argument(
            help="The export (.csv, .tsv or .json, optionally .gz), optionally after a format "
            "name: 'import boston FILE' is 'import FILE --format boston'",
            metavar="[FORMAT] FILE",
            show_default=False,
        ),
    ],
    tenant: Annotated[
        str | None,
        typer.Option(help="Tenant to import into (default with a FORMAT word: that word)"),
    ] = None,
    file_format: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="boston, nyc, la or open311 (default: detected from the header)",
        ),
    ] = None,
    time_zone: Annotated[
        str | None,
        typer.Option(
            help="Time zone of the file's naive times (default: the tenant's zone, or the "
            "city's zone for a new tenant, UTC for open311); must match an existing "
            "tenant's zone"
        ),
    ] = None,
    workers: Annotated[
        int, typer.Option(min=0, help="Parser processes (0: one per CPU, at most 3)")
    ] = 0,
    rejects: Annotated[
        Path | None,
        typer.Option(
            help="CSV file for rejected rows (default: FILE.rejects.csv beside the file, or "
            "in the current directory when that directory is read-only); written only when "
            "rows are rejected"
        ),
    ] = None,
    project: Annotated[bool, typer.Option(help="Bring the read models up to date after")] = True,
) -> None:
    """Import a city 311 export: Boston, NYC, Los Angeles or Open311 GeoReport v2.

    The tenant is created when it does not exist.
    """
    from ledger.imports.formats import DEFAULT_TIME_ZONES, FORMATS
    from ledger.imports.pipeline import ImportFileError, import_file, read_layout
    from ledger.tenants import create_tenant, load_tenant

    if len(arguments) == 2 and arguments[0] in FORMATS:
        alias, path = arguments[0], Path(arguments[1])
        if file_format is not None and file_format != alias:
            raise _fail(f"the format is named twice, as {alias} and --format {file_format}")
        file_format, tenant = alias, tenant or alias
    elif len(arguments) == 1:
        path = Path(arguments[0])
    else:
        raise _fail(
            "expected FILE or FORMAT FILE, with FORMAT one of "
            f"{', '.join(FORMATS)}; got {' '.join(arguments)}"
        )
    if tenant is None:
        raise _fail("missing --tenant: name the tenant to import into")
    if not path.is_file():
        raise _fail(f"{path} not found: pass the path of a .csv, .tsv or .json export")
    try:
        layout = read_layout(path, file_format)  # before anything is created
    except ImportFileError as error:
        raise _fail(str(error)) from error
    rejects_path = rejects or _default_rejects_path(path)
    settings, database = _migrated()
    pool, store = _store(database)
    with pool:
        config = load_tenant(store, tenant)
        if config is None:
            try:
                config = create_tenant(
                    store,
                    tenant,
                    name=tenant,
                    time_zone=time_zone or DEFAULT_TIME_ZONES[layout.format.name],
                    occurred_at=datetime.now(UTC),
                )
            except LedgerError as error:
                raise _fail(str(error)) from error
        elif time_zone is not None and time_zone != config.time_zone:
            raise _fail(
                f"tenant {tenant} reads naive times in {config.time_zone}, not {time_zone}; "
                "drop --time-zone, or import into a tenant created with that zone"
            )
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(f"importing {path.name} ({layout.format.label})", total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        with database.connect_owner() as conn:
            try:
                report = import_file(
                    conn,
                    path,
                    tenant_id=tenant,
                    time_zone=config.time_zone,
                    format_name=layout.format.name,
                    workers=workers or None,
                    progress=advance,
                    rejects_path=rejects_path,
                )
            except ImportFileError as error:
                raise _fail(str(error)) from error
    console.print(
        f"format: {report.format}, rows read: {report.rows}, cases: {report.cases}, "
        f"events appended: {report.events_appended}, already present: "
        f"{report.events_already_present}, superseded rows: {report.versions_superseded}, "
        f"rejected: {report.rejected_count}"
    )
    if report.rejected_count:
        console.print(f"rejected rows are listed in {rejects_path}")
    if project:
        _catch_up(database, settings)


def _default_rejects_path(path: Path) -> Path:
    """Return FILE.rejects.csv beside the file, or in the current directory when the
    file's directory is not writable (a read-only data share, say)."""
    beside = path.with_name(path.name + ".rejects.csv")
    if os.access(path.parent, os.W_OK):
        return beside
    return Path.cwd() / beside.name


def _catch_up(database: Database, settings: Settings) -> None:
    from projections.runtime import catch_up, default_projections

    applied, skipped = catch_up(database, default_projections(), settings.projector_batch_size)
    if len(skipped) < len(default_projections()):
        console.print(f"read models updated with {applied} events")
    if skipped:
        console.print(
            f"a running projector is applying the events to {', '.join(skipped)}; "
            "GET /status shows its progress"
        )


@sla_app.command("summary")
def sla_summary_command(
    tenant: Annotated[str, typer.Option(help="Tenant id")],
    as_of: Annotated[
        str | None,
        typer.Option(help="ISO 8601 valid time; naive times use the tenant's zone (default: now)"),
    ] = None,
    by: Annotated[str, typer.Option(help="category or department")] = "department",
) -> None:
    """Print on-time rates as of a moment."""
    from api.app import parse_as_of
    from ledger.tenants import require_tenant
    from projections.runtime import projection_progress
    from projections.sla_queries import GROUPINGS, consistent_snapshot, sla_summary

    if by not in GROUPINGS:
        raise _fail(f"invalid --by {by!r}: use category or department")
    _, database = _migrated()
    pool, store = _store(database)
    with pool:
        try:
            config = require_tenant(store, tenant)
            moment = parse_as_of(as_of, config.time_zone)
        except LedgerError as error:
            raise _fail(str(error)) from error
        with pool.connection() as conn, consistent_snapshot(conn):
            summary = sla_summary(conn, tenant, moment)[by]
            progress = projection_progress(conn).get("sla")
        if progress is None or not progress.caught_up:
            console.print(
                "[yellow]warning:[/yellow] the SLA read model has not applied every event "
                "yet, so these figures are partial; run `civicpulse project --once` or wait "
                "for the running projector"
            )
    table = Table(title=f"{tenant} as of {moment.isoformat()}")
    for column in (by, "total", "open", "breached", "on time"):
        table.add_column(column, justify="left" if column == by else "right")
    for key, counts in sorted(summary.items(), key=lambda item: -item[1].total):
        rate = f"{counts.on_time_rate:.1%}" if counts.on_time_rate is not None else "-"
        table.add_row(
            key or "(none)", str(counts.total), str(counts.open), str(counts.breached), rate
        )
    Console().print(table)


ClassifyOption = Annotated[
    bool | None,
    typer.Option(
        "--classify/--no-classify",
        help="Run the classifier pool in this process (default: CIVICPULSE_CLASSIFIER_ENABLED)",
    ),
]


@classify_app.command("evaluate")
def classify_evaluate(
    boston: Annotated[
        Path,
        typer.Option(exists=True, dir_okay=False, help="Boston 311 export (.csv.gz)"),
    ],
    limit: Annotated[
        int | None, typer.Option(min=1, help="Evaluate only the first N held-out cases")
    ] = None,
) -> None:
    """Evaluate the rule-based classifier on a Boston 311 export.

    Categories are the REASON values; their keywords are the TYPE values of cases whose
    CASE_TITLE equals TYPE. The cases whose CASE_TITLE differs are classified by their title
    and scored against their REASON.
    """
    from ledger.classification.evaluation import (
        boston_labelled_set,
        evaluate_rules,
        majority_baseline,
    )

    labelled = boston_labelled_set(boston, limit)
    if not labelled.cases:
        raise _fail(f"no case in {boston} has a CASE_TITLE that differs from its TYPE")
    result = evaluate_rules(labelled)
    baseline = majority_baseline([label for _, label in labelled.cases])

    table = Table("category", "cases", "precision", "recall", "F1")
    for item in result.per_category:
        table.add_row(
            item.category,
            str(item.support),
            f"{item.precision:.3f}",
            f"{item.recall:.3f}",
            f"{item.f1:.3f}",
        )
    out = Console()
    out.print(table)
    out.print(
        f"rules: {result.cases} cases, {len(labelled.categories)} categories, "
        f"accuracy {result.accuracy:.3f}, macro-F1 {result.macro_f1:.3f}, "
        f"no category named for {result.unmatched} cases"
    )
    out.print(
        f"majority-class baseline: accuracy {baseline.accuracy:.3f}, "
        f"macro-F1 {baseline.macro_f1:.3f}"
    )


@app.command()
def project(
    once: Annotated[bool, typer.Option(help="Catch up and exit instead of running")] = False,
    classify: ClassifyOption = None,
) -> None:
    """Run the projector: one worker thread per read model, and the classifier pool."""
    from projections.runtime import Projector

    settings, database = _migrated()
    if once:
        _catch_up(database, settings)
        return
    serve_metrics(settings)
    projector = Projector(
        database,
        batch_size=settings.projector_batch_size,
        poll_seconds=settings.projector_poll_seconds,
    )
    _stop_on_signals(projector.stop_event)
    with _classifier(settings, database, classify):
        projector.run_forever()


@contextmanager
def _classifier(settings: Settings, database: Database, enabled: bool | None) -> Iterator[None]:
    """Run the classifier pool, as the worker role, while the block runs."""
    from ledger.classification.runtime import build_pool

    if not (settings.classifier_enabled if enabled is None else enabled):
        yield
        return
    pool: ConnectionPool[Any] = ConnectionPool(
        database.worker_conninfo, min_size=1, max_size=settings.classifier_concurrency + 1
    )
    with pool:
        classifier_pool = build_pool(settings, database, PostgresEventStore(pool))
        classifier_pool.start()
        try:
            yield
        finally:
            classifier_pool.stop()


def serve_metrics(settings: Settings) -> None:
    """Serve Prometheus metrics on CIVICPULSE_METRICS_PORT, for processes without the API."""
    if not settings.metrics_port:
        return
    from prometheus_client import start_http_server

    start_http_server(settings.metrics_port, addr=settings.metrics_host)
    logger.info("serving metrics on %s:%d", settings.metrics_host, settings.metrics_port)


EveryTenantOption = Annotated[
    str | None, typer.Option("--tenant", help="Tenant id (default: every tenant)")
]


@app.command("verify")
def verify_command(tenant: EveryTenantOption = None) -> None:
    """Recompute every stream's hash chain and every seal; exit 1 on a mismatch."""
    from ledger.verification import verify

    _, database = _migrated()
    started = time.monotonic()
    result = verify(database, tenant)
    seconds = time.monotonic() - started
    if not result.ok:
        typer.echo(f"MISMATCH: {result.mismatches[0]}")
        others = len(result.mismatches) - 1
        if others:
            stopped = " (checking stopped there)" if result.truncated else ""
            typer.echo(f"{others} more mismatches found{stopped}")
        raise typer.Exit(code=1)
    for checked in result.tenants:
        latest = checked.latest_seal
        seal_text = (
            f"latest root {latest.merkle_root.hex()} (seal {latest.stream_version})"
            if latest is not None
            else "not sealed yet"
        )
        typer.echo(
            f"tenant {checked.tenant_id}: events {checked.events}, streams "
            f"{checked.streams}, seals {checked.seals} covering {checked.sealed_events} "
            f"events, events after the last seal {checked.unsealed_events}; {seal_text}"
        )
    typer.echo(
        f"OK: verified tenants {len(result.tenants)}, events {result.events}, streams "
        f"{result.streams}, seals {result.seals} in {seconds:.1f} s"
    )


@app.command("seal")
def seal_command(tenant: EveryTenantOption = None) -> None:
    """Seal each tenant's events appended since its last seal, now."""
    from ledger.seals import seal_all

    _, database = _migrated()
    report = seal_all(database, tenant_id=tenant, actor="cli")
    for seal in report.sealed:
        typer.echo(
            f"sealed tenant {seal.tenant_id}: {seal.event_count} events through position "
            f"{seal.through.position} (seal {seal.stream_version}), root "
            f"{seal.merkle_root.hex()}"
        )
    for unchanged in report.unchanged:
        typer.echo(f"tenant {unchanged}: no new events to seal")
    for failed, message in report.failed.items():
        console.print(f"[red]error:[/red] sealing tenant {failed} failed: {escape(message)}")
    if report.failed:
        raise typer.Exit(code=1)


@app.command()
def schedule() -> None:
    """Run the scheduled jobs (seals every CIVICPULSE_SEAL_INTERVAL_SECONDS).

    Only one scheduler process runs jobs at a time; others wait on standby and take over
    within seconds when it stops or dies.
    """
    from ledger.scheduler import Scheduler, default_jobs

    settings, database = _migrated()
    serve_metrics(settings)
    scheduler = Scheduler(
        database,
        default_jobs(
            database,
            seal_interval_seconds=settings.seal_interval_seconds,
            escalation_interval_seconds=settings.escalation_interval_seconds,
            snapshot_interval_seconds=settings.snapshot_interval_seconds,
        ),
    )
    _stop_on_signals(scheduler.stop_event)
    scheduler.run_forever()


def _stop_on_signals(stop: threading.Event, server: Any = None) -> None:
    """Stop on SIGTERM or SIGINT: set `stop`, and tell a uvicorn `server` to exit.

    uvicorn installs handlers of its own only once it serves. A signal that arrives while
    the process is still starting reaches this handler, so it must stop the server too.
    """

    def handle(signum: int, _: Any) -> None:
        logger.info("received signal %d, stopping", signum)
        stop.set()
        if server is not None:
            server.should_exit = True

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def _api_server(app: Any, host: str, port: int) -> Any:
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_config=None))


@app.command()
def serve(
    host: HostOption = None,
    port: PortOption = None,
    workers: WorkersOption = None,
) -> None:
    """Run the HTTP API, in one process or in several uvicorn worker processes."""

    from api.app import create_app
    from api.server import keep_startup_objects

    settings, database = _migrated()
    processes = workers or settings.api_workers
    if processes > 1:
        _serve_workers(database, host or settings.api_host, port or settings.api_port, processes)
        return
    server = _api_server(
        create_app(
            database,
            max_lag=settings.ready_max_lag_events,
            group_commit=settings.group_commit,
            group_commit_workers=settings.group_commit_workers,
            pool_size=settings.api_pool_size,
        ),
        host or settings.api_host,
        port or settings.api_port,
    )
    # uvicorn raises the signal that stopped it again once it is done. Without a handler of
    # our own, that would end the process with the signal instead of a normal exit.
    _stop_on_signals(threading.Event(), server)
    keep_startup_objects()
    server.run()


def _serve_workers(database: Database, host: str, port: int, processes: int) -> None:
    """Run the API in `processes` uvicorn worker processes that share one listening socket.

    uvicorn's supervisor starts the workers, restarts one that dies and stops them all on
    SIGTERM or SIGINT. Each worker builds its app from the environment (api.server). The API
    starts no background jobs, so nothing runs twice: the scheduler and the classifier run
    in `civicpulse schedule` and `civicpulse project`.
    """
    import uvicorn

    # Each worker writes its metrics to files in one directory, and GET /metrics sums them
    # (prometheus_client's multiprocess mode), so any worker can serve a scrape. The
    # workers are new processes, so they read the variable before their first metric.
    own_directory = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if own_directory:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="civicpulse-metrics-")
    if database.embedded:
        # The workers use the server this process started. Each would otherwise start
        # the embedded server itself, and stop it again when it exits.
        os.environ["DATABASE_URL"] = database.owner_conninfo
    logger.info("starting %d API worker processes on %s:%d", processes, host, port)
    try:
        uvicorn.run(
            "api.server:create_worker_app",
            factory=True,
            host=host,
            port=port,
            workers=processes,
            log_config=None,
        )
    finally:
        if own_directory:
            shutil.rmtree(os.environ.pop("PROMETHEUS_MULTIPROC_DIR"), ignore_errors=True)


@app.command()
def run(
    demo: Annotated[bool, typer.Option(help="Create and fill the demo tenant if missing")] = True,
    host: HostOption = None,
    port: PortOption = None,
    classify: ClassifyOption = None,
) -> None:
    """Run the API, the projector and the scheduler in one process, on the embedded
    database by default."""

    from api.app import create_app
    from api.server import keep_startup_objects
    from ledger.demo import DEMO_KEY_FILE, ensure_demo_key, seed_demo
    from ledger.scheduler import Scheduler, default_jobs
    from projections.runtime import Projector

    settings, database = _migrated()
    if demo:
        pool, store = _store(database)
        with pool:
            appended = seed_demo(store)
            key_file = settings.data_dir.expanduser().resolve().parent / DEMO_KEY_FILE
            ensure_demo_key(store, key_file)
        if appended:
            console.print(f"demo tenant 'demo' seeded with {appended} events")
        console.print(f"a staff key of the demo tenant is in {key_file}")
    projector = Projector(
        database,
        batch_size=settings.projector_batch_size,
        poll_seconds=settings.projector_poll_seconds,
    )
    server = _api_server(
        create_app(
            database,
            max_lag=settings.ready_max_lag_events,
            group_commit=settings.group_commit,
            group_commit_workers=settings.group_commit_workers,
            pool_size=settings.api_pool_size,
        ),
        host or settings.api_host,
        port or settings.api_port,
    )
    # uvicorn handles SIGTERM and SIGINT itself while it runs, then restores these handlers
    # and raises the signal again: ours stop the projector, so the process exits normally.
    _stop_on_signals(projector.stop_event, server)
    scheduler = Scheduler(
        database,
        default_jobs(
            database,
            seal_interval_seconds=settings.seal_interval_seconds,
            escalation_interval_seconds=settings.escalation_interval_seconds,
            snapshot_interval_seconds=settings.snapshot_interval_seconds,
        ),
    )
    scheduler_thread = threading.Thread(target=scheduler.run_forever, name="scheduler", daemon=True)
    keep_startup_objects()
    projector.start()
    scheduler_thread.start()
    try:
        with _classifier(settings, database, classify):
            server.run()
    finally:
        scheduler.stop()
        projector.stop()
        scheduler_thread.join(10)


def main() -> None:
    # pgserver's platformdirs warns on every start where XDG_RUNTIME_DIR is unset, which is
    # every server and container; it has no bearing on CivicPulse.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    try:
        app()
    except LedgerError as error:
        console.print(f"[red]error:[/red] {error}")
        sys.exit(2)
    except psycopg.OperationalError as error:
        # Unreachable server, unknown role, wrong password: one line, not a traceback.
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
        console.print(f"[red]error:[/red] cannot connect to the database: {reason}")
        sys.exit(2)


if __name__ == "__main__":
    main()
