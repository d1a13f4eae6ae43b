"""The app of one uvicorn worker process of `civicpulse serve --workers N`."""

from __future__ import annotations

from fastapi import FastAPI

from api.app import create_app
from ledger.database import resolve_database
from ledger.logs import configure_logging
from ledger.settings import get_settings


def create_worker_app() -> FastAPI:
    """Build the API from the environment, as `civicpulse serve` does in one process.

    uvicorn calls this in each worker process. The parent process has checked or migrated
    the schema already, so the workers only connect.
    """
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    return create_app(
        resolve_database(settings),
        max_lag=settings.ready_max_lag_events,
        group_commit=settings.group_commit,
        pool_size=settings.api_pool_size,
    )
