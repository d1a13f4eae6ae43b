"""Logging set-up for the command line: structlog renders standard-library records."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(level: str = "INFO", fmt: str = "console") -> None:
    """Route every logger through structlog, as console lines or JSON objects."""
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        # Plain tracebacks: rich ones print every local variable of every frame.
        else structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            # Request, tenant and incident ids bound by the API for the current request.
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.ExtraAdder(),
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *([structlog.processors.format_exc_info] if fmt == "json" else []),
            renderer,
        ],
    )

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("uvicorn.access").setLevel("WARNING")
    # pgserver logs every pg_ctl call at info.
    logging.getLogger("pgserver").setLevel("WARNING")
    logging.getLogger("alembic").setLevel("WARNING")
    # APScheduler logs every job run at info; the scheduler logs what the runs did.
    logging.getLogger("apscheduler").setLevel("WARNING")
