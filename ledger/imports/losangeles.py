"""Los Angeles MyLA311 service requests (Los Angeles Open Data, "MyLA311 Service Request
Data", one data set per year).

The columns read are those of the yearly exports from 2016 on: SRNumber, CreatedDate,
UpdatedDate, ActionTaken, Owner, RequestType, Status, RequestSource, AssignTo, ServiceDate,
ClosedDate, Address, ZipCode, Latitude, Longitude, CD, NCName. Headers are matched in any
case and spacing. Times are naive Los Angeles times, as "MM/DD/YYYY hh:mm:ss AM" in the
portal's CSV download and as ISO 8601 in its API.
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

SOURCE = "la-311"

COLUMNS = (
    "srnumber",
    "createddate",
    "updateddate",
    "actiontaken",
    "owner",
    "requesttype",
    "status",
    "requestsource",
    "assignto",
    "servicedate",
    "closeddate",
    "address",
    "zipcode",
    "latitude",
    "longitude",
    "cd",
    "ncname",
    "anonymous",
)
REQUIRED = ("srnumber", "createddate")
SIGNATURE = ("srnumber", "createddate", "requesttype")

_DETAILS = {
    "actiontaken": "action_taken",
    "zipcode": "zip_code",
    "cd": "council_district",
    "ncname": "neighborhood_council",
    "anonymous": "anonymous",
}


def request(values: list[str], times: TimeReader) -> ServiceRequest:
    """Map one row, narrowed to COLUMNS, to a service request."""
    row = dict(zip(COLUMNS, values, strict=True))
    latitude, longitude = coordinates(row["latitude"], row["longitude"], ("Latitude", "Longitude"))
    details = {key: text for name, key in _DETAILS.items() if (text := clean(row[name]))}
    # ServiceDate is the day the city scheduled the service (a bulky item pickup, say).
    service_date = times.utc_text(row["servicedate"], "ServiceDate")
    if service_date is not None:
        details["service_date"] = service_date
    return ServiceRequest(
        source_id=required(row["srnumber"], "SRNumber"),
        opened_at=opened(times, row["createddate"], "CreatedDate"),
        updated_at=times.utc_text(row["updateddate"], "UpdatedDate"),
        closed_at=times.utc_text(row["closeddate"], "ClosedDate"),
        status=clean(row["status"]),
        category=clean(row["requesttype"]),
        department=clean(row["owner"]),
        assignee=clean(row["assignto"]),
        source_channel=clean(row["requestsource"]),
        address=clean(row["address"]),
        latitude=latitude,
        longitude=longitude,
        closure_reason=clean(row["actiontaken"]),
        details=details,
    )
