"""GeoReport v2 errors: the error list, its OpenAPI description, and the middleware that
turns problem-details documents under an Open311 path into error lists."""

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.open311_format import errors_document, xml_bytes
from ledger.errors import LedgerError

_ERROR_LIST_SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"code": {"type": "integer"}, "description": {"type": "string"}},
        "required": ["code", "description"],
    },
}
_DOCUMENT: dict[str, Any] = {"application/json": {}, "application/xml": {}}
_ERRORS = {"application/json": {"schema": _ERROR_LIST_SCHEMA}, "application/xml": {}}
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The document, as JSON or GeoReport XML", "content": _DOCUMENT},
    400: {"description": "Invalid parameter: the description names it", "content": _ERRORS},
    401: {"description": "No api_key, and the tenant's reads are not public", "content": _ERRORS},
    403: {"description": "Invalid api_key, or its role may not do this", "content": _ERRORS},
    404: {"description": "Tenant, service, request or token not found", "content": _ERRORS},
    413: {"description": "Request body over 64 KiB", "content": _ERRORS},
    503: {"description": "Database unavailable: retry later", "content": _ERRORS},
}


class Open311Error(LedgerError):
    """An error returned as a GeoReport error list with the spec's status code."""

    def __init__(self, status: int, description: str) -> None:
        self.status = status
        super().__init__(description)


class Open311Errors:
    """ASGI middleware: rewrite errors under an Open311 path as GeoReport error lists.

    Authentication, validation and database errors are problem-details documents
    elsewhere. Under PREFIX they become `[{"code", "description"}]` in the path's format,
    and 422 becomes the spec's 400.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if "/open311/v2/" not in path:
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def send_converted(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                if headers.get(b"content-type", b"").startswith(b"application/problem+json"):
                    start = message
                    return
                await send(message)
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            await _send_error_list(send, start, b"".join(chunks), path)

        await self.app(scope, receive, send_converted)


async def _send_error_list(send: Send, start: Message, body: bytes, path: str) -> None:
    try:
        problem = json.loads(body)
        status = int(problem["status"])
        descriptions = [str(problem["detail"])]
    except (ValueError, KeyError, TypeError):
        status, descriptions = int(start["status"]), ["the request failed"]
    if status == 422:
        status = 400
    document = errors_document(status, descriptions)
    if path.endswith(".xml"):
        content, media_type = xml_bytes("errors", document), b"application/xml"
    else:
        content, media_type = json.dumps(document).encode(), b"application/json"
    kept = [
        (name, value)
        for name, value in start.get("headers", [])
        if name.lower() not in (b"content-type", b"content-length")
    ]
    headers = [
        *kept,
        (b"content-type", media_type),
        (b"content-length", str(len(content)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})
