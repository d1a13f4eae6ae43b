"""Rebuilds: fold the log into shadow tables on a process pool, catch up, swap the rows in.

A rebuild of one projection runs in four steps:

1. Take the horizon: the last event below the transaction horizon. No event at or before it
   can appear later, so the fold below it is final.
2. Fold partitions of the log below the horizon in worker processes (one partition per
   tenant, or per tenant and stream hash bucket for stream-keyed models) into UNLOGGED
   shadow tables in the `replay_shadow` schema, which the application role cannot read.
   Each worker bulk-writes its states with COPY.
3. Catch the shadow tables up with the events appended since, batch by batch.
4. Swap in one transaction that takes the projection's apply lock, so no streaming batch
   runs meanwhile. It applies the last few events, replaces the live rows with the shadow
   rows and sets the checkpoint. DELETE and INSERT replace the rows, so readers see the old
   rows until the commit and are never blocked.

`rebuild_many` rebuilds several projections at once. Their partitions share one process
pool, largest first, and each projection goes through steps 3 and 4 as soon as its last
partition is folded, while the pool folds the others' partitions.

Nothing touches the live tables or the checkpoint before step 4's commit, so a rebuild that
fails or is interrupted (a worker killed, an exception, SIGINT) leaves them as they were,
except those of projections already swapped in by `rebuild_many`. Its shadow tables are
dropped on the way out, and by the next rebuild of the same projection if the coordinating
process itself was killed.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from ledger.database import Database
from ledger.errors import LedgerError
from ledger.events import RecordedEvent
from ledger.parking import parked_positions, tenant_parked_positions, without_parked
from ledger.processes import worker_context
from ledger.store import EVENT_COLUMNS, Checkpoint, row_to_event
from projections.base import Projection
from projections.runtime import collect_less_often, load_checkpoint, lock_for_apply

logger = logging.getLogger(__name__)

SHADOW_SCHEMA = "replay_shadow"
# First key of the session lock that lets one rebuild of a projection run at a time.
REBUILD_LOCK_CLASS = 0x4353  # "CS"
# A tenant with at least twice this many events is split by stream hash, for stream-keyed
# models, into as many buckets as there are workers.
MIN_PARTITION_EVENTS = 20_000
CATCH_UP_BATCH = 5_000
INCIDENT_STREAMS = "incident-%"

ProgressCallback = Callable[["RebuildProgress"], None]
SwapCallback = Callable[["RebuildReport"], None]


class RebuildFailed(LedgerError):
    """A rebuild stopped; the live model and its checkpoint are unchanged."""


@dataclass(frozen=True, slots=True)
class Partition:
    """A slice of one tenant's log below the horizon that one worker folds.

    With `buckets` > 1 it contains the incident streams whose hash falls in `bucket`, and
    every other stream of the tenant (its configuration), which each bucket needs.
    """

    tenant_id: str
    bucket: int
    buckets: int
    events: int


@dataclass(frozen=True, slots=True)
class RebuildProgress:
    projection: str
    partitions_done: int
    partitions: int
    events_folded: int
    events_total: int


@dataclass(frozen=True, slots=True)
class RebuildReport:
    """Figures of a finished rebuild. `swap_seconds` is how long the apply lock was held, so
    how long streaming batches of this projection waited. Readers did not wait.
    `worker_cpu_seconds` is the CPU time the worker processes spent on its partitions, without
    that of their database sessions: on an idle machine it bounds the fold's wall time on N
    workers from below by about `worker_cpu_seconds / N`."""

    projection: str
    tenant_id: str | None
    horizon: Checkpoint
    checkpoint: Checkpoint
    partitions: int
    workers: int
    events_folded: int
    events_caught_up: int
    rows: int
    fold_seconds: float
    swap_seconds: float
    total_seconds: float
    worker_cpu_seconds: float


def rebuild(
    database: Database,
    projection: Projection,
    *,
    tenant_id: str | None = None,
    workers: int = 1,
    progress: ProgressCallback | None = None,
    min_partition_events: int = MIN_PARTITION_EVENTS,
) -> RebuildReport:
    """Rebuild `projection` (one tenant's rows only with `tenant_id`) and swap it in.

    Raises RebuildFailed when another rebuild of the projection is running or a partition
    fails. Any exception, KeyboardInterrupt included, leaves the live model unchanged.
    """
    return rebuild_many(
        database,
        [projection],
        tenant_id=tenant_id,
        workers=workers,
        progress=progress,
        min_partition_events=min_partition_events,
    )[0]


def rebuild_many(
    database: Database,
    projections: Sequence[Projection],
    *,
    tenant_id: str | None = None,
    workers: int = 1,
    progress: ProgressCallback | None = None,
    swapped: SwapCallback | None = None,
    min_partition_events: int = MIN_PARTITION_EVENTS,
) -> list[RebuildReport]:
    """Rebuild several projections on one process pool; return their reports in order.

    The partitions of every projection share one queue, largest first, so a projection that
    folds each tenant in one partition (grouping) folds beside the others' partitions rather
    than after them. Each projection is caught up and swapped in, in a transaction of its
    own, as soon as its last partition is folded, while the pool folds the rest. `swapped`
    is called with each report right after its swap commits.

    Raises RebuildFailed when another rebuild of one of the projections is running or a
    partition fails. On any exception, KeyboardInterrupt included, the projections not yet
    swapped in keep their live model and checkpoint. Those already swapped in keep their
    rebuilt rows, which are complete.
    """
    if workers < 1:
        raise ValueError(f"workers = {workers}: a rebuild needs at least one worker process")
    names = [projection.name for projection in projections]
    if not names:
        raise ValueError("no projection to rebuild: name at least one")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"projection {', '.join(repeated)} is named twice; name each once")
    started = time.monotonic()
    rebuild_id = f"{os.getpid()}x{secrets.token_hex(3)}"
    jobs = [
        _Job(
            projection,
            {table: f"{projection.name}__{table}__{rebuild_id}" for table in projection.tables},
        )
        for projection in projections
    ]
    app_name = f"civicpulse-rebuild-{rebuild_id}"
    with database.connect_worker(autocommit=True, application_name=app_name) as admin:
        locked: list[str] = []
        try:
            # Sorted, so two rebuilds that share projections take their locks in one order.
            for name in sorted(names):
                row = admin.execute(
                    "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (REBUILD_LOCK_CLASS, name)
                ).fetchone()
                if not (row and row[0]):
                    raise RebuildFailed(
                        f"another rebuild of projection {name} is running; wait for it to finish"
                    )
                locked.append(name)
            for name in names:
                _drop_shadows(admin, name, None)
            try:
                return _rebuild_jobs(
                    database,
                    admin,
                    jobs,
                    rebuild_id=rebuild_id,
                    tenant_id=tenant_id,
                    workers=workers,
                    progress=progress,
                    swapped=swapped,
                    min_partition_events=min_partition_events,
                    started=started,
                )
            except BaseException as error:
                unchanged = [job.projection.name for job in jobs if not job.swapped]
                logger.error(
                    "rebuild %s of projections %s (tenant %s) failed: %r; the live models of "
                    "%s are unchanged",
                    rebuild_id,
                    ", ".join(names),
                    tenant_id or "all",
                    error,
                    ", ".join(unchanged) or "none",
                )
                raise
            finally:
                _terminate_workers(admin, rebuild_id)
                for name in names:
                    _drop_shadows(admin, name, rebuild_id)
        finally:
            for name in locked:
                admin.execute(
                    "SELECT pg_advisory_unlock(%s, hashtext(%s))", (REBUILD_LOCK_CLASS, name)
                )


@dataclass(slots=True)
class _Job:
    """One projection of a rebuild: its shadow tables (live name -> shadow name), partitions
    and folding progress."""

    projection: Projection
    shadow: dict[str, str]
    partitions: list[Partition] = field(default_factory=list)
    partitions_done: int = 0
    events_folded: int = 0
    worker_cpu_seconds: float = 0.0
    fold_seconds: float = 0.0
    swapped: bool = False


def _rebuild_jobs(
    database: Database,
    admin: psycopg.Connection[Any],
    jobs: list[_Job],
    *,
    rebuild_id: str,
    tenant_id: str | None,
    workers: int,
    progress: ProgressCallback | None,
    swapped: SwapCallback | None,
    min_partition_events: int,
    started: float,
) -> list[RebuildReport]:
    horizon = last_event_below_horizon(admin)
    counts = count_events(admin, horizon, tenant_id)
    if tenant_id is not None and not counts:
        raise RebuildFailed(
            f"tenant {tenant_id!r} has no events below the horizon; check the tenant id"
        )
    for job in jobs:
        job.partitions = split_partitions(
            counts,
            buckets=workers if job.projection.stream_keyed else 1,
            min_partition_events=min_partition_events,
        )
        for live, table in job.shadow.items():
            admin.execute(
                sql.SQL("CREATE UNLOGGED TABLE {} (LIKE {} INCLUDING DEFAULTS)").format(
                    sql.Identifier(SHADOW_SCHEMA, table), sql.Identifier(live)
                )
            )
        logger.info(
            "rebuild %s of projection %s: %d partitions below position %d on %d workers",
            rebuild_id,
            job.projection.name,
            len(job.partitions),
            horizon.position,
            workers,
        )

    reports: dict[str, RebuildReport] = {}

    def finish(job: _Job) -> None:
        job.fold_seconds = time.monotonic() - started
        report = _swap_in(database, admin, job, horizon, tenant_id, rebuild_id, workers, started)
        job.swapped = True
        reports[job.projection.name] = report
        if swapped is not None:
            swapped(report)

    _fold_partitions(database, jobs, horizon, rebuild_id, workers, progress, finish)
    return [reports[job.projection.name] for job in jobs]


def _swap_in(
    database: Database,
    admin: psycopg.Connection[Any],
    job: _Job,
    horizon: Checkpoint,
    tenant_id: str | None,
    rebuild_id: str,
    workers: int,
    started: float,
) -> RebuildReport:
    """Catch a folded projection's shadow tables up with the log and swap them in."""
    projection = job.projection
    # Keys come after the bulk load, which is faster without them; the catch-up upserts
    # need them.
    for live, table in job.shadow.items():
        _copy_keys(admin, live, table)
    shadow_projection = projection.retarget(SHADOW_SCHEMA, job.shadow)
    with database.connect_worker(application_name=f"civicpulse-rebuild-{rebuild_id}") as conn:
        # Catch up to the end of the log as it is now, not to a moving horizon, because
        # writers that append faster than the shadow applies would keep the rebuild from
        # ever reaching it. Events that arrive meanwhile are applied under the lock below.
        tail = last_event_below_horizon(conn)
        position, caught_up = _catch_up_shadow(conn, shadow_projection, horizon, tenant_id, tail)
        swap_started = time.monotonic()
        with conn.transaction():
            lock_for_apply(conn, projection.name)
            target = last_event_below_horizon(conn)
            if tenant_id is not None:
                # The other tenants' rows stay, so the live model must stand where the
                # rebuilt rows will: at `target`.
                _apply_range(conn, projection, load_checkpoint(conn, projection.name), target)
            position, more = _catch_up_shadow(conn, shadow_projection, position, tenant_id, target)
            caught_up += more
            _replace_rows(conn, job.shadow, tenant_id)
            _set_checkpoint(conn, projection.name, target)
        swap_seconds = time.monotonic() - swap_started
        # Counted after the commit, so that streaming batches do not wait for the scans.
        rows = _shadow_rows(conn, job.shadow)
    report = RebuildReport(
        projection=projection.name,
        tenant_id=tenant_id,
        horizon=horizon,
        checkpoint=target,
        partitions=len(job.partitions),
        workers=workers,
        events_folded=job.events_folded,
        events_caught_up=caught_up,
        rows=rows,
        fold_seconds=job.fold_seconds,
        swap_seconds=swap_seconds,
        total_seconds=time.monotonic() - started,
        worker_cpu_seconds=job.worker_cpu_seconds,
    )
    logger.info(
        "rebuild %s of projection %s swapped in %d rows at position %d: %d events folded, "
        "%d caught up, apply lock held %.3f s",
        rebuild_id,
        projection.name,
        rows,
        target.position,
        job.events_folded,
        caught_up,
        swap_seconds,
    )
    return report


def last_event_below_horizon(conn: psycopg.Connection[Any]) -> Checkpoint:
    """Return the (tx_id, position) of the last event no later event can precede."""
    row = conn.execute(
        """
        SELECT tx_id, position FROM events
        WHERE tx_id < pg_snapshot_xmin(pg_current_snapshot())
        ORDER BY tx_id DESC, position DESC LIMIT 1
        """
    ).fetchone()
    return Checkpoint(int(row[0]), int(row[1])) if row else Checkpoint()


def count_events(
    conn: psycopg.Connection[Any], horizon: Checkpoint, tenant_id: str | None
) -> list[tuple[str, int]]:
    """Return (tenant, events up to `horizon`) for every tenant, or for `tenant_id`, largest
    count first."""
    query = "SELECT tenant_id, count(*) FROM events WHERE (tx_id, position) <= (%s::text::xid8, %s)"
    params: list[Any] = [str(horizon.tx_id), horizon.position]
    if tenant_id is not None:
        query += " AND tenant_id = %s"
        params.append(tenant_id)
    rows = conn.execute(query + " GROUP BY tenant_id ORDER BY count(*) DESC", params).fetchall()
    return [(str(tenant), int(count)) for tenant, count in rows]


def split_partitions(
    counts: list[tuple[str, int]], *, buckets: int, min_partition_events: int
) -> list[Partition]:
    """Make one partition per tenant, and `buckets` of a tenant with at least twice
    `min_partition_events` events."""
    partitions: list[Partition] = []
    for tenant, count in counts:
        split = buckets if count >= 2 * min_partition_events else 1
        share = math.ceil(count / split)
        partitions.extend(Partition(tenant, bucket, split, share) for bucket in range(split))
    return partitions


def plan_partitions(
    conn: psycopg.Connection[Any],
    horizon: Checkpoint,
    *,
    tenant_id: str | None,
    buckets: int,
    min_partition_events: int,
) -> list[Partition]:
    """Split the log up to `horizon` by tenant, and large tenants by stream hash."""
    return split_partitions(
        count_events(conn, horizon, tenant_id),
        buckets=buckets,
        min_partition_events=min_partition_events,
    )


def read_partition(
    conn: psycopg.Connection[Any], partition: Partition, horizon: Checkpoint
) -> list[RecordedEvent]:
    """Read a partition's events up to `horizon` in (tx_id, position) order."""
    query = f"""
        SELECT {EVENT_COLUMNS} FROM events
        WHERE tenant_id = %s AND (tx_id, position) <= (%s::text::xid8, %s)
    """
    params: list[Any] = [partition.tenant_id, str(horizon.tx_id), horizon.position]
    if partition.buckets > 1:
        # hashtext is stable across sessions and servers of one major version, which is all
        # a rebuild needs: every bucket of one rebuild runs against the same server.
        query += " AND (stream_id NOT LIKE %s OR (hashtext(stream_id) & 2147483647) %% %s = %s)"
        params += [INCIDENT_STREAMS, partition.buckets, partition.bucket]
    query += " ORDER BY tx_id, position"
    with conn.transaction(), conn.cursor() as cur:
        # The primary key (tenant_id, tx_id, position) and events_tx_order return the rows
        # in this order. The planner may sort instead when the table has no statistics or
        # when it misjudges the hash filter's selectivity. A bucket of 111,529 Boston rows
        # then spilled 70 MB to disk with a work_mem of 4 MB, and the query took 0.58 s
        # against 0.21 to 0.38 s for an index scan. The rebuild already runs a process per
        # worker, so parallel query workers would only compete with them.
        cur.execute("SET LOCAL enable_sort = off")
        cur.execute("SET LOCAL max_parallel_workers_per_gather = 0")
        cur.execute(query, params)
        return [row_to_event(row) for row in cur]


def fold_partition(
    conninfo: str,
    projection: Projection,
    shadow: dict[str, str],
    partition: Partition,
    horizon: Checkpoint,
    rebuild_id: str,
) -> tuple[int, int, float]:
    """Fold one partition into the shadow tables, in a worker process.

    Returns the number of events read, of states written, and the CPU seconds this process
    spent. The connection's application name carries the worker's process id, so an
    operator can tell the workers apart.
    """
    # A partition's events stay in memory for the whole fold, so each full pass of the
    # collector would walk them all.
    collect_less_often()
    cpu_started = time.process_time()
    name = f"civicpulse-rebuild-{rebuild_id}-{os.getpid()}"
    with psycopg.connect(conninfo, application_name=name) as conn:
        events = read_partition(conn, partition, horizon)
        parked = tenant_parked_positions(conn, projection.name, partition.tenant_id)
        events = without_parked(events, parked)
        target = projection.retarget(SHADOW_SCHEMA, shadow)
        written = target.write_folded(conn, events)
        if partition.bucket == 0:
            # Every bucket of a tenant reads its configuration streams, so one writes the
            # rows that come from them.
            target.write_log_rows(conn, events)
    return len(events), written, time.process_time() - cpu_started


def _fold_partitions(
    database: Database,
    jobs: list[_Job],
    horizon: Checkpoint,
    rebuild_id: str,
    workers: int,
    progress: ProgressCallback | None,
    finish: Callable[[_Job], None],
) -> None:
    """Fold every job's partitions on one pool, and call `finish` with each job whose
    partitions are all folded, in this process, while the pool folds the others."""
    # Largest first: a long partition that starts last would leave the other workers idle
    # at the end. Submission order is the order in which the pool starts them.
    # NOTE: size is the event count, but folding a grouping event took 2 to 3.5 times as
    # long as an incidents or sla event in a profile of Boston data, so the order is rough.
    tasks = sorted(
        ((job, partition) for job in jobs for partition in job.partitions),
        key=lambda task: task[1].events,
        reverse=True,
    )
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=worker_context("replay.rebuild"))
    try:
        futures: dict[Future[tuple[int, int, float]], tuple[_Job, Partition]] = {
            pool.submit(
                fold_partition,
                database.worker_conninfo,
                job.projection,
                job.shadow,
                partition,
                horizon,
                rebuild_id,
            ): (job, partition)
            for job, partition in tasks
        }
        # Only an empty log gives a job no partitions: it has nothing to fold.
        for job in jobs:
            if not job.partitions:
                finish(job)
        for future in as_completed(futures):
            job, partition = futures[future]
            try:
                events, _, cpu_seconds = future.result()
            except Exception as error:
                raise RebuildFailed(
                    f"rebuild of projection {job.projection.name} failed in the partition of "
                    f"tenant {partition.tenant_id} (bucket {partition.bucket + 1} of "
                    f"{partition.buckets}): {error!r}; the live model is unchanged"
                ) from error
            job.events_folded += events
            job.worker_cpu_seconds += cpu_seconds
            job.partitions_done += 1
            if progress is not None:
                progress(
                    RebuildProgress(
                        job.projection.name,
                        job.partitions_done,
                        len(job.partitions),
                        job.events_folded,
                        sum(item.events for item in job.partitions),
                    )
                )
            if job.partitions_done == len(job.partitions):
                finish(job)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _copy_keys(conn: psycopg.Connection[Any], live: str, table: str) -> None:
    """Give a shadow table the primary key and unique constraints of its live table."""
    definitions = conn.execute(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = %s::regclass AND contype IN ('p', 'u') ORDER BY contype",
        (f"public.{live}",),
    ).fetchall()
    target = sql.Identifier(SHADOW_SCHEMA, table)
    for (definition,) in definitions:
        conn.execute(sql.SQL("ALTER TABLE {} ADD {}").format(target, sql.SQL(definition)))
    conn.execute(sql.SQL("ANALYZE {}").format(target))


