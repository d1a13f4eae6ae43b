"""RFC 9457 problem details for every error the API returns."""

from __future__ import annotations

import logging
import re
from typing import Any

import orjson
import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from ledger import errors
from ledger.lifecycle import COMMANDS

logger = logging.getLogger(__name__)

PROBLEM_TYPE_BASE = "https://civicpulse.example/problems/"
# Seconds a client is asked to wait before retrying when the database is unreachable.
DATABASE_RETRY_AFTER_SECONDS = 1

# The path of an incident command, such as /tenants/{t}/incidents/{id}/acknowledge.
_COMMAND_PATH = re.compile(r"^/tenants/[^/]+/incidents/[^/]+/(?P<command>[^/]+)$")

# Ledger error -> (HTTP status, problem type slug, title)
_LEDGER_ERRORS: list[tuple[type[errors.LedgerError], int, str, str]] = [
    (errors.ConcurrencyError, 409, "version-conflict", "Stream version conflict"),
    (
        errors.StreamTenantMismatch,
        409,
        "stream-tenant-mismatch",
        "Stream belongs to another tenant",
    ),
    (errors.IdempotencyKeyReused, 422, "idempotency-key-reused", "Idempotency key reused"),
    (errors.CommandRejected, 409, "command-not-allowed", "Command not allowed in this state"),
    (errors.ConfigInvalid, 422, "invalid-configuration", "Invalid configuration"),
    (errors.CommandInvalid, 422, "invalid-command", "Invalid command"),
    (errors.InvalidEventData, 422, "invalid-data", "Invalid data"),
    (errors.InvalidRequest, 422, "invalid-request", "Invalid request"),
    (errors.TenantNotFound, 404, "tenant-not-found", "Tenant not found"),
    (errors.IncidentNotFound, 404, "incident-not-found", "Incident not found"),
    (errors.DashboardNotFound, 404, "dashboard-not-found", "Dashboard not found"),
    (errors.TenantExists, 409, "tenant-exists", "Tenant exists"),
    (errors.NotProjectedYet, 503, "not-projected-yet", "Not projected yet"),
    (errors.AuthenticationFailed, 401, "unauthenticated", "API key missing or not valid"),
    (errors.Forbidden, 403, "forbidden", "Role not allowed"),
    (errors.KeyNotFound, 404, "key-not-found", "API key not found"),
    (errors.ReporterNotFound, 404, "reporter-not-found", "Reporter not found"),
    (errors.ContactNotGiven, 404, "contact-not-given", "No contact details"),
    (
        errors.ContactDecryptionFailed,
        500,
        "contact-unreadable",
        "Stored contact details cannot be decrypted",
    ),
]


class ProblemResponse(Response):
    media_type = "application/problem+json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def problem(
    request: Request, status: int, slug: str, title: str, detail: str, **extra: Any
) -> ProblemResponse:
    body = {
        "type": PROBLEM_TYPE_BASE + slug,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        **extra,
    }
    return ProblemResponse(body, status_code=status)


def _extra_fields(error: errors.LedgerError) -> dict[str, Any]:
    if isinstance(error, errors.ConcurrencyError):
        return {"expected_version": error.expected, "current_version": error.actual}
    if isinstance(error, errors.CommandRejected):
        return {"state": error.status, "command": error.command, "allowed_commands": error.allowed}
    if isinstance(error, errors.ConfigInvalid):
        return {
            "errors": [
                {
                    "section": item.section,
                    "field": item.field,
                    "value": _json_safe(item.value),
                    "fix": item.fix,
                }
                for item in error.problems
            ]
        }
    if isinstance(error, errors.Forbidden):
        return {"role": error.role, "allowed_roles": error.allowed}
    return {}


