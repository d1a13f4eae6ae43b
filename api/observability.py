"""Request ids, access logs, metrics and health checks for the API."""

from __future__ import annotations

import logging
import random
import re
import time
from typing import Any
from uuid import UUID

import orjson
import psycopg
import structlog
from psycopg_pool import ConnectionPool, PoolTimeout
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.problems import PROBLEM_TYPE_BASE
from ledger.metrics import HTTP_DURATION, HTTP_REQUESTS
from ledger.schema import head_revision, schema_revision
from ledger.tenants import config_versions_of_request
from projections.runtime import projection_progress

logger = logging.getLogger("civicpulse.access")

_TENANT_PATH = re.compile(r"^/tenants/([a-z0-9][a-z0-9-]{1,62})(?:/|$)")
_INCIDENT_PATH = re.compile(r"/incidents/([0-9a-fA-F-]{32,36})(?:/|$)")
# A client's X-Request-ID is kept when it is short and printable. Any other value is replaced
# by a new id, so log lines never carry a client's control characters or a payload.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _REQUEST_ID.fullmatch(text):
                return text
    return new_request_id()


def new_request_id() -> str:
    """Return a random version 4 UUID as text, for a request that brought no id.

    Not `uuid4`: it reads os.urandom, which lets go of the interpreter lock. The event loop
    then waits for the lock behind the threads of the key checks and group commits. In a
    py-spy profile at 700 reports per second, that wait was about 8 percent of the loop's
    samples. A request id has to be unique, not secret, and `random` is seeded from the
    system, and again in each forked process.
    """
    return str(UUID(int=random.getrandbits(128), version=4))


class RequestContext:
    """ASGI middleware: one request id per request, in logs, metrics and the response.

    Binds the request id, tenant id and incident id (from the path) to structlog's context
    variables, so every log line written while handling the request carries them, including
    lines from endpoint code that runs in the thread pool. Writes one access log line and
    the request metrics when the response ends.

    It also limits request bodies to `max_body_bytes`. A larger Content-Length gets a 413
    response at once, and a body without one fails with 413 as soon as it grows past the limit.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope.get("headers", []))
        scope.setdefault("state", {})["request_id"] = request_id
        path: str = scope["path"]
        context: dict[str, Any] = {"request_id": request_id}
        if tenant := _TENANT_PATH.match(path):
            context["tenant_id"] = tenant.group(1)
        if incident := _INCIDENT_PATH.search(path):
            context["incident_id"] = incident.group(1)
        status = 500
        started = time.perf_counter()
        limit = self.max_body_bytes
        too_large = f"request body larger than {limit} bytes: send a smaller body"
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised inside the endpoint's body read, so the problem handlers respond.
                    raise HTTPException(413, too_large)
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", request_id.encode("latin-1")),
                ]
            await send(message)

        with structlog.contextvars.bound_contextvars(**context), config_versions_of_request():
            try:
                if _content_length(scope) > limit:
                    status = 413
                    await _send_problem(send_with_id, path, 413, "Content Too Large", too_large)
                    return
                await self.app(scope, receive_limited, send_with_id)
            finally:
                elapsed = time.perf_counter() - started
                route = scope.get("route")
                template = getattr(route, "path", None) or "unmatched"
                method = scope["method"]
                HTTP_REQUESTS.labels(method, template, str(status)).inc()
                HTTP_DURATION.labels(method, template).observe(elapsed)
                logger.info(
                    "%s %s %d %.1fms",
                    method,
                    path,
                    status,
                    elapsed * 1000,
                    extra={"status": status, "route": template},
                )


def _content_length(scope: Scope) -> int:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0  # the server rejects a malformed Content-Length itself
    return 0


async def _send_problem(send: Send, path: str, status: int, title: str, detail: str) -> None:
    body = orjson.dumps(
        {
            "type": PROBLEM_TYPE_BASE + f"http-{status}",
            "title": title,
            "status": status,
            "detail": detail,
            "instance": path,
        }
    )
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def readiness_checks(pool: ConnectionPool[Any], max_lag: int) -> dict[str, dict[str, Any]]:
    """Check the database, the schema revision and the projections' lag."""
    checks: dict[str, dict[str, Any]] = {}
    try:
        with pool.connection(timeout=5) as conn:
            conn.execute("SELECT 1")
            checks["database"] = {"ok": True}
            current, head = schema_revision(conn), head_revision()
            checks["schema"] = {"ok": current == head, "revision": current, "expected": head}
            progress = projection_progress(conn)
    except (psycopg.Error, PoolTimeout) as error:
        checks["database"] = {"ok": False, "error": type(error).__name__}
        logger.warning("readiness check failed to reach the database: %s", error)
        return checks
    behind = {name: item.events_behind for name, item in progress.items()}
    checks["projections"] = {
        "ok": bool(behind) and max(behind.values()) <= max_lag,
        "events_behind": behind,
        "max_events_behind": max_lag,
    }
    return checks