def read_range(
    conn: psycopg.Connection[Any], after: Checkpoint, through: Checkpoint | None, limit: int
) -> list[RecordedEvent]:
    """Read up to `limit` events after `after`, through `through` or else up to the horizon."""
    bound = (
        "(tx_id, position) <= (%s::text::xid8, %s)"
        if through is not None
        else "tx_id < pg_snapshot_xmin(pg_current_snapshot())"
    )
    params: list[Any] = [str(after.tx_id), after.position]
    if through is not None:
        params += [str(through.tx_id), through.position]
    with conn.cursor() as cur:
        cur.execute(
            f"""
            SELECT {EVENT_COLUMNS} FROM events
            WHERE (tx_id, position) > (%s::text::xid8, %s) AND {bound}
            ORDER BY tx_id, position LIMIT %s
            """,
            [*params, limit],
        )
        return [row_to_event(row) for row in cur]


def _catch_up_shadow(
    conn: psycopg.Connection[Any],
    shadow_projection: Projection,
    start: Checkpoint,
    tenant_id: str | None,
    through: Checkpoint | None,
) -> tuple[Checkpoint, int]:
    """Apply events after `start` to the shadow tables; return where it stopped and how many.

    Without `through`, stops at the horizon, batch by batch, each in its own transaction
    unless the caller's transaction is open.
    """
    position = start
    applied = 0
    while True:
        with conn.transaction():
            events = read_range(conn, position, through, CATCH_UP_BATCH)
            if not events:
                return position, applied
            relevant = [e for e in events if tenant_id is None or e.tenant_id == tenant_id]
            relevant = without_parked(relevant, _parked_in(conn, shadow_projection, events))
            if relevant:
                shadow_projection.apply(conn, relevant)
        position = Checkpoint(events[-1].tx_id, events[-1].position)
        applied += len(relevant)


