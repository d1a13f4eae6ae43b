"""Database location: a server named by DATABASE_URL, or an embedded one.

Three connection strings come out of here. The owner connection runs migrations and creates
the other two roles. The application role (the API) sees one tenant's rows at a time; the
worker role (projectors, scheduler, imports) reads across tenants. Neither may update or
delete events.
"""

from __future__ import annotations

import json
import logging
import os
import select
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psycopg
from psycopg import sql
from psycopg.abc import Buffer
from psycopg.adapt import Loader
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import ConnStatus, TransactionStatus
from psycopg.types.json import set_json_dumps, set_json_loads
from psycopg_pool import AsyncConnectionPool, ConnectionPool
from pydantic import SecretStr

from ledger.errors import LedgerError
from ledger.settings import Settings

logger = logging.getLogger(__name__)

# JSONB in and out through orjson: faster than the standard library, and the same encoder
# the hash chain uses, so a payload hashes the same before and after a round trip.
set_json_dumps(orjson.dumps)
set_json_loads(orjson.loads)

XID8_OID = 5069  # fixed in pg_type since PostgreSQL 13


class Xid8Loader(Loader):
    """Reads xid8 (64-bit transaction ids) as int, so queries can select tx_id unchanged.

    NOTE: selecting `tx_id::text::bigint AS tx_id` instead makes `ORDER BY tx_id` sort by
    that expression, and the log reader then sorts the whole table rather than walk the
    (tx_id, position) index.
    """

    def load(self, data: Buffer) -> int:
        return int(bytes(data))


psycopg.adapters.register_loader(XID8_OID, Xid8Loader)


class JsonTextLoader(Loader):
    """Reads json and jsonb text with orjson straight from the buffer psycopg hands over.

    psycopg's own loader copies the buffer into bytes first. The log readers load two
    JSON columns per event, and this saves about a twentieth of a projector's read time.
    """

    def load(self, data: Buffer) -> Any:
        return orjson.loads(data)


psycopg.adapters.register_loader("json", JsonTextLoader)
psycopg.adapters.register_loader("jsonb", JsonTextLoader)

# Keeps the embedded server object alive for the life of the process; pgserver stops the
# server when the last object referring to it is collected.
_embedded_servers: dict[str, Any] = {}