def _json_safe(value: Any) -> Any:
    """Return `value` as JSON can carry it: the input as sent, shortened when long."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return _valid_unicode(value[:200])
    try:
        text = orjson.dumps(value, default=str).decode()
    except TypeError:  # a lone surrogate somewhere inside
        return _valid_unicode(str(value)[:200])
    return value if len(text) <= 200 else text[:200]


def _valid_unicode(text: str) -> str:
    """Replace lone surrogates, which JSON encoders reject, with U+FFFD."""
    return text.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace")


def _invalid_item(item: Any, json_body: bool) -> dict[str, Any]:
    location = [str(part) for part in item.get("loc", ())]
    message = item.get("msg", "")
    entry: dict[str, Any] = {"location": ".".join(location)}
    if item.get("type") == "json_invalid":
        # FastAPI puts the character offset of a JSON syntax error in the location.
        offset = location[1] if len(location) > 1 else "?"
        reason = item.get("ctx", {}).get("error", "syntax error")
        entry["location"] = "body"
        entry["message"] = f"not valid JSON ({reason} at character {offset}); send a JSON object"
        return entry
    if location == ["body"]:
        # An error about the body as a whole: never echo the body back, which may contain
        # what the error is about (personal data, say).
        if item.get("type") == "missing":
            message = "missing: send a JSON object with the command's arguments (see /openapi.json)"
        elif item.get("type") in ("model_attributes_type", "dict_type") and not json_body:
            message += "; send the body as JSON with Content-Type: application/json"
        entry["message"] = message
        return entry
    entry["message"] = message
    entry["value"] = _json_safe(item.get("input"))
    return entry


def _unknown_command(request: Request, status: int) -> str | None:
    """Return the command a POST named when no route has it, or None."""
    if status != 404 or request.method != "POST":
        return None
    match = _COMMAND_PATH.match(request.url.path)
    if match is None or match["command"] in COMMANDS:
        return None
    return match["command"]


def install_problem_handlers(app: FastAPI) -> None:
    async def ledger_error(request: Request, error: Exception) -> ProblemResponse:
        assert isinstance(error, errors.LedgerError)
        for error_type, status, slug, title in _LEDGER_ERRORS:
            if isinstance(error, error_type):
                response = problem(request, status, slug, title, str(error), **_extra_fields(error))
                if status == 401:
                    response.headers["WWW-Authenticate"] = 'Bearer realm="civicpulse"'
                if status == 503:
                    # The projector is behind, which is expected for a moment after a write.
                    response.headers["Retry-After"] = "1"
                elif status >= 500:
                    logger.error("%s on %s %s: %s", title, request.method, request.url.path, error)
                return response
        return problem(request, 400, "bad-request", "Bad request", str(error))

    async def validation_error(request: Request, error: Exception) -> ProblemResponse:
        assert isinstance(error, RequestValidationError)
        json_body = request.headers.get("content-type", "").startswith("application/json")
        invalid = [_invalid_item(item, json_body) for item in error.errors()]
        detail = "; ".join(f"{entry['location']}: {entry['message']}" for entry in invalid)
        return problem(request, 422, "invalid-request", "Invalid request", detail, errors=invalid)

    async def http_error(request: Request, error: Exception) -> ProblemResponse:
        assert isinstance(error, StarletteHTTPException)
        unknown = _unknown_command(request, error.status_code)
        if unknown is not None:
            return problem(
                request,
                404,
                "unknown-command",
                "Unknown command",
                f"unknown command {unknown!r}: use one of {', '.join(sorted(COMMANDS))}",
                commands=sorted(COMMANDS),
            )
        return problem(
            request,
            error.status_code,
            f"http-{error.status_code}",
            str(error.detail),
            str(error.detail),
        )

    async def database_unavailable(request: Request, error: Exception) -> ProblemResponse:
        # OperationalError covers a lost or refused connection (a server restart or
        # failover), a pool timeout and other transient failures, so a retry may succeed. A
        # command may have committed before its connection was lost, and a retry with the
        # same Idempotency-Key then returns the stored result.
        logger.warning(
            "database unavailable on %s %s (request id %s): %s: %s",
            request.method,
            request.url.path,
            request.headers.get("x-request-id", "-"),
            type(error).__name__,
            str(error).strip(),
        )
        response = problem(
            request,
            503,
            "database-unavailable",
            "Database unavailable",
            "the database could not be reached or failed to complete the request, so retry "
            "later. Send a command again with the same Idempotency-Key, which returns the "
            "first result if the command was stored",
        )
        response.headers["Retry-After"] = str(DATABASE_RETRY_AFTER_SECONDS)
        return response

    async def unexpected_error(request: Request, error: Exception) -> ProblemResponse:
        # Starlette raises the error again after this response, and the server logs it with
        # its traceback; this line adds the request id.
        logger.error(
            "unhandled %s on %s %s (request id %s)",
            type(error).__name__,
            request.method,
            request.url.path,
            request.headers.get("x-request-id", "-"),
        )
        return problem(
            request,
            500,
            "internal-error",
            "Internal server error",
            "the server failed to handle this request; it has been logged",
        )

    app.add_exception_handler(errors.LedgerError, ledger_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(psycopg.OperationalError, database_unavailable)
    app.add_exception_handler(Exception, unexpected_error)