def _apply_range(
    conn: psycopg.Connection[Any], projection: Projection, start: Checkpoint, through: Checkpoint
) -> None:
    """Bring the live tables from `start` to `through`, as streaming batches would."""
    position = start
    while events := read_range(conn, position, through, CATCH_UP_BATCH):
        relevant = without_parked(events, _parked_in(conn, projection, events))
        if relevant:
            projection.apply(conn, relevant)
        position = Checkpoint(events[-1].tx_id, events[-1].position)


def _parked_in(
    conn: psycopg.Connection[Any], projection: Projection, events: list[RecordedEvent]
) -> frozenset[int]:
    """Return the positions among `events` (in log order) that `projection` skips."""
    positions = [event.position for event in events]
    return parked_positions(conn, projection.name, min(positions), max(positions))


def _replace_rows(
    conn: psycopg.Connection[Any], shadow: dict[str, str], tenant_id: str | None
) -> None:
    """Make the live rows (one tenant's with `tenant_id`) equal to the shadow rows.

    Only the rows that differ are written: a live row that the shadow has unchanged
    stays, the others are deleted, and the shadow rows then missing are inserted. A
    rebuild mostly folds what the live model already has, and rewriting every row cost
    most of the time that streaming batches wait for the swap. DELETE rather than
    TRUNCATE: TRUNCATE would block readers until the commit, and a reader whose snapshot
    is older than the commit would then find the table empty.
    """
    for live, table in shadow.items():
        live_table = sql.Identifier(live)
        shadow_table = sql.Identifier(SHADOW_SCHEMA, table)
        params = (tenant_id,) if tenant_id is not None else ()
        key = _primary_key(conn, live)
        if not key:
            where = sql.SQL(" WHERE tenant_id = %s") if tenant_id is not None else sql.SQL("")
            conn.execute(sql.SQL("DELETE FROM {}").format(live_table) + where, params)
            conn.execute(
                sql.SQL("INSERT INTO {} SELECT * FROM {}").format(live_table, shadow_table)
            )
        else:
            same_key = sql.SQL(" AND ").join(
                sql.SQL("s.{column} = l.{column}").format(column=sql.Identifier(column))
                for column in key
            )
            tenant = sql.SQL("l.tenant_id = %s AND ") if tenant_id is not None else sql.SQL("")
            conn.execute(
                sql.SQL(
                    "DELETE FROM {live} AS l WHERE {tenant}NOT EXISTS (SELECT FROM {shadow} AS s "
                    "WHERE {same_key} AND ROW(s.*) IS NOT DISTINCT FROM ROW(l.*))"
                ).format(live=live_table, shadow=shadow_table, tenant=tenant, same_key=same_key),
                params,
            )
            conn.execute(
                sql.SQL(
                    "INSERT INTO {live} SELECT s.* FROM {shadow} AS s "
                    "WHERE NOT EXISTS (SELECT FROM {live} AS l WHERE {same_key})"
                ).format(live=live_table, shadow=shadow_table, same_key=same_key)
            )