@dataclass(frozen=True)
class Database:
    """Connection strings for one CivicPulse database."""

    owner_conninfo: str
    app_conninfo: str
    app_role: str
    worker_conninfo: str
    worker_role: str
    embedded: bool = False

    @classmethod
    def for_owner(
        cls, owner_conninfo: str, settings: Settings, *, embedded: bool = False
    ) -> Database:
        """Derive the role connection strings from the owner's, unless settings name them."""
        app_password = _secret(settings.app_role_password)
        worker_password = _secret(settings.worker_role_password)
        return cls(
            owner_conninfo=owner_conninfo,
            app_conninfo=settings.app_database_url
            or app_conninfo_for(owner_conninfo, settings.app_role, app_password),
            app_role=settings.app_role,
            worker_conninfo=settings.worker_database_url
            or app_conninfo_for(owner_conninfo, settings.worker_role, worker_password),
            worker_role=settings.worker_role,
            embedded=embedded,
        )

    def connect_owner(self, **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(_required(self.owner_conninfo, "DATABASE_URL"), **kwargs)

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        """Open a connection as the application role, which sees no rows until
        `set_tenant` names a tenant for the transaction.

        Pass `application_name` to tell the connection apart in pg_stat_activity.
        """
        conninfo = _required(self.app_conninfo, "CIVICPULSE_APP_DATABASE_URL")
        return psycopg.connect(conninfo, **kwargs)

    def connect_worker(self, **kwargs: Any) -> psycopg.Connection[Any]:
        """Open a connection as the worker role, which reads and appends for every tenant."""
        conninfo = _required(self.worker_conninfo, "CIVICPULSE_WORKER_DATABASE_URL")
        return psycopg.connect(conninfo, **kwargs)

    def connect_any(self, **kwargs: Any) -> psycopg.Connection[Any]:
        """Open a connection as the first role whose connection string is known."""
        conninfo = self.owner_conninfo or self.app_conninfo or self.worker_conninfo
        return psycopg.connect(conninfo, **kwargs)


def set_tenant(conn: psycopg.Connection[Any], tenant_id: str) -> None:
    """Scope the connection's current transaction to one tenant's rows.

    Row-level security on every tenant table compares against this setting, which ends
    with the transaction. On a connection outside a transaction it opens one, unless the
    connection is in autocommit mode, where the setting would end at once: that is an error.
    """
    if conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE:
        raise RuntimeError("set_tenant needs a transaction: open one with conn.transaction() first")
    conn.execute("SELECT set_config('civicpulse.tenant_id', %s, true)", (tenant_id,))


def read_as_tenant(
    conn: psycopg.Connection[Any], tenant_id: str, query: sql.Composable
) -> list[tuple[Any, ...]] | None:
    """Run one read-only statement scoped to `tenant_id` in a single round trip.

    Both statements go to the server as one simple query, which PostgreSQL runs in one
    implicit transaction: the tenant the first sets applies to the second and ends with it.
    A transaction of our own would cost three more round trips (BEGIN, the setting and the
    ROLLBACK). `query` takes no parameters: quote values into it with sql.Literal.

    Returns None, running nothing, when the connection is inside a transaction: then use
    set_tenant and a query of the transaction's own.
    """
    if conn.info.transaction_status != TransactionStatus.IDLE:
        return None
    scoped = _scoped(tenant_id, query)
    autocommit = conn.autocommit
    # Outside autocommit mode psycopg would open a transaction first.
    conn.autocommit = True
    try:
        cursor = conn.execute(scoped)
        cursor.nextset()
        return cursor.fetchall()
    finally:
        conn.autocommit = autocommit


async def read_as_tenant_async(
    conn: psycopg.AsyncConnection[Any], tenant_id: str, query: sql.Composable
) -> list[tuple[Any, ...]] | None:
    """Run one read-only statement scoped to `tenant_id`, as `read_as_tenant` does, on an
    async connection for reads on the event loop."""
    if conn.info.transaction_status != TransactionStatus.IDLE:
        return None
    scoped = _scoped(tenant_id, query)
    autocommit = conn.autocommit
    await conn.set_autocommit(True)
    try:
        cursor = await conn.execute(scoped)
        cursor.nextset()
        return await cursor.fetchall()
    finally:
        await conn.set_autocommit(autocommit)


def _scoped(tenant_id: str, query: sql.Composable) -> sql.Composed:
    """Return the simple query that sets the tenant, then runs `query`."""
    return sql.SQL("SELECT set_config('civicpulse.tenant_id', {}, true); {}").format(
        sql.Literal(tenant_id), query
    )


class MissingConnection(LedgerError):
    """A command needs a role whose connection string the settings do not give."""


def _required(conninfo: str, variable: str) -> str:
    if not conninfo:
        raise MissingConnection(
            f"this command needs {variable}"
            + (" or DATABASE_URL" if variable != "DATABASE_URL" else " (the owner role)")
            + ", which is not set"
        )
    return conninfo


def _with_password(conninfo: str | None, password: SecretStr | None) -> str:
    """Add `password` to a connection string that has none, so a secret can stay apart."""
    if not conninfo:
        return ""
    if password is None or "password" in conninfo_to_dict(conninfo):
        return conninfo
    return make_conninfo(conninfo, password=password.get_secret_value())


def quietly_idle(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """Return whether an idle connection looks healthy, without a round trip to the server.

    An idle connection has nothing to read: a server that ends it (a restart, a shutdown,
    pg_terminate_backend) sends an error and closes the socket, which makes it readable.
    So one poll of the socket with no wait finds those, for a few microseconds instead of
    a query. It cannot find a peer that vanished without closing (a host lost off the
    network), and returns False where it cannot poll (no `select.poll` on Windows).
    """
    pgconn = conn.pgconn
    if (
        pgconn.status != ConnStatus.OK
        or pgconn.transaction_status != TransactionStatus.IDLE
        or not hasattr(select, "poll")
    ):
        return False
    poller = select.poll()
    poller.register(pgconn.socket, select.POLLIN | select.POLLPRI)
    return not poller.poll(0)


def checked_pool(conninfo: str, *, min_size: int, max_size: int, name: str) -> ConnectionPool[Any]:
    """Create a pool, not yet open, that tests each connection before handing it out.

    A connection that fails the test is replaced instead of failing the request, so that
    long-running servers outlive a restart of the database. The test polls the socket
    (`quietly_idle`) and sends an empty query only when the socket has something to read.
    An empty query on every checkout cost the append benchmark 0.12 to 0.18 ms of server
    CPU per request (two runs side by side with none), and a round trip on the database.
    """

    def check(conn: psycopg.Connection[Any]) -> None:
        if quietly_idle(conn):
            return
        try:
            ConnectionPool.check_connection(conn)
        except psycopg.OperationalError:
            # One dead connection usually means that the server restarted and every idle
            # connection is dead. psycopg_pool 3.3 waits 1 s, 2 s, 4 s... between failed
            # checks, so with six or more dead idle connections a request would wait out the
            # pool's 30 s timeout. Testing them all at once lets the pool drop every dead one
            # and open new ones.
            logger.warning("pool %s found a dead connection; checking the idle ones", name)
            pool.check()
            raise

    pool: ConnectionPool[Any] = ConnectionPool(
        conninfo, min_size=min_size, max_size=max_size, open=False, check=check, name=name
    )
    return pool


def checked_async_pool(
    conninfo: str, *, min_size: int, max_size: int, name: str
) -> AsyncConnectionPool[Any]:
    """Create an async pool, not yet open, for coroutines on the event loop, with the test
    of `checked_pool` at each checkout."""

    async def check(conn: psycopg.AsyncConnection[Any]) -> None:
        if quietly_idle(conn):
            return
        try:
            await AsyncConnectionPool.check_connection(conn)
        except psycopg.OperationalError:
            logger.warning("pool %s found a dead connection; checking the idle ones", name)
            await pool.check()
            raise

    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        conninfo, min_size=min_size, max_size=max_size, open=False, check=check, name=name
    )
    return pool


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


def app_conninfo_for(owner_conninfo: str, role: str, password: str | None) -> str:
    """Return the owner's connection string with `role` swapped in."""
    parts = conninfo_to_dict(owner_conninfo)
    parts["user"] = role
    parts.pop("password", None)
    if password is not None:
        parts["password"] = password
    return make_conninfo("", **parts)


def _forget_ended_handles(data_dir: Path) -> None:
    """Drop the processes that no longer exist from pgserver's list of the server's users.

    pgserver stops the server when the last process on its list exits, and each process
    takes itself off the list at exit. A process killed with SIGKILL never does, so the
    server would outlive every later user. The list is read and written under pgserver's
    own inter-process lock.
    """
    # NOTE: this reads pgserver 0.1's private pid list (.handle_pids.json) and lock,
    # because pgserver offers no call that does it; check both when upgrading pgserver.
    from pgserver.postgres_server import PostgresServer

    handles = data_dir / ".handle_pids.json"
    if not handles.exists():
        return
    with PostgresServer._lock:
        try:
            pids = json.loads(handles.read_text())
        except (OSError, ValueError) as error:
            logger.warning("could not read %s, left as it is: %s", handles, error)
            return
        alive = [pid for pid in pids if _process_exists(pid)]
        if alive != pids:
            ended = sorted(set(pids) - set(alive))
            logger.info(
                "embedded PostgreSQL in %s: forgetting processes %s, which ended without "
                "releasing it",
                data_dir,
                ended,
            )
            handles.write_text(json.dumps(alive))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def start_embedded_server(settings: Settings) -> str:
    """Start (or reuse) the embedded PostgreSQL and return an owner connection string.

    The server keeps its data in `settings.data_dir` between runs.
    """
    import pgserver  # imported here: it is only needed without DATABASE_URL

    data_dir = settings.data_dir.expanduser().resolve()
    key = str(data_dir)
    if key not in _embedded_servers:
        data_dir.mkdir(parents=True, exist_ok=True)
        _forget_ended_handles(data_dir)
        logger.info("using the embedded PostgreSQL in %s (started if not running)", data_dir)
        _embedded_servers[key] = pgserver.get_server(  # type: ignore[attr-defined]
            data_dir, cleanup_mode="stop"
        )
    server = _embedded_servers[key]
    maintenance = server.get_uri()
    with psycopg.connect(maintenance, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (settings.database_name,)
        ).fetchone()
        if exists is None:
            conn.execute(
                sql.SQL("CREATE DATABASE {}").format(sql.Identifier(settings.database_name))
            )
            logger.info("created database %s on the embedded server", settings.database_name)
    return make_conninfo(maintenance, dbname=settings.database_name)


def resolve_database(settings: Settings) -> Database:
    """Build the connection strings from settings, starting the embedded server if needed."""
    if settings.database_url:
        owner = settings.database_url
        embedded = False
    elif settings.app_database_url or settings.worker_database_url:
        # A process that runs as the application or worker role alone, without the owner's
        # password: each connection string is used as given.
        return Database(
            owner_conninfo="",
            app_conninfo=_with_password(settings.app_database_url, settings.app_role_password),
            app_role=settings.app_role,
            worker_conninfo=_with_password(
                settings.worker_database_url, settings.worker_role_password
            ),
            worker_role=settings.worker_role,
        )
    else:
        owner = start_embedded_server(settings)
        embedded = True
    return Database.for_owner(owner, settings, embedded=embedded)
