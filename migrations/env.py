"""Alembic environment: runs migrations over the owner connection given by the caller.

Every pending migration runs in one transaction, with a fingerprint of the events table taken
before and after. A migration that changed, removed or added an event fails the check, and
the transaction rolls back with everything the migrations did: no migration can rewrite
history, whatever SQL it runs.
"""

from __future__ import annotations

import psycopg
from alembic import context
from sqlalchemy import Connection, create_engine, pool, text

config = context.config
owner_conninfo: str = config.attributes["owner_conninfo"]

# The columns events have had since the first migration. Later migrations may add columns,
# but never change these.
EVENT_COLUMNS = (
    "position, tx_id, tenant_id, stream_id, stream_version, event_type, schema_version, "
    "payload, metadata, occurred_at, recorded_at, event_id, hash"
)


class EventsRewritten(RuntimeError):
    """A migration changed stored events; the migrations were rolled back."""


def events_fingerprint(connection: Connection) -> tuple[int, str] | None:
    """Return the number of events and an MD5 over every row, or None before the table."""
    if connection.execute(text("SELECT to_regclass('public.events')")).scalar() is None:
        return None
    row = connection.execute(
        text(
            f"""
            SELECT count(*), coalesce(md5(string_agg(md5(row_text), '' ORDER BY position)), '')
            FROM (SELECT position, ROW({EVENT_COLUMNS})::text AS row_text FROM events) AS rows
            """
        )
    ).one()
    return int(row[0]), str(row[1])


def run_migrations_online() -> None:
    engine = create_engine(
        "postgresql+psycopg://",
        creator=lambda: psycopg.connect(owner_conninfo),
        poolclass=pool.NullPool,
    )
    with engine.connect() as connection:
        context.configure(connection=connection, transaction_per_migration=False)
        with context.begin_transaction():
            before = events_fingerprint(connection)
            context.run_migrations()
            after = events_fingerprint(connection)
            if before is not None and before != after:
                raise EventsRewritten(
                    f"a migration changed stored events ({before[0]} events before, "
                    f"{after[0] if after else 0} after, or the same number with other "
                    "contents); every migration of this run was rolled back. Events are "
                    "never rewritten: append events that correct them instead"
                )


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported: run `civicpulse migrate`")
run_migrations_online()