def _shadow_rows(conn: psycopg.Connection[Any], shadow: dict[str, str]) -> int:
    """Return how many rows the shadow tables contain."""
    rows = 0
    for table in shadow.values():
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(SHADOW_SCHEMA, table))
        ).fetchone()
        rows += row[0] if row else 0
    return rows


def _primary_key(conn: psycopg.Connection[Any], table: str) -> list[str]:
    """Return the columns of a public table's primary key, or none when it has no key."""
    rows = conn.execute(
        """
        SELECT a.attname FROM pg_index AS i
        JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, place) ON true
        JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
        WHERE i.indrelid = %s::regclass AND i.indisprimary
        ORDER BY k.place
        """,
        (f"public.{table}",),
    ).fetchall()
    return [row[0] for row in rows]


def _set_checkpoint(conn: psycopg.Connection[Any], name: str, checkpoint: Checkpoint) -> None:
    conn.execute(
        """
        INSERT INTO projection_checkpoints (projection, tx_id, position, updated_at)
        VALUES (%s, %s::text::xid8, %s, now())
        ON CONFLICT (projection) DO UPDATE
        SET tx_id = EXCLUDED.tx_id, position = EXCLUDED.position, updated_at = now()
        """,
        (name, str(checkpoint.tx_id), checkpoint.position),
    )


def _terminate_workers(conn: psycopg.Connection[Any], rebuild_id: str) -> None:
    """End the database sessions of this rebuild's workers that are still running.

    After a failure the other workers may still be folding; their sessions hold locks on the
    shadow tables that the drop would wait for.
    """
    conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name LIKE %s AND pid <> pg_backend_pid()",
        (f"civicpulse-rebuild-{rebuild_id}-%",),
    )


def _drop_shadows(conn: psycopg.Connection[Any], projection: str, rebuild_id: str | None) -> None:
    """Drop the shadow tables of this rebuild, or with None of every earlier rebuild of
    `projection` (their coordinator died: this one holds the rebuild lock)."""
    prefix = f"{projection}__".replace("_", "\\_")
    suffix = f"__{rebuild_id}".replace("_", "\\_") if rebuild_id else "\\_\\_%"
    names = conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = %s AND tablename LIKE %s",
        (SHADOW_SCHEMA, f"{prefix}%{suffix}"),
    ).fetchall()
    for (name,) in names:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(SHADOW_SCHEMA, name)))
        if rebuild_id is None:
            logger.warning("dropped shadow table %s.%s of an earlier rebuild", SHADOW_SCHEMA, name)
