"""Open311 GeoReport v2 documents: service codes, request fields, and JSON or XML bodies."""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from fastapi.responses import JSONResponse, Response

from ledger.lifecycle import DUPLICATE, OPEN_STATUSES, REJECTED, WAITING_ON_REPORTER
from ledger.tenants import Category

FORMATS = ("json", "xml")
# Incident statuses that Open311 calls open; every other status is closed.
OPEN311_OPEN_STATUSES = frozenset(OPEN_STATUSES | {WAITING_ON_REPORTER})

_NOT_ALPHANUMERIC = re.compile(r"[^A-Za-z0-9]+")

# The same slug in SQL, for categories that the tenant's configuration no longer lists.
CATEGORY_SLUG_SQL = "lower(trim(both '-' from regexp_replace(category, '[^A-Za-z0-9]+', '-', 'g')))"


def category_slug(name: str) -> str:
    """Return the ASCII slug of a category name: "Street Light Out" -> "street-light-out"."""
    return _NOT_ALPHANUMERIC.sub("-", name).strip("-").lower()


def service_codes(categories: Sequence[Category]) -> dict[str, Category]:
    """Map each service code to its category, in the tenant's order.

    A code is the category's slug. A name without ASCII letters or digits, or one whose slug
    another category already has, gets the slug followed by a digest of the name, so that
    every code stays unique and stable while the name stays the same.
    """
    codes: dict[str, Category] = {}
    slugs = [category_slug(category.name) for category in categories]
    for category, slug in zip(categories, slugs, strict=True):
        if not slug or slugs.count(slug) > 1:
            digest = hashlib.sha256(category.name.encode()).hexdigest()[:8]
            slug = f"{slug}-{digest}" if slug else f"category-{digest}"
        codes[slug] = category
    return codes


def code_of(category: str | None, codes: Mapping[str, Category]) -> str | None:
    """Return the service code of a category name, configured or not."""
    if category is None:
        return None
    for code, configured in codes.items():
        if configured.name == category:
            return code
    return category_slug(category) or None


def service_entry(code: str, category: Category) -> dict[str, Any]:
    """Return one entry of GET services: a category as a GeoReport service."""
    return {
        "service_code": code,
        "service_name": category.name,
        "description": (
            f"{category.name}, handled by {category.department}"
            if category.department
            else category.name
        ),
        # No service takes attributes, so clients need not fetch definitions.
        "metadata": False,
        "type": "realtime",
        "keywords": ",".join(category.keywords),
        "group": category.department or "",
    }


def _time(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def status_notes(row: Mapping[str, Any]) -> str | None:
    """Return the staff's public explanation of a closed request, if any."""
    status = row["status"]
    if status == REJECTED:
        note = row.get("rejection_reason") or "rejected"
        redirect = row.get("redirect_to")
        return f"{note}; contact {redirect} instead" if redirect else note
    if status == DUPLICATE:
        return f"duplicate of request {row['duplicate_of']}"
    reason = row.get("closure_reason")
    return str(reason) if reason else None


def request_entry(row: Mapping[str, Any], codes: Mapping[str, Category]) -> dict[str, Any]:
    """Return one GeoReport service request from an incident's read-model columns.

    Only public fields: the reporter's id and contact details, the assignee and the key
    that submitted the report never leave through Open311.
    """
    category = row.get("category")
    configured = next((item for item in codes.values() if item.name == category), None)
    # A department set on the incident (routing, imports) wins over the category's.
    agency = row.get("department") or (configured.department if configured else None)
    return {
        "service_request_id": str(row["incident_id"]),
        "status": "open" if row["status"] in OPEN311_OPEN_STATUSES else "closed",
        "status_notes": status_notes(row),
        "service_name": category,
        "service_code": code_of(category, codes),
        "description": row.get("description"),
        "agency_responsible": agency,
        "service_notice": None,
        "requested_datetime": _time(row.get("submitted_at")),
        "updated_datetime": _time(row.get("updated_at")),
        "expected_datetime": _time(row.get("resolution_due_at")),
        "address": row.get("address"),
        "address_id": None,
        "zipcode": None,
        "lat": row.get("latitude"),
        "long": row.get("longitude"),
        "media_url": None,
    }


def errors_document(status: int, descriptions: Iterable[str]) -> list[dict[str, Any]]:
    """Return the GeoReport error list: one `{"code", "description"}` entry per error."""
    return [{"code": status, "description": text} for text in descriptions]


# The XML element names of each document: (root, item) as the GeoReport v2 spec names them.
XML_NAMES = {
    "services": ("services", "service"),
    "requests": ("service_requests", "request"),
    "errors": ("errors", "error"),
}


def _xml_value(parent: ElementTree.Element, name: str, value: Any) -> None:
    child = ElementTree.SubElement(parent, name)
    if isinstance(value, bool):
        child.text = "true" if value else "false"
    elif isinstance(value, list):
        for item in value:
            _xml_item(child, name.removesuffix("s") or "item", item)
    elif value is not None:
        child.text = str(value)


def _xml_item(parent: ElementTree.Element, name: str, item: Mapping[str, Any]) -> None:
    element = ElementTree.SubElement(parent, name)
    for key, value in item.items():
        _xml_value(element, key, value)


def xml_bytes(kind: str, items: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> bytes:
    """Serialize a document as GeoReport XML; a mapping becomes the root's children."""
    if isinstance(items, Mapping):
        root = ElementTree.Element(kind)
        for key, value in items.items():
            _xml_value(root, key, value)
    else:
        root_name, item_name = XML_NAMES[kind]
        root = ElementTree.Element(root_name)
        for item in items:
            _xml_item(root, item_name, item)
    body: bytes = ElementTree.tostring(root, encoding="utf-8", xml_declaration=True)
    return body


def document_response(
    kind: str,
    content: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    response_format: str,
    *,
    status_code: int = 200,
) -> Response:
    """Return `content` as JSON or as GeoReport XML."""
    if response_format == "xml":
        return Response(
            xml_bytes(kind, content), status_code=status_code, media_type="application/xml"
        )
    return JSONResponse(content, status_code=status_code)
