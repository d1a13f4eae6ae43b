"""Open311 GeoReport v2 service requests: the JSON array that GET requests.json returns,
or the same fields as columns of a CSV or TSV file.

The spec has no closed time: a request whose status is "closed" is closed at its
updated_datetime. A "city" column, as in files that gather several cities' requests, is
kept in the payload and makes the request id unique across cities.
"""

from __future__ import annotations

from ledger.imports.requests import (
    CLOSED,
    ServiceRequest,
    TimeReader,
    clean,
    coordinates,
    opened,
    required,
    status_class,
)

SOURCE = "open311"

COLUMNS = (
    "service_request_id",
    "status",
    "status_notes",
    "service_name",
    "service_code",
    "description",
    "agency_responsible",
    "service_notice",
    "requested_datetime",
    "updated_datetime",
    "expected_datetime",
    "address",
    "address_id",
    "zipcode",
    "lat",
    "long",
    "media_url",
    "city",
)
REQUIRED = ("service_request_id", "requested_datetime")
SIGNATURE = REQUIRED

_DETAILS = ("service_code", "service_notice", "address_id", "zipcode", "media_url", "city")


def request(values: list[str], times: TimeReader) -> ServiceRequest:
    """Map one request, narrowed to COLUMNS, to a service request."""
    row = dict(zip(COLUMNS, values, strict=True))
    request_id = required(row["service_request_id"], "service_request_id")
    city = clean(row["city"])
    latitude, longitude = coordinates(row["lat"], row["long"], ("lat", "long"))
    details = {name: text for name in _DETAILS if (text := clean(row[name])) is not None}
    status = clean(row["status"])
    opened_at = opened(times, row["requested_datetime"], "requested_datetime")
    updated_at = times.utc_text(row["updated_datetime"], "updated_datetime")
    return ServiceRequest(
        source_id=f"{city}/{request_id}" if city else request_id,
        opened_at=opened_at,
        updated_at=updated_at,
        closed_at=updated_at if status_class(status, None) == CLOSED else None,
        due_at=times.utc_text(row["expected_datetime"], "expected_datetime"),
        status=status,
        category=clean(row["service_name"]),
        description=clean(row["description"]),
        department=clean(row["agency_responsible"]),
        address=clean(row["address"]),
        latitude=latitude,
        longitude=longitude,
        closure_reason=clean(row["status_notes"]),
        details=details,
    )
