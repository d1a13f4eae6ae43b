"""New York City 311 service requests (NYC Open Data, "311 Service Requests from 2010 to
Present").

The portal's CSV download has display headers ("Unique Key", "Created Date", "Complaint
Type") and times as "MM/DD/YYYY hh:mm:ss AM"; its API (SODA) has field names ("unique_key",
"created_date") and ISO 8601 times without an offset. Both read the same once headers are
normalized (lower case, runs of other characters as "_"). Times are naive New York times.
"""

from __future__ import annotations

from ledger.imports.requests import (
    ServiceRequest,
    TimeReader,
    clean,
    coordinates,
    opened,
    required,
)

SOURCE = "nyc-311"

COLUMNS = (
    "unique_key",
    "created_date",
    "closed_date",
    "agency",
    "agency_name",
    "complaint_type",
    "descriptor",
    "location_type",
    "incident_zip",
    "incident_address",
    "city",
    "borough",
    "status",
    "due_date",
    "resolution_description",
    "resolution_action_updated_date",
    "open_data_channel_type",
    "latitude",
    "longitude",
)
REQUIRED = ("unique_key", "created_date")
# Headers that identify the format; a file needs all of them to be detected as NYC.
SIGNATURE = ("unique_key", "created_date", "complaint_type")

_DETAILS = ("agency_name", "location_type", "incident_zip", "city", "borough")


def request(values: list[str], times: TimeReader) -> ServiceRequest:
    """Map one row, narrowed to COLUMNS, to a service request."""
    row = dict(zip(COLUMNS, values, strict=True))
    latitude, longitude = coordinates(row["latitude"], row["longitude"])
    details = {name: text for name in _DETAILS if (text := clean(row[name])) is not None}
    return ServiceRequest(
        source_id=required(row["unique_key"], "Unique Key"),
        opened_at=opened(times, row["created_date"], "Created Date"),
        closed_at=times.utc_text(row["closed_date"], "Closed Date"),
        updated_at=times.utc_text(
            row["resolution_action_updated_date"], "Resolution Action Updated Date"
        ),
        due_at=times.utc_text(row["due_date"], "Due Date"),
        status=clean(row["status"]),
        category=clean(row["complaint_type"]),
        title=clean(row["descriptor"]),
        department=clean(row["agency"]),
        source_channel=clean(row["open_data_channel_type"]),
        address=clean(row["incident_address"]),
        latitude=latitude,
        longitude=longitude,
        closure_reason=clean(row["resolution_description"]),
        details=details,
    )
